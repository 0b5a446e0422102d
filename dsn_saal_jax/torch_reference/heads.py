"""The RCF-style side head in PyTorch, shared by every reference backbone.

Its state_dict keys are `convs.{j}`, `fuse` and `fc`, which the converter maps
to the Flax `SideHead`'s `conv{j+1}`, `fuse` and `fc`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsn_saal_jax.models import POOLED_SIZE, SIDE_CHANNELS


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
