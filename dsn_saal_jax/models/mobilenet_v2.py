"""MobileNetV2 (Sandler et al. 2018) as torchvision builds it, with optional RCF-style deep supervision.

Layouts are NHWC; parameters, state_dict keys (`features.{i}.conv.{k}...`, `classifier.1`),
initialisation and padding are torchvision's `mobilenet_v2`, so its weights load unchanged and logits
agree with `dsn_saal_jax.torch_reference.MobileNetV2Torch`. Depthwise convolutions are grouped convs
(`feature_group_count`); ReLU6 has torch's gradient (0 at exactly 0 and 6).

Deep supervision taps: one side head per resolution stage, on the output of the stage's last
inverted-residual block (a linear bottleneck, before the next stage's expansion):
  side1  features.1  (16 channels, stride 2)     side4  features.13 (96 channels, stride 16)
  side2  features.3  (24 channels, stride 4)     side5  features.17 (320 channels, stride 32)
  side3  features.6  (32 channels, stride 8)
At stride 32 the 320-channel block output is tapped, not features.18 (the 1x1 conv to 1280 that the
final head pools), so that every side sees a block output and the final head keeps a layer of its
own. The paper's Table 4 has no MobileNetV2 row to check this against. Cost, one SideHead of C
channels being 21*C + 21 + 22 + 49*K + K for K classes: 21 * (16 + 24 + 32 + 96 + 320) + 5 * 43
+ 5 * 50 * K = 10,463 + 250*K, i.e. +11,213 at 3 classes: 2,227,139 -> 2,238,352 at 1 input
channel (2.23 M -> 2.24 M), 2,227,715 -> 2,238,928 at 3; at 1000 classes and 3 channels
torchvision's 3,504,872 -> 3,765,335.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsn_saal_jax.models.heads import SideHead, side_head_torch_layers
from dsn_saal_jax.models.layers import BatchNorm, check_input, conv1x1_as_dot, conv_init, linear_init, mark_cam

MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# Used for testing only: one block per row but two in the second (a t=6 residual), the 96-channel row
# dropped; still five resolution stages.
MOBILENET_V2_TINY_SETTING: tuple[tuple[int, int, int, int], ...] = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 1, 2),
    (6, 64, 1, 2),
    (6, 160, 1, 2),
)

STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
  """torchvision's `_make_divisible`: the nearest multiple of `divisor`, never below 90% of `v`."""
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


@jax.custom_jvp
def relu6(x: jax.Array) -> jax.Array:
  """min(max(x, 0), 6) as selects (stored once by XLA:CPU, like `layers.relu`); NaN propagates."""
  return jnp.where(x < 0, jnp.zeros_like(x), jnp.where(x > 6, jnp.full_like(x, 6), x))


# torch's hardtanh backward: no gradient at or beyond 0 and 6 (so a NaN input passes it, as in torch).
relu6.defjvps(lambda g, ans, x: jnp.where((x <= 0) | (x >= 6), jnp.zeros_like(g), g))


