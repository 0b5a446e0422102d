"""ResNet-50 and ResNeXt-50 (32x4d) with optional RCF-style deep supervision, as Flax linen modules.

The backbone is torchvision's `resnet50` / `resnext50_32x4d` (ResNet v1.5:
the stride sits on the 3x3 conv of a Bottleneck), NHWC, with torch's padding
written out (the stem's 7x7/2 conv pads 3, its 3x3/2 max-pool pads 1 with
-inf, never Flax's 'SAME'), so torchvision weights load unchanged and logits
match the PyTorch reference.

Deep supervision (`dsn=True`) taps one feature map per stage: stage 1 is the
stem's output after its ReLU (before the max-pool), stages 2-5 the outputs of
layer1..layer4 (each stage's last block). That is the choice the paper's
Table 4 parameter increments imply (1 input channel, 3 classes): each side
head costs 21*C + 21 (1x1 conv) + 22 (fuse) + 49*3 + 3 (Linear), so

  21*(64 + 256 + 512 + 1024 + 2048) + 5*(21 + 22 + 49*3 + 3) = 82,949,

ResNet-50 23,507,907 -> 23,590,856 (23.51 -> 23.59 M) and ResNeXt-50
22,979,779 -> 23,062,728 (22.98 -> 23.06 M), as reported. Tapping every
block output instead would add ~0.32 M (23.83 M), which the paper does not
report. Six heads in all: side1..side5, then `fc`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsn_saal_jax.models.heads import SideHead, side_head_torch_layers
from dsn_saal_jax.models.layers import BatchNorm, check_input, conv1x1_as_dot, conv_init, mark_cam, relu

ModuleDef = Any

# torchvision's resnet50 / resnext50_32x4d: Bottleneck blocks per stage (layer1..layer4).
RESNET50_STAGES: tuple[int, ...] = (3, 4, 6, 3)

# torch.nn.Linear's default init (kaiming_uniform, a=sqrt(5)): weight U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def max_pool_3x3_s2_p1(x: jax.Array) -> jax.Array:
  """MaxPool2d(3, stride=2, padding=1) on NHWC: torch pads with -inf, so a pad never wins."""
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1 -> 3x3 (stride, groups) -> 1x1 (x4), plus a projection when shapes change.

  Like torchvision (ResNet v1.5) and unlike the original paper, the stride
  sits on the 3x3 conv, not the first 1x1. The 3x3 conv's width is
  `int(planes * width_per_group / 64) * groups` (ResNeXt-50 32x4d: 128 at
  layer1). Module names are torchvision's (`conv1`, `bn1`, ...), with
  `downsample.0` / `.1` as `downsample_conv` / `downsample_bn`.
  """

  planes: int
  conv: ModuleDef
  norm: ModuleDef
  stride: int = 1
  groups: int = 1
  width_per_group: int = 64
  downsample: bool = False

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    # Stride-1 ungrouped 1x1 convs as a dot over channels (same function; conv1x1_as_dot refuses anything else).
    conv1x1 = functools.partial(self.conv, kernel_size=(1, 1), padding=0, conv_general_dilated=conv1x1_as_dot)
    y = relu(self.norm(name="bn1")(conv1x1(width, name="conv1")(x), train))
    y = self.conv(width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), feature_group_count=self.groups,
                  name="conv2")(y)
    y = relu(self.norm(name="bn2")(y, train))
    y = self.norm(name="bn3")(conv1x1(self.planes * self.expansion, name="conv3")(y), train)
    if self.downsample:
      project = conv1x1 if self.stride == 1 else functools.partial(
          self.conv, kernel_size=(1, 1), strides=self.stride, padding=0)
      x = self.norm(name="downsample_bn")(project(self.planes * self.expansion, name="downsample_conv")(x), train)
    return relu(y + x)


class BlockSpec(NamedTuple):
  stage: int  # 1..4 (torchvision's layer1..layer4)
  index: int  # block within the stage
  planes: int
  stride: int
  downsample: bool


