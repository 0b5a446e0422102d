"""Backbones with optional deep supervision, found by name.

Every model is a Flax module built as `get_model(name, num_classes=..., dsn=...,
**kwargs)`. It returns its heads as a tuple (side heads shallow to deep, then
the final classifier), has `num_heads`, and describes its torchvision
state_dict layout through `torch_layers()`, `torch_first_conv`, `classifier`
and `min_size`, so training, conversion, prediction and reports never name
an architecture. Adding a backbone is one new family module and one
`register` call.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from dsn_saal_jax.models.heads import SideHead, predict_probs, side_head_torch_layers
from dsn_saal_jax.models.layers import (POOLED_SIZE, SIDE_CHANNELS, BatchNorm, adaptive_avg_pool,
                                        adaptive_pool_matrix, batch_norm_train, channel_sum, conv1x1_as_dot,
                                        count_params, flatten_nchw, max_pool_2x2, relu)
from dsn_saal_jax.models.vgg import (VGG16_STAGES, VGG16_TINY_HIDDEN, VGG16_TINY_WIDTHS, VGG16_WIDTHS,
                                    DSNVGG16BN, _vgg16_bn_tiny)
from dsn_saal_jax.models.densenet import DenseNet, _densenet_tiny, densenet169
from dsn_saal_jax.models.mobilenet_v2 import MobileNetV2, _mobilenet_v2_tiny, mobilenet_v2
from dsn_saal_jax.models.resnet import ResNet, _resnet_tiny, resnet50, resnext50_32x4d

AXIS = "batch"  # the pmap axis over which BatchNorm averages its batch statistics in training
DEFAULT_BACKBONE = "vgg16_bn"  # what configs, checkpoints and specs from before other backbones existed hold
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {}


def register(name: str, builder: Callable[..., nn.Module], config_fields: tuple[str, ...] = ()) -> None:
  """Makes `builder(num_classes=..., dsn=..., **kwargs)` available as `get_model(name, ...)`.

  `config_fields`: `config.model` keys the builder takes as keyword
  arguments beyond the common ones (VGG's widths, stages, hidden, dropout).
  """
  if name in _REGISTRY:
    raise ValueError(f"A backbone is already registered under the name {name!r}.")
  _REGISTRY[name] = builder
  _CONFIG_FIELDS[name] = tuple(config_fields)


def config_fields(name: str) -> tuple[str, ...]:
  """The config.model keys that shape backbone `name` (they go into checkpoints' model fingerprint)."""
  get_model_builder(name)
  return _CONFIG_FIELDS[name]


def config_kwargs(config: Any) -> dict[str, Any]:
  """The keyword arguments `config.backbone`'s builder takes from a training config's `config.model` block
  (sequences as tuples); the common ones (dsn, fuse_channels) are the caller's."""
  block = config.model
  return {k: tuple(block[k]) if isinstance(block[k], (tuple, list)) else block[k]
          for k in config_fields(config.get("backbone", DEFAULT_BACKBONE))}


def get_model_builder(name: str) -> Callable[..., nn.Module]:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown backbone {name!r}; choose one of {list_models()}.")
  return _REGISTRY[name]


def list_models() -> list[str]:
  return sorted(_REGISTRY)


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """The backbone `name` (see `list_models()`) built with `kwargs`."""
  return get_model_builder(name)(**kwargs)


def create_model(config: Any, num_classes: int, axis_name: str | None = AXIS) -> nn.Module:
  """The model a training config (or a checkpoint's inference spec, whose `model` has the same fields) names.

  `config.backbone` (default VGG16-BN), with side heads when `config.model.dsn`;
  `axis_name=None` outside pmap (prediction, reports).
  """
  return get_model(
      config.get("backbone", DEFAULT_BACKBONE), num_classes=num_classes, dsn=config.model.dsn,
      fuse_channels=config.model.fuse_channels, axis_name=axis_name, dtype=jnp.dtype(config.compute_dtype),
      **config_kwargs(config))


register("vgg16_bn", DSNVGG16BN, config_fields=("widths", "stages", "hidden", "dropout_rate"))
register("vgg16_bn_tiny", _vgg16_bn_tiny, config_fields=("dropout_rate",))  # used for testing only
register("resnet50", resnet50, config_fields=("width_scale",))
register("resnext50_32x4d", resnext50_32x4d, config_fields=("width_scale",))
register("resnet_tiny", _resnet_tiny)  # used for testing only
register("densenet169", densenet169, config_fields=("width_scale",))
register("densenet_tiny", _densenet_tiny)  # used for testing only
register("mobilenet_v2", mobilenet_v2, config_fields=("width_scale",))
register("mobilenet_v2_tiny", _mobilenet_v2_tiny)  # used for testing only
