"""RCF-style side heads shared by every backbone, and how predictions read the heads.

A model returns its heads as a tuple in a fixed order: its side heads from the
shallowest stage to the deepest, then the final classifier.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsn_saal_jax.models.layers import (SIDE_CHANNELS, adaptive_avg_pool, conv1x1_as_dot,
                                         flatten_nchw, linear_init)


class SideHead(nn.Module):
  """Side output of one stage: summed 21-channel 1x1 convs, fuse, 7x7 pool, Linear.

  Everything before the Linear is linear and average pooling commutes with
  1x1 convs (each pooling window's weights sum to 1, so biases pass through),
  so the stage's activations are pooled first: the same function, with the
  1x1 convs and their gradients on 7x7 maps instead of full resolution.
  """

  num_classes: int
  fuse_channels: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, activations: Sequence[jax.Array]) -> jax.Array:
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=linear_init, dtype=self.dtype,
                             param_dtype=self.param_dtype, conv_general_dilated=conv1x1_as_dot)
    side = sum(conv(SIDE_CHANNELS, name=f"conv{j + 1}")(adaptive_avg_pool(a)) for j, a in enumerate(activations))
    fused = flatten_nchw(conv(self.fuse_channels, name="fuse")(side))
    return nn.Dense(self.num_classes, kernel_init=linear_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc")(fused)


def side_head_torch_layers(torch_prefix: str, flax_name: str, num_taps: int
                           ) -> Iterator[tuple[str, tuple[str, ...], str]]:
  """The converter's rows for one SideHead: `{prefix}.convs.{j}`, `{prefix}.fuse`, `{prefix}.fc`."""
  for j in range(num_taps):
    yield f"{torch_prefix}.convs.{j}", (flax_name, f"conv{j + 1}"), "conv"
  yield f"{torch_prefix}.fuse", (flax_name, "fuse"), "conv"
  yield f"{torch_prefix}.fc", (flax_name, "fc"), "linear"


def predict_probs(heads: Sequence[jax.Array], eval_head: str = "final") -> jax.Array:
  """Class probabilities from the heads: the final head, or the mean of all softmaxes."""
  if eval_head == "final":
    return jax.nn.softmax(heads[-1], axis=-1)
  if eval_head == "mean":
    return jnp.mean(jnp.stack([jax.nn.softmax(h, axis=-1) for h in heads]), axis=0)
  raise ValueError(f"eval_head must be 'final' or 'mean', got {eval_head!r}.")
