"""PyTorch reference of DSN-VGG16-BN and the SAAL loss, for parity checks and weight exchange.

The backbone and classifier use torchvision's `vgg16_bn` module layout, so
their state_dict keys (`features.0.weight`, ..., `classifier.6.bias`) are
torchvision's. Side branches live under `side.{s}.convs.{j}`, `side.{s}.fuse`
and `side.{s}.fc` (s = 0..4). Importing this module needs torch (the `test`
extra); nothing else in the package does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsn_saal_jax.models import POOLED_SIZE, SIDE_CHANNELS, VGG16_STAGES, VGG16_WIDTHS


class SideHeadTorch(nn.Module):

  def __init__(self, in_channels: Sequence[int], num_classes: int, fuse_channels: int):
    super().__init__()
    self.convs = nn.ModuleList(nn.Conv2d(c, SIDE_CHANNELS, 1) for c in in_channels)
    self.fuse = nn.Conv2d(SIDE_CHANNELS, fuse_channels, 1)
    self.fc = nn.Linear(fuse_channels * POOLED_SIZE * POOLED_SIZE, num_classes)

  def forward(self, acts: Sequence[torch.Tensor]) -> torch.Tensor:
    side = sum(conv(a) for conv, a in zip(self.convs, acts))
    pooled = F.adaptive_avg_pool2d(self.fuse(side), POOLED_SIZE)
    return self.fc(torch.flatten(pooled, 1))


class DSNVGG16BNTorch(nn.Module):
  """Same network as `dsn_saal_jax.models.DSNVGG16BN`, in NCHW PyTorch."""

  def __init__(self, num_classes: int, in_channels: int = 3, dsn: bool = True, fuse_channels: int = 1,
               dropout_rate: float = 0.5, stages: Sequence[int] = VGG16_STAGES,
               widths: Sequence[int] = VGG16_WIDTHS, hidden: int = 4096):
    super().__init__()
    layers: list[nn.Module] = []
    # Per stage: (indices into `features` of its ReLUs, index of its max-pool).
    self._stages: list[tuple[list[int], int]] = []
    c = in_channels
    for n_convs, width in zip(stages, widths):
      relus = []
      for _ in range(n_convs):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=False)]
        relus.append(len(layers) - 1)
        c = width
      layers.append(nn.MaxPool2d(2, 2))
      self._stages.append((relus, len(layers) - 1))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d(POOLED_SIZE)
    self.classifier = nn.Sequential(
        nn.Linear(c * POOLED_SIZE * POOLED_SIZE, hidden), nn.ReLU(False), nn.Dropout(dropout_rate),
        nn.Linear(hidden, hidden), nn.ReLU(False), nn.Dropout(dropout_rate),
        nn.Linear(hidden, num_classes))
    self.dsn = dsn
    if dsn:
      self.side = nn.ModuleList(
          SideHeadTorch([w] * n, num_classes, fuse_channels) for n, w in zip(stages, widths))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    heads, start = [], 0
    for s, (relus, pool) in enumerate(self._stages):
      acts = []
      for i in range(start, pool):
        x = self.features[i](x)
        if i in relus:
          acts.append(x)
      if self.dsn:
        heads.append(self.side[s](acts))
      x = self.features[pool](x)
      start = pool + 1
    x = torch.flatten(self.avgpool(x), 1)
    heads.append(self.classifier(x))
    return tuple(heads)


def saal_loss_torch(heads: Sequence[torch.Tensor], labels: torch.Tensor, alpha_raw: torch.Tensor,
                    beta_raw: torch.Tensor, class_counts: torch.Tensor, log_zero: float = -4.0,
                    normalize_weights: bool = False) -> torch.Tensor:
  """Eq. 10 summed over heads, written independently of the JAX version."""
  alpha = torch.sigmoid(alpha_raw)
  w = (1 - alpha) / (1 - alpha ** class_counts)
  if normalize_weights:
    w = len(class_counts) * w / w.sum()
  total = 0.0
  for i, logits in enumerate(heads):
    p = torch.softmax(logits, -1)
    onehot = F.one_hot(labels, logits.shape[-1]).to(p.dtype)
    dce = -(w * onehot * torch.log_softmax(logits, -1)).sum(-1)
    log_q = torch.where(onehot > 0, torch.zeros_like(p), torch.full_like(p, log_zero))
    drce = -(w * p * log_q).sum(-1)
    total = total + (dce + torch.sigmoid(beta_raw[i]) * drce).mean()
  return total
