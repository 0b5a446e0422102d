"""DSN-VGG16-BN (Hu et al. 2021, Fig. 2) and its VGG16-BN baseline as Flax linen modules.

Layouts are NHWC. Everything that must match torchvision's `vgg16_bn` number for
number (BatchNorm running statistics, adaptive pooling windows, NCHW flattening
before the first Linear) is implemented here explicitly, so that PyTorch
weights load unchanged and logits agree with the PyTorch reference.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision's `vgg16_bn` ("D" configuration): convolutions per stage and their widths.
VGG16_STAGES: tuple[int, ...] = (2, 2, 3, 3, 3)
VGG16_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
SIDE_CHANNELS = 21  # RCF-style side output width
POOLED_SIZE = 7

# Initialisers as torchvision's VGG: kaiming-normal(fan_out, relu) convs, N(0, 0.01) Linear.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.normal(0.01)


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int = POOLED_SIZE) -> np.ndarray:
  """Averaging matrix (out_size, in_size) with PyTorch AdaptiveAvgPool semantics.

  Cell i averages rows floor(i*H/out) .. ceil((i+1)*H/out) - 1, which also
  covers H < out (overlapping windows) exactly as torch does.
  """
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_size: int = POOLED_SIZE) -> jax.Array:
  """AdaptiveAvgPool2d((out, out)) on an NHWC array."""
  h, w = x.shape[1:3]
  if h == out_size and w == out_size:
    return x
  ph = jnp.asarray(adaptive_pool_matrix(h, out_size), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(w, out_size), x.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


def flatten_nchw(x: jax.Array) -> jax.Array:
  """Flatten NHWC features in NCHW order, as torch.flatten does on its layout."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


_SAME_3X3 = ((1, 1), (1, 1))


def _conv3x3(x: jax.Array, w: jax.Array, precision) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), _SAME_3X3, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_matmul_grads(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
  """A 3x3, stride 1, 'same' NHWC convolution whose gradients avoid XLA:CPU's slow backward convolutions.

  The input gradient is a forward convolution of dy with the kernel flipped and
  its channels swapped; the weight gradient is 9 matmuls of shifted input
  windows against dy (benchmarks/conv_grads.py measures both against XLA's own).
  """
  return _conv3x3(x, w, precision)


def _conv3x3_fwd(x, w, precision):
  return _conv3x3(x, w, precision), (x, w)


def _conv3x3_bwd(precision, residuals, dy):
  x, w = residuals
  dx = _conv3x3(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), precision)
  n, h, wd, ci = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dy2 = dy.reshape(n * h * wd, -1)
  acc = jnp.promote_types(dy.dtype, jnp.float32)
  dw = jnp.stack([
      jnp.matmul(xp[:, i:i + h, j:j + wd, :].reshape(n * h * wd, ci).T, dy2, precision=precision,
                 preferred_element_type=acc)
      for i in range(3) for j in range(3)])
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


conv3x3_matmul_grads.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` for nn.Conv, routing 3x3 'same' convolutions to `conv3x3_matmul_grads`."""
  plain = (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
           and [tuple(p) for p in padding] == list(_SAME_3X3) and not any(d != 1 for d in lhs_dilation or ())
           and not any(d != 1 for d in rhs_dilation or ()) and feature_group_count == 1 and not kwargs
           and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if plain:
    return conv3x3_matmul_grads(lhs, rhs, precision)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision=precision, **kwargs)


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's exact semantics and cross-device statistics.

  Differs from `flax.linen.BatchNorm` in one place that matters for parity:
  the running variance is updated with the *unbiased* batch variance, as torch
  does. With `axis_name` set (inside pmap), batch statistics are averaged over
  that axis, so an N-device step equals one step on the global batch.
  """

  momentum: float = 0.9  # flax convention: torch momentum 0.1
  epsilon: float = 1e-5
  axis_name: str | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), self.param_dtype)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), self.param_dtype)
    if not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      # Statistics in at least float32, whatever the compute dtype.
      xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(x.ndim - 1))
      count = np.prod([x.shape[a] for a in axes])
      mean = jnp.mean(xf, axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype))


class SideHead(nn.Module):
  """Side output of one stage: summed 21-channel 1x1 convs, fuse, 7x7 pool, Linear."""

  num_classes: int
  fuse_channels: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, activations: Sequence[jax.Array]) -> jax.Array:
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=linear_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    side = sum(conv(SIDE_CHANNELS, name=f"conv{j + 1}")(a) for j, a in enumerate(activations))
    pooled = flatten_nchw(adaptive_avg_pool(conv(self.fuse_channels, name="fuse")(side)))
    return nn.Dense(self.num_classes, kernel_init=linear_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc")(pooled)


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
  # Gradients of the 3x3 convs via `conv3x3_matmul_grads`; None = on CPU only (XLA's are fast elsewhere).
  matmul_conv_grads: bool | None = None

  @property
  def num_heads(self) -> int:
    return len(self.stages) + 1 if self.dsn else 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[1] < 32 or x.shape[3] not in (1, 3):
      raise ValueError(
          f"Expected NHWC input with H == W >= 32 and 1 or 3 channels, got shape {x.shape}.")
    x = x.astype(self.dtype)
    matmul_grads = jax.default_backend() == "cpu" if self.matmul_conv_grads is None else self.matmul_conv_grads
    conv_fn = conv_general_dilated if matmul_grads else None
    heads = []
    for s, (n_convs, width) in enumerate(zip(self.stages, self.widths), start=1):
      acts = []
      for j in range(1, n_convs + 1):
        x = nn.Conv(width, (3, 3), padding=1, kernel_init=conv_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, conv_general_dilated=conv_fn, name=f"conv{s}_{j}")(x)
        x = BatchNorm(axis_name=self.axis_name, param_dtype=self.param_dtype, name=f"bn{s}_{j}")(x, train)
        x = nn.relu(x)
        acts.append(x)
      if self.dsn:
        heads.append(SideHead(self.num_classes, self.fuse_channels, self.dtype, self.param_dtype,
                              name=f"side{s}")(acts))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = flatten_nchw(adaptive_avg_pool(x))
    dense: Callable[..., nn.Dense] = functools.partial(
        nn.Dense, kernel_init=linear_init, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(self.hidden, name="fc6")(x)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(self.hidden, name="fc7")(x)))
    heads.append(dense(self.num_classes, name="fc8")(x))
    # Logits leave the model in at least float32, where the loss is computed.
    return tuple(h.astype(jnp.promote_types(h.dtype, jnp.float32)) for h in heads)


def predict_probs(heads: Sequence[jax.Array], eval_head: str = "final") -> jax.Array:
  """Class probabilities from the heads: the final head, or the mean of all softmaxes."""
  if eval_head == "final":
    return jax.nn.softmax(heads[-1], axis=-1)
  if eval_head == "mean":
    return jnp.mean(jnp.stack([jax.nn.softmax(h, axis=-1) for h in heads]), axis=0)
  raise ValueError(f"eval_head must be 'final' or 'mean', got {eval_head!r}.")


def count_params(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
