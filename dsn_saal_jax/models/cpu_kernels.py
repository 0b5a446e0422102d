"""The XLA:CPU forms of the shared layers (`layers`), and the one switch that picks them.

Each computes the same function as the plain XLA formulation in `layers` (tests/test_models.py compares
values and gradients), written so that XLA:CPU runs it faster. They were measured on CPUs only
(benchmarks/README.md), so `enabled()` is true on the CPU backend and GPUs and TPUs get the plain forms.
`use("on" | "off")` overrides the backend check; `dsn_saal_jax.setup_host()` calls it once with
DSN_SAAL_CPU_KERNELS, so no environment variable is read while a model is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHOICES = ("auto", "on", "off")
_choice = "auto"


def use(choice: str) -> None:
  """auto: the CPU forms on the CPU backend only; on | off: always | never (decided when a function is traced)."""
  global _choice
  if choice not in CHOICES:
    raise ValueError(f"DSN_SAAL_CPU_KERNELS must be auto, on or off, got {choice!r}.")
  _choice = choice


def enabled() -> bool:
  """Whether the forms below run in the functions traced now."""
  return _choice == "on" or (_choice == "auto" and jax.default_backend() == "cpu")


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """MaxPool2d(2, 2) (floor mode) as a reshape and a max; its gradient goes to each window's first maximum.

  XLA lowers `nn.max_pool`'s gradient to a windowed argmax carrying four int32
  index arrays of the input's size; on CPU that alone cost ~10% of a train
  step. Here the forward pass keeps an int8 index of each window's maximum and
  the backward pass is elementwise. Ties (e.g. all-zero windows after ReLU)
  resolve as torch does: the first maximum in row-major order takes all.
  """
  return _max_pool_fwd(x)[0]


def _max_pool_fwd(x):
  # Comparing x with the pooled value in the backward pass is not enough: XLA
  # may recompute x there with different rounding (FMA contraction) and then no
  # element matches. The index is taken from the same values as the maximum.
  n, h, w, c = x.shape
  windows = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
  best, index = windows[:, :, 0, :, 0], jnp.zeros((n, h // 2, w // 2, c), jnp.int8)
  for k, (i, j) in enumerate(((0, 1), (1, 0), (1, 1)), start=1):
    larger = windows[:, :, i, :, j] > best
    best, index = jnp.where(larger, windows[:, :, i, :, j], best), jnp.where(larger, jnp.int8(k), index)
  return best, (index, x.shape)


def _max_pool_bwd(residuals, dy):
  index, (n, h, w, c) = residuals
  zero = jnp.zeros_like(dy)
  dx = jnp.stack([jnp.where(index == k, dy, zero) for k in range(4)], 3)  # (n, h/2, w/2, i*2+j, c)
  dx = dx.reshape(n, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h - h % 2, w - w % 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv1x1_as_dot(lhs: jax.Array, rhs: jax.Array, precision=None) -> jax.Array:
  """A stride-1 1x1 convolution (NHWC, HWIO) as a dot over channels.

  Its weight gradient is then a plain matmul instead of a convolution over
  transposed activations (XLA:CPU copied each side input to a (C, H, W, N)
  layout for it).
  """
  return jnp.einsum("nhwc,co->nhwo", lhs, rhs[0, 0], precision=precision)


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
  """max(x, 0), NaN-propagating, written as select(x < 0, 0, x) so that XLA:CPU stores it once.

  XLA duplicates chains of one-operand elementwise ops (BatchNorm's
  normalisation and max(x, 0)) into every consumer. The conv weight gradients
  then transpose BatchNorm + ReLU recomputed inside a strided loop instead of
  transposing the stored activation. A select has two full-size operands,
  which XLA does not duplicate (conv1_2's forward + backward at 224/b8: 1.14
  against 1.24 s).
  """
  return jnp.where(x < 0, jnp.zeros_like(x), x)


relu.defjvps(lambda g, ans, x: jnp.where(x > 0, g, jnp.zeros_like(g)))  # torch's and jax.nn.relu's: 0 at 0


def channel_sum(x: jax.Array) -> jax.Array:
  """Sum over all but the last axis as two reductions whose kept axis is wide.

  XLA:CPU reduces an (N*H*W, C) array over its rows 4-13x slower than it
  reduces (N*H, W*C) and then (W, C), which also rounds less (measured at
  8x224x224x64 and 8x28x28x512).
  """
  if x.ndim < 3:
    return jnp.sum(x, tuple(range(x.ndim - 1)))
  rows = jnp.sum(x.reshape(-1, x.shape[-2] * x.shape[-1]), 0)
  return jnp.sum(rows.reshape(x.shape[-2], x.shape[-1]), 0)


def batch_norm_bwd(axis_name, epsilon, residuals, cotangents):
  """Training-mode batch norm's closed-form VJP: two channel sums, which XLA cannot derive from the
  forward's reductions on its own. `residuals`: x, batch mean, 1/std, scale, elements per channel."""
  del epsilon
  x, mean, inv, scale, count = residuals
  g = cotangents[0].astype(mean.dtype)  # mean and var only feed the running statistics, not the loss
  centered = x.astype(mean.dtype) - mean
  # scale and bias act on this device's slice only: their gradients are local sums (the step
  # averages them over devices). x also moves the shared statistics: dx needs the global sums.
  dbias, dscale = channel_sum(g), channel_sum(g * centered) * inv
  sum_g, sum_gx = dbias, dscale
  if axis_name is not None:
    sum_g, sum_gx = jax.lax.psum(dbias, axis_name), jax.lax.psum(dscale, axis_name)
  dx = (scale * inv) * (g - sum_g / count - centered * (inv * sum_gx / count))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)
