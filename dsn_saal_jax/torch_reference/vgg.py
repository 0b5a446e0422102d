"""PyTorch reference of DSN-VGG16-BN, for parity checks and weight exchange.

The backbone and classifier use torchvision's `vgg16_bn` module layout, so
their state_dict keys (`features.0.weight`, ..., `classifier.6.bias`) are
torchvision's. Side branches live under `side.{s}.convs.{j}`, `side.{s}.fuse`
and `side.{s}.fc` (s = 0..4). Importing this module needs torch (the `test`
extra); nothing else in the package does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dsn_saal_jax.models import POOLED_SIZE, VGG16_STAGES, VGG16_WIDTHS
from dsn_saal_jax.torch_reference.heads import SideHeadTorch


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
