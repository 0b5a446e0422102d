"""Training-time augmentation in JAX, run on device inside the jitted step (DESIGN.md, Augmentation).

Random resized crop, horizontal flip and a rotation within +/-10 degrees are
one affine resampling (bilinear); then intensity and contrast jitter, and for
pretraining a Gaussian blur. Every random draw of example i at step s comes
from `example_key(seed, s, i)`, i its position in the global batch, so the
augmented batch is a pure function of (seed, step, batch) whatever the number
of devices, and a resumed run sees exactly the same batches. Inputs are the
pipeline's normalized images; the draws act on those values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp

_STREAM = 0x5A11  # keeps augmentation's keys apart from the other uses of config.seed


@dataclasses.dataclass(frozen=True)
class Policy:
  """What is drawn, and from which ranges."""
  crop_scale: tuple[float, float] = (0.5, 1.0)   # area share of the crop
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect ratio (log-uniform)
  flip: bool = True                             # horizontal, with probability 1/2
  max_rotation: float = 10.0                    # degrees, uniform in +/- this
  brightness: float = 0.2                       # added offset, uniform in +/- this (normalized units)
  contrast: float = 0.2                         # factor about the image mean, uniform in 1 +/- this
  blur_prob: float = 0.0                        # Gaussian blur with this probability ...
  blur_sigma: tuple[float, float] = (0.1, 2.0)  # ... sigma (pixels at 224 px, scaled with the image size)


SUPERVISED = Policy()
PRETRAINING = Policy(crop_scale=(0.2, 1.0), blur_prob=0.5)


def example_key(seed: int | jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
  """The key of example `index` (position in the global batch) at step `step`."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _STREAM)
  return jax.random.fold_in(jax.random.fold_in(key, step), index)


def sample_params(key: jax.Array, policy: Policy) -> dict[str, jax.Array]:
  """One example's draws: crop (area share, aspect ratio, centre), flip, angle, brightness, contrast, blur.

  All from one vector of uniforms (one random-bits call: XLA compiles each call's hash anew).
  """
  u = jax.random.uniform(key, (10,))
  between = lambda i, lo, hi: lo + (hi - lo) * u[i]
  scale = between(0, *policy.crop_scale)
  ratio = jnp.exp(between(1, math.log(policy.crop_ratio[0]), math.log(policy.crop_ratio[1])))
  # Crop width and height as shares of the image side; clipped to the image (area then shrinks a little).
  w, h = jnp.minimum(jnp.sqrt(scale * ratio), 1.0), jnp.minimum(jnp.sqrt(scale / ratio), 1.0)
  return {"crop_w": w, "crop_h": h,
          "crop_cx": between(2, -(1 - w), 1 - w), "crop_cy": between(3, -(1 - h), 1 - h),  # centre in [-1, 1]
          "flip": (u[4] < 0.5) & policy.flip,
          "angle": between(5, -policy.max_rotation, policy.max_rotation),
          "brightness": between(6, -policy.brightness, policy.brightness),
          "contrast": between(7, 1 - policy.contrast, 1 + policy.contrast),
          "blur": u[8] < policy.blur_prob, "sigma": between(9, *policy.blur_sigma)}


def _resample(image: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
  """Crop, flip and rotate in one bilinear resampling; points outside the image take its minimum (background)."""
  size_y, size_x, _ = image.shape
  u = (jnp.arange(size_x, dtype=jnp.float32) + 0.5) / size_x * 2 - 1
  v = (jnp.arange(size_y, dtype=jnp.float32) + 0.5) / size_y * 2 - 1
  u, v = jnp.meshgrid(u, v)  # output coordinates in [-1, 1]
  u = jnp.where(p["flip"], -u, u) * p["crop_w"]
  v = v * p["crop_h"]
  theta = jnp.deg2rad(p["angle"])
  x = p["crop_cx"] + jnp.cos(theta) * u - jnp.sin(theta) * v
  y = p["crop_cy"] + jnp.sin(theta) * u + jnp.cos(theta) * v
  rows, cols = (y + 1) / 2 * size_y - 0.5, (x + 1) / 2 * size_x - 0.5
  fill = jnp.min(image)
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]

  def at(r, c):
    inside = ((r >= 0) & (r < size_y) & (c >= 0) & (c < size_x))[..., None]
    value = image[jnp.clip(r, 0, size_y - 1).astype(jnp.int32), jnp.clip(c, 0, size_x - 1).astype(jnp.int32)]
    return jnp.where(inside, value, fill)

  return ((1 - fr) * ((1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1))
          + fr * ((1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)))


def _blur(image: jax.Array, sigma: jax.Array, max_sigma: float) -> jax.Array:
  """Separable Gaussian blur of an (H, W, C) image, kernel radius 3 max_sigma, edges replicated."""
  radius = max(1, math.ceil(3 * max_sigma))
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (t / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  n_y, n_x = image.shape[:2]
  rows = sum(kernel[i] * padded[i:i + n_y] for i in range(2 * radius + 1))
  return sum(kernel[i] * rows[:, i:i + n_x] for i in range(2 * radius + 1))


def apply_params(image: jax.Array, p: Mapping[str, jax.Array], policy: Policy) -> jax.Array:
  """`image` (H, W, C) augmented by the draws `p` of `sample_params`."""
  image = image.astype(jnp.float32)
  out = _resample(image, p)
  if policy.blur_prob > 0:
    scale = image.shape[0] / 224
    out = jnp.where(p["blur"], _blur(out, p["sigma"] * scale, policy.blur_sigma[1] * scale), out)
  mean = jnp.mean(out)
  return (out - mean) * p["contrast"] + mean + p["brightness"]


def augment(key: jax.Array, image: jax.Array, policy: Policy) -> jax.Array:
  """One example, augmented by `policy` with the draws of `key`."""
  return apply_params(image, sample_params(key, policy), policy)


def augment_batch(images: jax.Array, seed: int | jax.Array, step: jax.Array, first_index: jax.Array,
                  policy: Policy, view: int | None = None) -> jax.Array:
  """A device's slice (N, H, W, C) of the global batch, whose first example is `first_index` in it.

  `view` (contrastive pretraining) draws independent augmentations of the same example.
  """
  index = first_index + jnp.arange(images.shape[0])
  keys = jax.vmap(lambda i: example_key(seed, step, i))(index)
  if view is not None:
    keys = jax.vmap(lambda k: jax.random.fold_in(k, view))(keys)
  return jax.vmap(lambda k, x: augment(k, x, policy))(keys, images).astype(images.dtype)
