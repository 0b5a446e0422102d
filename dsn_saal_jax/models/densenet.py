"""DenseNet-169 (Huang et al. 2017) as torchvision builds it, with optional RCF-style deep supervision.

Layouts are NHWC; parameters, state_dict keys (`features.denseblock{i}.denselayer{j}.conv2.weight`, ...),
initialisation and every pooling window are torchvision's `densenet169`, so its weights load unchanged
and logits agree with `dsn_saal_jax.torch_reference.DenseNetTorch`.

Deep supervision taps (side heads `side1..side5`, then the final classifier):
  side1  the stem after `relu0` (before `pool0`): 64 channels at stride 2;
  side2..side5  each dense block's last layer's new features (its `conv2` output, `growth_rate` = 32
         channels), inside the block's output and before its transition; for the 4th block before
         `norm5` and the final ReLU, like the other three.
Why these taps: the paper's Table 4 gives DenseNet-169 12.48 M parameters and DSN-DenseNet-169
12.49 M (1 input channel, 3 classes). A SideHead with one tap of C channels costs
21*C + 21 (1x1 conv) + 22 (fuse) + 49*3 + 3 (fc) = 21*C + 193. Counted (see the tests):
  baseline, 1 channel, 3 classes:                      12,483,203 -> 12.48 M (matches Table 4)
  + whole block outputs (64, 256, 512, 1280, 1664):  + 80,261  = 12,563,464 -> 12.56 M
  + every dense layer's new features (82 x 32) + stem: + 59,051 -> 12.54 M
  + stem + last layer's new features (64, 4 x 32):   +  4,997  = 12,488,200 -> 12.49 M (chosen)
  + last layer's new features only (4 x 32):          +  3,460  = 12,486,663 -> 12.49 M
Only the growth-sized taps fit 12.49 M (the increment must lie in [1,797, 11,797) to round to it);
with 21-channel RCF convs on whole block outputs no choice does. Table 4 cannot tell the two fitting
choices apart, nor from a non-RCF head (one 1-channel 1x1 conv per whole block output, +4,531); we
keep the RCF head every backbone shares and the stem tap the project's other families have.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsn_saal_jax.models.heads import SideHead, side_head_torch_layers
from dsn_saal_jax.models.layers import BatchNorm, check_input, conv1x1_as_dot, mark_cam, relu

# torchvision's DenseNet init: kaiming_normal_ with its defaults (fan_in, gain sqrt(2)) for convs, and
# nn.Linear's default weight init, kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
torch_linear_default = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

DENSENET169_BLOCKS: tuple[int, ...] = (6, 12, 32, 32)


def max_pool_3x3_s2_p1(x: jax.Array) -> jax.Array:
  """MaxPool2d(3, stride=2, padding=1): torch pads with -inf on every side, which 'SAME' does not."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """AvgPool2d(2, stride=2) (floor mode: an odd last row/column is dropped) as a reshape and a mean."""
  n, h, w, c = x.shape
  return jnp.mean(x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c), (2, 4))


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv to bn_size*growth, BN-ReLU-3x3 conv to growth; returns only the new features."""

  growth_rate: int
  bn_size: int
  axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_normal_fan_in, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(BatchNorm, axis_name=self.axis_name, param_dtype=self.param_dtype)
    x = relu(norm(name="norm1")(x, train))
    x = conv(self.bn_size * self.growth_rate, (1, 1), conv_general_dilated=conv1x1_as_dot, name="conv1")(x)
    x = relu(norm(name="norm2")(x, train))
    return conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(x)


class DenseBlock(nn.Module):
  """`num_layers` DenseLayers, each fed the concatenation of the block input and all earlier outputs.

  Returns (the block output: everything concatenated along channels, the last layer's new features).
  The concatenation grows by one layer's features at a time (as torchvision's first DenseNet did; today's
  concatenates the whole list for every layer): the same values, but the gradient then has one
  slice per layer instead of one per pair of layers, which compiles in a fraction of the time.
  """

  num_layers: int
  growth_rate: int
  bn_size: int
  axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    new = x
    for j in range(1, self.num_layers + 1):
      new = DenseLayer(self.growth_rate, self.bn_size, self.axis_name, self.dtype, self.param_dtype,
                       name=f"denselayer{j}")(x, train)
      x = jnp.concatenate([x, new], axis=-1)
    return x, new


