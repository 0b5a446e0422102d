"""PyTorch references with torchvision's module trees and state_dict keys, for parity and weight exchange.

Importing this package needs torch (the `test` extra); nothing else in
dsn_saal_jax does. `TORCH_MODELS` maps a backbone name to its reference class,
built as `cls(num_classes, in_channels=..., dsn=..., **kwargs)`.
"""

import functools

from dsn_saal_jax.torch_reference.heads import SideHeadTorch
from dsn_saal_jax.torch_reference.losses import saal_loss_torch
from dsn_saal_jax.torch_reference.resnet import ResNetTorch
from dsn_saal_jax.torch_reference.vgg import DSNVGG16BNTorch
from dsn_saal_jax.models.mobilenet_v2 import MOBILENET_V2_TINY_SETTING
from dsn_saal_jax.models.vgg import VGG16_TINY_HIDDEN, VGG16_TINY_WIDTHS
from dsn_saal_jax.torch_reference.densenet import DenseNetTorch
from dsn_saal_jax.torch_reference.mobilenet_v2 import MobileNetV2Torch

TORCH_MODELS = {"vgg16_bn": DSNVGG16BNTorch}
TORCH_MODELS["vgg16_bn_tiny"] = functools.partial(DSNVGG16BNTorch, widths=VGG16_TINY_WIDTHS, hidden=VGG16_TINY_HIDDEN)
TORCH_MODELS["resnet50"] = ResNetTorch
TORCH_MODELS["resnext50_32x4d"] = functools.partial(ResNetTorch, groups=32, width_per_group=4)
TORCH_MODELS["resnet_tiny"] = functools.partial(ResNetTorch, stage_sizes=(1, 1, 1, 1), width=8)
TORCH_MODELS["densenet169"] = DenseNetTorch
TORCH_MODELS["densenet_tiny"] = functools.partial(DenseNetTorch, growth_rate=4, block_config=(1, 1, 1, 1),
                                                  num_init_features=8)
TORCH_MODELS["mobilenet_v2"] = MobileNetV2Torch
TORCH_MODELS["mobilenet_v2_tiny"] = functools.partial(MobileNetV2Torch, width_mult=0.25,
                                                      inverted_residual_setting=MOBILENET_V2_TINY_SETTING)
