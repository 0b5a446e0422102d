"""DSN-VGG16-BN (Hu et al. 2021, Fig. 2) and its VGG16-BN baseline as Flax linen modules.

Layouts are NHWC. Everything that must match torchvision's `vgg16_bn` number for
number (BatchNorm running statistics, adaptive pooling windows, NCHW flattening
before the first Linear) is implemented here explicitly, so that PyTorch
weights load unchanged and logits agree with the PyTorch reference.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsn_saal_jax.models.heads import SideHead, side_head_torch_layers
from dsn_saal_jax.models.layers import (BatchNorm, adaptive_avg_pool, check_input, conv_init, flatten_nchw,
                                         linear_init, mark_cam, max_pool_2x2, relu)

# torchvision's `vgg16_bn` ("D" configuration): convolutions per stage and their widths.
VGG16_STAGES: tuple[int, ...] = (2, 2, 3, 3, 3)
VGG16_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)


def promote_dtype_bias_before_train_bn(*arrays: jax.Array | None, **kwargs) -> list[jax.Array | None]:
  """nn.Conv's dtype promotion, with the bias's gradient made the exact zero it is.

  A train-mode BatchNorm right after the conv subtracts the batch mean, which
  removes any per-channel constant: the bias cannot change the loss. Saying so
  spares XLA one reduction of each conv's output gradient per step (they ran
  as windowed reductions on CPU); the bias still moves the running mean.
  """
  inputs, kernel, bias = nn.dtypes.promote_dtype(*arrays, **kwargs)
  return [inputs, kernel, None if bias is None else jax.lax.stop_gradient(bias)]


class DSNVGG16BN(nn.Module):
  """VGG16-BN with RCF-style deep supervision: six heads (side 1..5, final).

  `dsn=False` gives the plain VGG16-BN baseline (only the final head). The
  `widths` and `hidden` arguments exist for small test/CPU variants; the
  defaults are torchvision's `vgg16_bn`.
  """

  num_classes: int
  dsn: bool = True
  fuse_channels: int = 1
  dropout_rate: float = 0.5
  stages: Sequence[int] = VGG16_STAGES
  widths: Sequence[int] = VGG16_WIDTHS
  hidden: int = 4096
  axis_name: str | None = None
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for mixed precision)
  param_dtype: Any = jnp.float32

  # What the shared converter and the checks need to know of this family.
  torch_first_conv: ClassVar[str] = "features.0.weight"
  classifier: ClassVar[str] = "fc8"
  min_size: ClassVar[int] = 32

  @property
  def num_heads(self) -> int:
    return len(self.stages) + 1 if self.dsn else 1

  def torch_layers(self) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(torch module prefix, flax module path, kind) per layer: torchvision's `vgg16_bn` keys.

    Side branches are `side.{s}.{convs.{j},fuse,fc}` (s, j from 0).
    """
    k = 0
    for s, n_convs in enumerate(self.stages, start=1):
      for j in range(1, n_convs + 1):
        yield f"features.{k}", (f"conv{s}_{j}",), "conv"
        yield f"features.{k + 1}", (f"bn{s}_{j}",), "bn"
        k += 3  # conv, bn, relu
      k += 1  # max-pool
      if self.dsn:
        yield from side_head_torch_layers(f"side.{s - 1}", f"side{s}", n_convs)
    for idx, name in ((0, "fc6"), (3, "fc7"), (6, "fc8")):
      yield f"classifier.{idx}", (name,), "linear"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    check_input(x, self.min_size, type(self).__name__)
    x = x.astype(self.dtype)
    heads = []
    promote_dtype = promote_dtype_bias_before_train_bn if train else nn.dtypes.promote_dtype
    for s, (n_convs, width) in enumerate(zip(self.stages, self.widths), start=1):
      acts = []
      for j in range(1, n_convs + 1):
        x = nn.Conv(width, (3, 3), padding=1, kernel_init=conv_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, promote_dtype=promote_dtype, name=f"conv{s}_{j}")(x)
        x = BatchNorm(axis_name=self.axis_name, param_dtype=self.param_dtype, name=f"bn{s}_{j}")(x, train)
        x = relu(x)
        acts.append(x)
      if self.dsn:
        heads.append(SideHead(self.num_classes, self.fuse_channels, self.dtype, self.param_dtype,
                              name=f"side{s}")(acts))
      x = max_pool_2x2(x)
    x = flatten_nchw(mark_cam(self, adaptive_avg_pool(x)))
    dense: Callable[..., nn.Dense] = functools.partial(
        nn.Dense, kernel_init=linear_init, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(self.hidden, name="fc6")(x)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(self.hidden, name="fc7")(x)))
    heads.append(dense(self.num_classes, name="fc8")(x))
    # Logits leave the model in at least float32, where the loss is computed.
    return tuple(h.astype(jnp.promote_types(h.dtype, jnp.float32)) for h in heads)


# Tests' VGG16-BN: every layer and head of the full model, 8-32 channels, a 64-unit classifier.
VGG16_TINY_WIDTHS: tuple[int, ...] = (8, 16, 16, 32, 32)
VGG16_TINY_HIDDEN = 64


def _vgg16_bn_tiny(num_classes: int, dsn: bool = True, **kwargs: Any) -> DSNVGG16BN:
  """Used for testing only: VGG16-BN's 13 convs and 5 side heads, VGG16_TINY_WIDTHS wide."""
  kwargs.setdefault("widths", VGG16_TINY_WIDTHS)
  kwargs.setdefault("hidden", VGG16_TINY_HIDDEN)
  return DSNVGG16BN(num_classes=num_classes, dsn=dsn, **kwargs)