class Transition(nn.Module):
  """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""

  features: int
  axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = relu(BatchNorm(axis_name=self.axis_name, param_dtype=self.param_dtype, name="norm")(x, train))
    x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=kaiming_normal_fan_in, dtype=self.dtype,
                param_dtype=self.param_dtype, conv_general_dilated=conv1x1_as_dot, name="conv")(x)
    return avg_pool_2x2(x)


class DenseNet(nn.Module):
  """DenseNet-BC with RCF-style deep supervision: side heads on the stem and each dense block, then final.

  `dsn=False` gives torchvision's DenseNet (only the final head). See the module docstring for where
  the side heads tap. drop_rate is torchvision's default 0 (no dropout in dense layers).
  """

  num_classes: int
  dsn: bool = True
  fuse_channels: int = 1
  growth_rate: int = 32
  block_config: Sequence[int] = DENSENET169_BLOCKS
  num_init_features: int = 64
  bn_size: int = 4
  axis_name: str | None = None
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for mixed precision)
  param_dtype: Any = jnp.float32

  torch_first_conv: ClassVar[str] = "features.conv0.weight"
  classifier: ClassVar[str] = "classifier"
  min_size: ClassVar[int] = 32

  @property
  def num_heads(self) -> int:
    return len(self.block_config) + 2 if self.dsn else 1

  def torch_layers(self) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(torch module prefix, flax module path, kind) per layer: torchvision's DenseNet keys.

    Side heads are `side.{s}.{convs.0,fuse,fc}`: s = 0 the stem, s = i dense block i.
    """
    yield "features.conv0", ("conv0",), "conv_nobias"
    yield "features.norm0", ("norm0",), "bn"
    if self.dsn:
      yield from side_head_torch_layers("side.0", "side1", 1)
    for i, num_layers in enumerate(self.block_config, start=1):
      for j in range(1, num_layers + 1):
        prefix, path = f"features.denseblock{i}.denselayer{j}", (f"denseblock{i}", f"denselayer{j}")
        yield f"{prefix}.norm1", (*path, "norm1"), "bn"
        yield f"{prefix}.conv1", (*path, "conv1"), "conv_nobias"
        yield f"{prefix}.norm2", (*path, "norm2"), "bn"
        yield f"{prefix}.conv2", (*path, "conv2"), "conv_nobias"
      if self.dsn:
        yield from side_head_torch_layers(f"side.{i}", f"side{i + 1}", 1)
      if i != len(self.block_config):
        yield f"features.transition{i}.norm", (f"transition{i}", "norm"), "bn"
        yield f"features.transition{i}.conv", (f"transition{i}", "conv"), "conv_nobias"
    yield "features.norm5", ("norm5",), "bn"
    yield "classifier", ("classifier",), "linear"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    check_input(x, self.min_size, type(self).__name__)
    x = x.astype(self.dtype)
    side = functools.partial(SideHead, self.num_classes, self.fuse_channels, self.dtype, self.param_dtype)
    norm = functools.partial(BatchNorm, axis_name=self.axis_name, param_dtype=self.param_dtype)
    heads = []
    x = nn.Conv(self.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=kaiming_normal_fan_in, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv0")(x)
    x = relu(norm(name="norm0")(x, train))
    if self.dsn:
      heads.append(side(name="side1")([x]))
    x = max_pool_3x3_s2_p1(x)
    channels = self.num_init_features
    for i, num_layers in enumerate(self.block_config, start=1):
      x, newest = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.axis_name, self.dtype,
                             self.param_dtype, name=f"denseblock{i}")(x, train)
      if self.dsn:
        heads.append(side(name=f"side{i + 1}")([newest]))
      channels += num_layers * self.growth_rate
      if i != len(self.block_config):
        channels //= 2
        x = Transition(channels, self.axis_name, self.dtype, self.param_dtype, name=f"transition{i}")(x, train)
    x = mark_cam(self, relu(norm(name="norm5")(x, train)))
    x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d((1, 1)) and flatten
    heads.append(nn.Dense(self.num_classes, kernel_init=torch_linear_default, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="classifier")(x))
    # Logits leave the model in at least float32, where the loss is computed.
    return tuple(h.astype(jnp.promote_types(h.dtype, jnp.float32)) for h in heads)


def _densenet(growth_rate: int, block_config: Sequence[int], num_init_features: int, num_classes: int,
              dsn: bool, **kwargs: Any) -> DenseNet:
  return DenseNet(num_classes=num_classes, dsn=dsn, growth_rate=growth_rate, block_config=tuple(block_config),
                  num_init_features=num_init_features, **kwargs)


def densenet169(num_classes: int, dsn: bool = True, width_scale: float = 1.0, **kwargs: Any) -> DenseNet:
  """DenseNet-169 (torchvision's `densenet169`), with side heads unless `dsn=False`.

  Args:
    num_classes: outputs of every head.
    dsn: add the five side heads (see the module docstring).
    width_scale: scales the growth rate (32) and the stem's 64 channels (not torchvision's; for
      CPU-budget studies). The depth stays 169.
    **kwargs: further DenseNet fields (fuse_channels, axis_name, dtype, param_dtype).
  """
  return _densenet(max(1, round(32 * width_scale)), DENSENET169_BLOCKS, max(1, round(64 * width_scale)),
                   num_classes, dsn, **kwargs)


def _densenet_tiny(num_classes: int, dsn: bool = True, **kwargs: Any) -> DenseNet:
  """Used for testing only: one 4-channel dense layer per block, 8 stem channels."""
  return _densenet(4, (1, 1, 1, 1), 8, num_classes, dsn, **kwargs)