class InvertedResidual(nn.Module):
  """Expand (1x1, unless t == 1), depthwise 3x3 with the stride, linear 1x1 projection; residual if shapes allow."""

  out_channels: int
  stride: int
  expand_ratio: int
  axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    pointwise = functools.partial(conv, kernel_size=(1, 1), conv_general_dilated=conv1x1_as_dot)
    norm = functools.partial(BatchNorm, axis_name=self.axis_name, param_dtype=self.param_dtype)
    in_channels = x.shape[-1]
    hidden = int(round(in_channels * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = relu6(norm(name="expand_bn")(pointwise(hidden, name="expand")(y), train))
    y = conv(hidden, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
             feature_group_count=hidden, name="depthwise")(y)
    y = relu6(norm(name="depthwise_bn")(y, train))
    y = norm(name="project_bn")(pointwise(self.out_channels, name="project")(y), train)
    return x + y if self.stride == 1 and in_channels == self.out_channels else y


class MobileNetV2(nn.Module):
  """MobileNetV2 with RCF-style deep supervision: one side head per resolution stage, then final.

  `dsn=False` gives torchvision's MobileNetV2 (only the final head). See the module docstring for
  where the side heads tap.
  """

  num_classes: int
  dsn: bool = True
  fuse_channels: int = 1
  width_mult: float = 1.0
  inverted_residual_setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING
  round_nearest: int = 8
  dropout_rate: float = 0.2
  axis_name: str | None = None
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for mixed precision)
  param_dtype: Any = jnp.float32

  torch_first_conv: ClassVar[str] = "features.0.0.weight"
  classifier: ClassVar[str] = "classifier"
  min_size: ClassVar[int] = 32

  def blocks(self) -> list[tuple[int, int, int]]:
    """(expand ratio t, output channels, stride) of each inverted-residual block, features.1 onwards."""
    out = []
    for t, c, n, s in self.inverted_residual_setting:
      channels = make_divisible(c * self.width_mult, self.round_nearest)
      out += [(t, channels, s if i == 0 else 1) for i in range(n)]
    return out

  def side_taps(self) -> list[int]:
    """Indices into torchvision's `features` whose outputs feed the side heads (0 is the stem).

    The last block before each stride-2 block, and the last block: one per resolution stage.
    """
    blocks = self.blocks()
    return [i for i, (_, _, s) in enumerate(blocks) if s == 2] + [len(blocks)]

  @property
  def num_heads(self) -> int:
    return len(self.side_taps()) + 1 if self.dsn else 1

  def torch_layers(self) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(torch module prefix, flax module path, kind) per layer: torchvision's MobileNetV2 keys.

    Side heads are `side.{s}.{convs.0,fuse,fc}`, s = 0.. from the shallowest tap.
    """
    taps = self.side_taps()
    yield "features.0.0", ("stem",), "conv_nobias"
    yield "features.0.1", ("stem_bn",), "bn"
    blocks = self.blocks()
    for i, (t, _, _) in enumerate(blocks, start=1):
      names = ("expand", "depthwise", "project") if t != 1 else ("depthwise", "project")
      prefix, path = f"features.{i}.conv", (f"block{i}",)
      for k, name in enumerate(names[:-1]):
        yield f"{prefix}.{k}.0", (*path, name), "conv_nobias"
        yield f"{prefix}.{k}.1", (*path, f"{name}_bn"), "bn"
      yield f"{prefix}.{len(names) - 1}", (*path, "project"), "conv_nobias"
      yield f"{prefix}.{len(names)}", (*path, "project_bn"), "bn"
    yield f"features.{len(blocks) + 1}.0", ("last",), "conv_nobias"
    yield f"features.{len(blocks) + 1}.1", ("last_bn",), "bn"
    if self.dsn:
      for s in range(len(taps)):
        yield from side_head_torch_layers(f"side.{s}", f"side{s + 1}", 1)
    yield "classifier.1", ("classifier",), "linear"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    check_input(x, self.min_size, type(self).__name__)
    x = x.astype(self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(BatchNorm, axis_name=self.axis_name, param_dtype=self.param_dtype)
    taps = self.side_taps()
    stem = make_divisible(STEM_CHANNELS * self.width_mult, self.round_nearest)
    x = conv(stem, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="stem")(x)
    x = relu6(norm(name="stem_bn")(x, train))
    tapped = [x] if 0 in taps else []
    for i, (t, channels, stride) in enumerate(self.blocks(), start=1):
      x = InvertedResidual(channels, stride, t, self.axis_name, self.dtype, self.param_dtype, name=f"block{i}")(
          x, train)
      if i in taps:
        tapped.append(x)
    heads = []
    if self.dsn:
      heads = [SideHead(self.num_classes, self.fuse_channels, self.dtype, self.param_dtype, name=f"side{s}")([a])
               for s, a in enumerate(tapped, start=1)]
    last = make_divisible(LAST_CHANNELS * max(1.0, self.width_mult), self.round_nearest)
    x = conv(last, (1, 1), conv_general_dilated=conv1x1_as_dot, name="last")(x)
    x = mark_cam(self, relu6(norm(name="last_bn")(x, train)))
    x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d((1, 1)) and flatten
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    heads.append(nn.Dense(self.num_classes, kernel_init=linear_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="classifier")(x))
    # Logits leave the model in at least float32, where the loss is computed.
    return tuple(h.astype(jnp.promote_types(h.dtype, jnp.float32)) for h in heads)


def _mobilenet_v2(setting: Sequence[Sequence[int]], width_mult: float, num_classes: int, dsn: bool,
                  **kwargs: Any) -> MobileNetV2:
  return MobileNetV2(num_classes=num_classes, dsn=dsn, inverted_residual_setting=tuple(map(tuple, setting)),
                     width_mult=width_mult, **kwargs)


def mobilenet_v2(num_classes: int, dsn: bool = True, width_mult: float = 1.0, width_scale: float = 1.0,
                 **kwargs: Any) -> MobileNetV2:
  """MobileNetV2 (torchvision's `mobilenet_v2`), with side heads unless `dsn=False`.

  Args:
    num_classes: outputs of every head.
    dsn: add the five side heads (see the module docstring).
    width_mult: channel multiplier, rounded with `make_divisible` as torchvision does.
    width_scale: the training config's name for it (config.model.width_scale); the two multiply.
    **kwargs: further MobileNetV2 fields (dropout_rate, round_nearest, fuse_channels, axis_name,
      dtype, param_dtype).
  """
  return _mobilenet_v2(MOBILENET_V2_SETTING, width_mult * width_scale, num_classes, dsn, **kwargs)


def _mobilenet_v2_tiny(num_classes: int, dsn: bool = True, **kwargs: Any) -> MobileNetV2:
  """Used for testing only: quarter width, MOBILENET_V2_TINY_SETTING's six blocks."""
  return _mobilenet_v2(MOBILENET_V2_TINY_SETTING, 0.25, num_classes, dsn, **kwargs)
