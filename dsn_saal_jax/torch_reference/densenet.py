"""PyTorch reference of (DSN-)DenseNet-169, for parity checks and weight exchange.

The backbone and classifier have torchvision's `DenseNet` module tree (`features.conv0`, `features.norm0`,
`features.denseblock{i}.denselayer{j}.{norm1,conv1,norm2,conv2}`, `features.transition{i}.{norm,conv}`,
`features.norm5`, `classifier`), so their state_dict keys and initialisation are torchvision's. Side
heads live under `side.{s}` (s = 0 the stem, s = i dense block i) and tap what
`dsn_saal_jax.models.densenet` documents: the stem after relu0, and each block's last layer's new
features.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsn_saal_jax.models.densenet import DENSENET169_BLOCKS
from dsn_saal_jax.torch_reference.heads import SideHeadTorch


class _DenseLayer(nn.Module):

  def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(num_input_features)
    self.relu1 = nn.ReLU(inplace=False)
    self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
    self.relu2 = nn.ReLU(inplace=False)
    self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

  def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
    bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(list(features), 1))))
    return self.conv2(self.relu2(self.norm2(bottleneck)))


class _DenseBlock(nn.ModuleDict):

  def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
    super().__init__()
    for i in range(num_layers):
      self.add_module(f"denselayer{i + 1}", _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

  def forward(self, init_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(all features concatenated, the last layer's new features)."""
    features = [init_features]
    for layer in self.values():
      features.append(layer(features))
    return torch.cat(features, 1), features[-1]


class _Transition(nn.Sequential):

  def __init__(self, num_input_features: int, num_output_features: int):
    super().__init__()
    self.add_module("norm", nn.BatchNorm2d(num_input_features))
    self.add_module("relu", nn.ReLU(inplace=False))
    self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False))
    self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNetTorch(nn.Module):
  """Same network as `dsn_saal_jax.models.DenseNet`, in NCHW PyTorch."""

  def __init__(self, num_classes: int, in_channels: int = 3, dsn: bool = True, fuse_channels: int = 1,
               growth_rate: int = 32, block_config: Sequence[int] = DENSENET169_BLOCKS,
               num_init_features: int = 64, bn_size: int = 4):
    super().__init__()
    self.features = nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=False)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))
    num_features = num_init_features
    for i, num_layers in enumerate(block_config):
      self.features.add_module(f"denseblock{i + 1}",
                               _DenseBlock(num_layers, num_features, bn_size, growth_rate))
      num_features += num_layers * growth_rate
      if i != len(block_config) - 1:
        self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
        num_features //= 2
    self.features.add_module("norm5", nn.BatchNorm2d(num_features))
    self.classifier = nn.Linear(num_features, num_classes)
    # torchvision's init (its nn.Linear weight keeps torch's default).
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.Linear):
        nn.init.constant_(m.bias, 0)
    self.dsn = dsn
    if dsn:
      taps = [num_init_features] + [growth_rate] * len(block_config)
      self.side = nn.ModuleList(SideHeadTorch([c], num_classes, fuse_channels) for c in taps)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    f = self.features
    taps = []
    x = f.relu0(f.norm0(f.conv0(x)))
    taps.append(x)
    x = f.pool0(x)
    for name, module in f.named_children():
      if name.startswith("denseblock"):
        x, newest = module(x)
        taps.append(newest)
      elif name.startswith("transition"):
        x = module(x)
    x = F.relu(f.norm5(x))
    x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
    heads = [side([t]) for side, t in zip(self.side, taps)] if self.dsn else []
    return (*heads, self.classifier(x))
