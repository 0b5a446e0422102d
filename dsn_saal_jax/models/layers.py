"""Shared layers with PyTorch semantics, used by every backbone; on CPU they run the forms in `cpu_kernels`.

Each is the same function as its torch counterpart (BatchNorm2d running
statistics, AdaptiveAvgPool2d windows, NCHW flattening, MaxPool2d(2, 2) ties),
so torchvision weights load unchanged and logits match the PyTorch references.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsn_saal_jax.models import cpu_kernels

SIDE_CHANNELS = 21  # RCF-style side output width
POOLED_SIZE = 7

# Initialisers as torchvision's VGG: kaiming-normal(fan_out, relu) convs, N(0, 0.01) Linear.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.normal(0.01)


def mark_cam(module: nn.Module, x: jax.Array) -> jax.Array:
  """Marks `x` (NHWC) as the model's Grad-CAM feature map; call it in the top-level `__call__`.

  Sows a copy into `intermediates` and adds a zero perturbation that
  `reporting.grad_cam` differentiates (Flax's `perturb`); both are no-ops
  unless a caller asks for them, and init creates no perturbation variable.
  """
  module.sow("intermediates", "cam", x)
  return x if module.is_initializing() else module.perturb("cam", x)


def check_input(x: jax.Array, min_size: int, model_name: str) -> None:
  """NHWC, square, at least `min_size` pixels, 1 or 3 channels: anything else is a clear error."""
  if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[1] < min_size or x.shape[3] not in (1, 3):
    raise ValueError(f"{model_name} expects NHWC input with H == W >= {min_size} and 1 or 3 channels, "
                     f"got shape {tuple(x.shape)}.")


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int = POOLED_SIZE) -> np.ndarray:
  """Averaging matrix (out_size, in_size) with PyTorch AdaptiveAvgPool semantics.

  Cell i averages rows floor(i*H/out) .. ceil((i+1)*H/out) - 1, which also
  covers H < out (overlapping windows) exactly as torch does.
  """
  m = np.zeros((out_size, in_size))  # float64: cast to the input dtype where it is used
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_size: int = POOLED_SIZE) -> jax.Array:
  """AdaptiveAvgPool2d((out, out)) on an NHWC array."""
  b, h, w, c = x.shape
  if h % out_size == 0 and w % out_size == 0:  # equal, disjoint windows: a reshape and a mean
    return jnp.mean(x.reshape(b, out_size, h // out_size, out_size, w // out_size, c), (2, 4))
  ph = jnp.asarray(adaptive_pool_matrix(h, out_size), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(w, out_size), x.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


def flatten_nchw(x: jax.Array) -> jax.Array:
  """Flatten NHWC features in NCHW order, as torch.flatten does on its layout."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """MaxPool2d(2, 2), floor mode: on CPU `cpu_kernels.max_pool_2x2`, elsewhere XLA's reduce-window."""
  if cpu_kernels.enabled():
    return cpu_kernels.max_pool_2x2(x)
  return nn.max_pool(x, (2, 2), (2, 2), padding="VALID")


def conv1x1_as_dot(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs) -> jax.Array:
  """nn.Conv's 1x1 convolution (NHWC, HWIO) as a dot over channels on CPU; XLA's convolution elsewhere.

  Same parameters and result; its weight gradient is then a plain matmul
  instead of a convolution over transposed activations (XLA:CPU copied each
  side input to a (C, H, W, N) layout for it).
  """
  if (rhs.shape[:2] != (1, 1) or any(s != 1 for s in window_strides) or feature_group_count != 1
      or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))):
    raise ValueError("conv1x1_as_dot only computes stride-1, undilated, ungrouped 1x1 convolutions; got "
                     f"kernel {rhs.shape[:2]}, strides {window_strides}, groups {feature_group_count}.")
  if not cpu_kernels.enabled():
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  del padding, dimension_numbers, kwargs  # a 1x1 kernel needs no padding; nn.Conv passes NHWC/HWIO
  return cpu_kernels.conv1x1_as_dot(lhs, rhs, precision)


def relu(x: jax.Array) -> jax.Array:
  """max(x, 0), NaN-propagating: on CPU `cpu_kernels.relu`, elsewhere `jax.nn.relu` (same values and gradient)."""
  return cpu_kernels.relu(x) if cpu_kernels.enabled() else jax.nn.relu(x)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, axis_name: str | None,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm over all but the last axis: (y, batch mean, biased batch variance).

  Statistics are in at least float32 and, with `axis_name`, global over that
  axis. On CPU the VJP is the closed form (`_batch_norm_train_cpu`); elsewhere
  JAX differentiates the forward pass.
  """
  if cpu_kernels.enabled():
    return _batch_norm_train_cpu(x, scale, bias, axis_name, epsilon)
  return _batch_norm_fwd(x, scale, bias, axis_name, epsilon)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, axis_name: str | None,
                          epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`batch_norm_train` with the closed-form VJP (`cpu_kernels.batch_norm_bwd`: two channel sums), which XLA
  cannot derive from the forward's reductions on its own."""
  return _batch_norm_fwd(x, scale, bias, axis_name, epsilon)[0]


def channel_sum(x: jax.Array) -> jax.Array:
  """Sum over all but the last axis (on CPU `cpu_kernels.channel_sum`)."""
  return cpu_kernels.channel_sum(x) if cpu_kernels.enabled() else jnp.sum(x, tuple(range(x.ndim - 1)))


def _batch_norm_stats(x, axis_name):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  count = np.prod(x.shape[:-1])
  mean = channel_sum(xf) / count
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  centered = xf - mean
  var = channel_sum(jnp.square(centered)) / count
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return centered, mean, var


def _batch_norm_count(x: jax.Array, axis_name: str | None):
  """Elements per channel in the batch statistics: this device's, times the devices on `axis_name`."""
  count = np.prod(x.shape[:-1])
  return count if axis_name is None else count * jax.lax.psum(1, axis_name)


def _batch_norm_fwd(x, scale, bias, axis_name, epsilon):
  centered, mean, var = _batch_norm_stats(x, axis_name)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (centered * (inv * scale) + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_cpu_fwd(x, scale, bias, axis_name, epsilon):
  out, residuals = _batch_norm_fwd(x, scale, bias, axis_name, epsilon)
  return out, (*residuals, _batch_norm_count(x, axis_name))


_batch_norm_train_cpu.defvjp(_batch_norm_cpu_fwd, cpu_kernels.batch_norm_bwd)


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
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return (x - ra_mean.value.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.axis_name, self.epsilon)
    if not self.is_initializing():
      count = _batch_norm_count(x, self.axis_name)
      unbiased = var * (count / jnp.maximum(count - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return y


def count_params(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
