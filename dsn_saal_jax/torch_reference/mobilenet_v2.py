"""PyTorch reference of (DSN-)MobileNetV2, for parity checks and weight exchange.

The backbone and classifier have torchvision's `MobileNetV2` module tree (`features.0` a
Conv2dNormActivation, `features.{i}` InvertedResidual blocks with `conv.{k}`, `features.18` the last
1x1 Conv2dNormActivation, `classifier` = Dropout + Linear), so their state_dict keys and
initialisation are torchvision's. Side heads live under `side.{s}` and tap what
`dsn_saal_jax.models.mobilenet_v2` documents: the last block output of each resolution stage.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsn_saal_jax.models.mobilenet_v2 import LAST_CHANNELS, MOBILENET_V2_SETTING, STEM_CHANNELS, make_divisible
from dsn_saal_jax.torch_reference.heads import SideHeadTorch


class _ConvBNReLU6(nn.Sequential):
  """torchvision's Conv2dNormActivation with BatchNorm2d and ReLU6: keys `0` (conv, no bias), `1` (BN)."""

  def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
    padding = (kernel_size - 1) // 2
    super().__init__(nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
                     nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=False))


class _InvertedResidual(nn.Module):

  def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
    super().__init__()
    hidden_dim = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers: list[nn.Module] = []
    if expand_ratio != 1:
      layers.append(_ConvBNReLU6(inp, hidden_dim, kernel_size=1))
    layers += [_ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
               nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
    self.conv = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Torch(nn.Module):
  """Same network as `dsn_saal_jax.models.MobileNetV2`, in NCHW PyTorch."""

  def __init__(self, num_classes: int, in_channels: int = 3, dsn: bool = True, fuse_channels: int = 1,
               width_mult: float = 1.0, inverted_residual_setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING,
               round_nearest: int = 8, dropout_rate: float = 0.2):
    super().__init__()
    input_channel = make_divisible(STEM_CHANNELS * width_mult, round_nearest)
    last_channel = make_divisible(LAST_CHANNELS * max(1.0, width_mult), round_nearest)
    features: list[nn.Module] = [_ConvBNReLU6(in_channels, input_channel, stride=2)]
    channels = [input_channel]  # output channels of each entry of `features`
    strides = [2]
    for t, c, n, s in inverted_residual_setting:
      output_channel = make_divisible(c * width_mult, round_nearest)
      for i in range(n):
        features.append(_InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
        channels.append(output_channel)
        strides.append(s if i == 0 else 1)
        input_channel = output_channel
    features.append(_ConvBNReLU6(input_channel, last_channel, kernel_size=1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(p=dropout_rate), nn.Linear(last_channel, num_classes))
    # torchvision's init.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)
    # One tap per resolution: the entry before each stride-2 block, and the last block.
    num_blocks = len(features) - 2
    self._taps = [i - 1 for i in range(1, num_blocks + 1) if strides[i] == 2] + [num_blocks]
    self.dsn = dsn
    if dsn:
      self.side = nn.ModuleList(SideHeadTorch([channels[i]], num_classes, fuse_channels) for i in self._taps)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    tapped = []
    for i, module in enumerate(self.features):
      x = module(x)
      if i in self._taps:
        tapped.append(x)
    x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
    heads = [side([t]) for side, t in zip(self.side, tapped)] if self.dsn else []
    return (*heads, self.classifier(x))
