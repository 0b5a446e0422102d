"""PyTorch reference of ResNet-50 / ResNeXt-50 with optional side heads, for parity checks and weight exchange.

The module tree is torchvision's `models/resnet.py` (Bottleneck, `_make_layer`,
its init), written out here because torchvision is not a dependency, so the
backbone's state_dict keys (`conv1.weight`, `layer1.0.downsample.0.weight`,
..., `fc.bias`) are torchvision's exactly. Side branches live under
`side.{s}.convs.0`, `side.{s}.fuse` and `side.{s}.fc` (s = 0 for the stem,
1..4 for layer1..layer4). Importing this module needs torch (the `test`
extra); nothing else in the package does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dsn_saal_jax.models.resnet import RESNET50_STAGES
from dsn_saal_jax.torch_reference.heads import SideHeadTorch


class BottleneckTorch(nn.Module):
  """torchvision's Bottleneck (stride on the 3x3 conv, ResNet v1.5)."""

  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
               groups: int = 1, base_width: int = 64):
    super().__init__()
    width = int(planes * (base_width / 64.0)) * groups
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    out += identity
    return self.relu(out)


class ResNetTorch(nn.Module):
  """Same network as `dsn_saal_jax.models.resnet.ResNet`, in NCHW PyTorch."""

  def __init__(self, num_classes: int, in_channels: int = 3, dsn: bool = True, fuse_channels: int = 1,
               stage_sizes: Sequence[int] = RESNET50_STAGES, groups: int = 1, width_per_group: int = 64,
               width: int = 64):
    super().__init__()
    self.groups, self.base_width, self.inplanes = groups, width_per_group, width
    self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    taps = [width]
    for i, n_blocks in enumerate(stage_sizes):
      setattr(self, f"layer{i + 1}", self._make_layer(width * 2 ** i, n_blocks, stride=1 if i == 0 else 2))
      taps.append(self.inplanes)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(self.inplanes, num_classes)
    self.num_stages = len(stage_sizes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    self.dsn = dsn
    if dsn:  # built after torchvision's init loop: side heads keep their own (PyTorch default) init
      self.side = nn.ModuleList(SideHeadTorch([c], num_classes, fuse_channels) for c in taps)

  def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * BottleneckTorch.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * BottleneckTorch.expansion, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes * BottleneckTorch.expansion))
    layers = [BottleneckTorch(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
    self.inplanes = planes * BottleneckTorch.expansion
    layers += [BottleneckTorch(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
               for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    heads = []
    x = self.relu(self.bn1(self.conv1(x)))
    if self.dsn:
      heads.append(self.side[0]([x]))
    x = self.maxpool(x)
    for i in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{i}")(x)
      if self.dsn:
        heads.append(self.side[i]([x]))
    heads.append(self.fc(torch.flatten(self.avgpool(x), 1)))
    return tuple(heads)