class ResNet(nn.Module):
  """torchvision's ResNet with Bottleneck blocks and optional side heads: six heads (side 1..5, final) or `fc` only.

  `stage_sizes`, `groups` and `width_per_group` select ResNet-50 or
  ResNeXt-50; `width` (the stem's channels and layer1's planes, 64 in
  torchvision) exists for small test variants. Init is torchvision's:
  kaiming-normal (fan_out, relu) convs, BN 1/0, torch-default Linear,
  `zero_init_residual=False`.
  """

  num_classes: int
  dsn: bool = True
  fuse_channels: int = 1
  stage_sizes: Sequence[int] = RESNET50_STAGES
  groups: int = 1
  width_per_group: int = 64
  width: int = 64
  axis_name: str | None = None
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for mixed precision)
  param_dtype: Any = jnp.float32

  # What the shared converter and the checks need to know of this family.
  torch_first_conv: ClassVar[str] = "conv1.weight"
  classifier: ClassVar[str] = "fc"
  min_size: ClassVar[int] = 32

  @property
  def num_heads(self) -> int:
    return len(self.stage_sizes) + 2 if self.dsn else 1  # the stem, each stage, the final fc

  def blocks(self) -> Iterator[BlockSpec]:
    """Every Bottleneck in order, as torchvision's `_make_layer` builds them."""
    inplanes = self.width
    for stage, n_blocks in enumerate(self.stage_sizes, start=1):
      planes = self.width * 2 ** (stage - 1)
      for index in range(n_blocks):
        stride = 2 if stage > 1 and index == 0 else 1
        downsample = index == 0 and (stride != 1 or inplanes != planes * Bottleneck.expansion)
        yield BlockSpec(stage, index, planes, stride, downsample)
        inplanes = planes * Bottleneck.expansion

  def torch_layers(self) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(torch module prefix, flax module path, kind) per layer: torchvision's resnet keys.

    Side branches are `side.{s}.{convs.0,fuse,fc}` (s = 0 for the stem, i for layer i).
    """
    yield "conv1", ("conv1",), "conv_nobias"
    yield "bn1", ("bn1",), "bn"
    if self.dsn:
      yield from side_head_torch_layers("side.0", "side1", 1)
    for b in self.blocks():
      torch_block, flax_block = f"layer{b.stage}.{b.index}", f"layer{b.stage}_{b.index}"
      for j in (1, 2, 3):
        yield f"{torch_block}.conv{j}", (flax_block, f"conv{j}"), "conv_nobias"
        yield f"{torch_block}.bn{j}", (flax_block, f"bn{j}"), "bn"
      if b.downsample:
        yield f"{torch_block}.downsample.0", (flax_block, "downsample_conv"), "conv_nobias"
        yield f"{torch_block}.downsample.1", (flax_block, "downsample_bn"), "bn"
      if self.dsn and b.index == self.stage_sizes[b.stage - 1] - 1:
        yield from side_head_torch_layers(f"side.{b.stage}", f"side{b.stage + 1}", 1)
    yield "fc", ("fc",), "linear"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    check_input(x, self.min_size, type(self).__name__)
    x = x.astype(self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(BatchNorm, axis_name=self.axis_name, param_dtype=self.param_dtype)
    side = functools.partial(SideHead, self.num_classes, self.fuse_channels, self.dtype, self.param_dtype)
    heads = []

    x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1")(x)
    x = relu(norm(name="bn1")(x, train))
    if self.dsn:
      heads.append(side(name="side1")([x]))
    x = max_pool_3x3_s2_p1(x)
    for b in self.blocks():
      x = Bottleneck(b.planes, conv, norm, b.stride, self.groups, self.width_per_group, b.downsample,
                     name=f"layer{b.stage}_{b.index}")(x, train)
      if self.dsn and b.index == self.stage_sizes[b.stage - 1] - 1:
        heads.append(side(name=f"side{b.stage + 1}")([x]))

    x = jnp.mean(mark_cam(self, x), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
    heads.append(nn.Dense(self.num_classes, kernel_init=torch_linear_kernel_init,
                          bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="fc")(x))
    # Logits leave the model in at least float32, where the loss is computed.
    return tuple(h.astype(jnp.promote_types(h.dtype, jnp.float32)) for h in heads)


def _resnet(stage_sizes: Sequence[int], *, num_classes: int, dsn: bool = True, **kwargs: Any) -> ResNet:
  """A ResNet with Bottleneck blocks; unknown `kwargs` are an error (ResNet's fields only)."""
  return ResNet(num_classes=num_classes, dsn=dsn, stage_sizes=tuple(stage_sizes), **kwargs)


def _overwrite_named_param(kwargs: dict[str, Any], name: str, value: Any) -> None:
  """Set `kwargs[name]`, refusing a caller's different value (torchvision's `_ovewrite_named_param`)."""
  if name in kwargs and kwargs[name] != value:
    raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")
  kwargs[name] = value


def _scaled_width(width_scale: float, kwargs: dict[str, Any]) -> None:
  """`width_scale` x torchvision's 64 stem channels and base planes (all stages follow), for CPU-budget runs."""
  if width_scale != 1.0:
    _overwrite_named_param(kwargs, "width", max(1, round(64 * width_scale)))


def resnet50(num_classes: int, dsn: bool = True, width_scale: float = 1.0, **kwargs: Any) -> ResNet:
  """torchvision's `resnet50` (25,557,032 parameters at 3 channels, 1000 classes) with optional side heads.

  `width_scale` < 1 narrows every stage (not torchvision's; for CPU-budget studies).
  """
  _scaled_width(width_scale, kwargs)
  return _resnet(RESNET50_STAGES, num_classes=num_classes, dsn=dsn, **kwargs)


def resnext50_32x4d(num_classes: int, dsn: bool = True, width_scale: float = 1.0, **kwargs: Any) -> ResNet:
  """torchvision's `resnext50_32x4d` (25,028,904 parameters): ResNet-50 with 32 groups of width 4.

  `width_scale` scales the planes; the 32 groups stay, each group narrower.
  """
  _scaled_width(width_scale, kwargs)
  _overwrite_named_param(kwargs, "groups", 32)
  _overwrite_named_param(kwargs, "width_per_group", 4)
  return _resnet(RESNET50_STAGES, num_classes=num_classes, dsn=dsn, **kwargs)


def _resnet_tiny(num_classes: int, dsn: bool = True, **kwargs: Any) -> ResNet:
  """Used for testing only: one Bottleneck per stage, stem width 8 (block outputs 32..256 channels)."""
  kwargs.setdefault("width", 8)
  return _resnet((1, 1, 1, 1), num_classes=num_classes, dsn=dsn, **kwargs)
