"""Each VGG16 conv layer of a train step, per pass (forward, input gradient, weight gradient), JAX against PyTorch.

  python benchmarks/conv_layers.py                         # 224/batch 8, float32
  python benchmarks/conv_layers.py --size=112 --batch=32 --dtype=bfloat16

Where a whole-step gap to PyTorch lies: the 13 3x3 convs of VGG16 are timed
alone, one pass at a time, JAX with the project's XLA flags (import
dsn_saal_jax) and PyTorch's oneDNN kernels (channels-last, as its CPU convs
run fastest), interleaved round by round in one process so that both see the
same machine load. Medians in ms and GFLOP/s; the last column is the
PyTorch/JAX time ratio (above 1: JAX is faster). The first layer's input
gradient is skipped, as in training (the images need none).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU kernels are what this compares; no accelerator probing
import dsn_saal_jax  # noqa: E402
from dsn_saal_jax import cpu, models  # noqa: E402

dsn_saal_jax.setup_host(tensorflow=False)  # the trainer's XLA:CPU flag and kernels, before JAX starts

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
import torch  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 224, "Input image size.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("channels", 3, "Input channels.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype on both sides.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per layer (one call of each side and pass per round).")

PASSES = ("forward", "input grad", "weight grad")


def vgg16_conv_shapes(size: int, channels: int) -> list[tuple[str, int, int, int]]:
  """(name, map size, in channels, out channels) of each conv, as models.VGG16_STAGES and VGG16_WIDTHS lay them out."""
  shapes, c = [], channels
  for stage, (n, width) in enumerate(zip(models.VGG16_STAGES, models.VGG16_WIDTHS), start=1):
    for i in range(1, n + 1):
      shapes.append((f"conv{stage}_{i}", size, c, width))
      c = width
    size //= 2
  return shapes


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _to_torch(a: np.ndarray, dtype, kind: str) -> torch.Tensor:
  """An NHWC activation or HWIO kernel as PyTorch's NCHW / OIHW tensor, channels-last in memory."""
  perm = (3, 2, 0, 1) if kind == "kernel" else (0, 3, 1, 2)
  return torch.from_numpy(a.transpose(perm)).to(dtype).contiguous(memory_format=torch.channels_last)


def _jax_passes(x: jax.Array, w: jax.Array, dy: jax.Array) -> dict[str, callable]:
  forward = jax.jit(_conv)
  input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: _conv(x, w), x)[1](dy)[0])
  weight_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: _conv(x, w), w)[1](dy)[0])
  return {"forward": lambda: forward(x, w).block_until_ready(),
          "input grad": lambda: input_grad(x, w, dy).block_until_ready(),
          "weight grad": lambda: weight_grad(x, w, dy).block_until_ready()}


def _torch_passes(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> dict[str, callable]:
  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(dy, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, mask)

  def forward():
    torch.nn.functional.conv2d(x, w, padding=1)

  return {"forward": forward, "input grad": backward([True, False, False]),
          "weight grad": backward([False, True, False])}


def _check_same_conv(x: np.ndarray, w: np.ndarray, dy: np.ndarray, jdtype, tdtype) -> None:
  """Both sides compute the same forward pass and gradients (else the timings compare different work)."""
  y, vjp = jax.vjp(_conv, jnp.asarray(x, jdtype), jnp.asarray(w, jdtype))
  dx, dw = vjp(jnp.asarray(dy, jdtype))
  tx, tw, tdy = _to_torch(x, tdtype, "activation"), _to_torch(w, tdtype, "kernel"), _to_torch(dy, tdtype, "activation")
  ty = torch.nn.functional.conv2d(tx, tw, padding=1)
  tdx, tdw, _ = torch.ops.aten.convolution_backward(tdy, tx, tw, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                                                    [True, True, False])
  tol = 1e-4 if FLAGS.dtype == "float32" else 3e-2
  for name, a, b in (("forward", y, ty.permute(0, 2, 3, 1)), ("input grad", dx, tdx.permute(0, 2, 3, 1)),
                     ("weight grad", dw, tdw.permute(2, 3, 1, 0))):
    a, b = np.asarray(a, np.float32), b.float().numpy()
    err = np.abs(a - b).max() / np.abs(b).max()
    if err > tol:
      raise AssertionError(f"JAX and PyTorch {name} differ: relative error {err:.1e} > {tol:.0e}")


def main(argv):
  del argv
  torch.set_grad_enabled(False)
  jdtype, tdtype = jnp.dtype(FLAGS.dtype), getattr(torch, FLAGS.dtype)
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads) on {cpu.describe()}; "
        f"{FLAGS.size}/b{FLAGS.batch}, {FLAGS.dtype}, medians of {FLAGS.rounds} interleaved rounds")
  print(f"{'layer':9s} {'pass':12s} {'JAX ms':>8s} {'GFLOP/s':>8s} {'torch ms':>9s} {'GFLOP/s':>8s} {'torch/JAX':>9s}")
  rng = np.random.default_rng(0)
  totals = {side: dict.fromkeys(PASSES, 0.0) for side in ("jax", "torch")}
  for name, s, c, k in vgg16_conv_shapes(FLAGS.size, FLAGS.channels):
    x = rng.standard_normal((FLAGS.batch, s, s, c), np.float32)
    w = (rng.standard_normal((3, 3, c, k)) * np.sqrt(2 / (9 * k))).astype(np.float32)
    dy = rng.standard_normal((FLAGS.batch, s, s, k), np.float32)
    jx = _jax_passes(*(jnp.asarray(a, jdtype) for a in (x, w, dy)))
    tx = _torch_passes(_to_torch(x, tdtype, "activation"), _to_torch(w, tdtype, "kernel"),
                       _to_torch(dy, tdtype, "activation"))
    _check_same_conv(x, w, dy, jdtype, tdtype)
    flop = 2 * FLAGS.batch * s * s * c * k * 9
    for p in PASSES:
      if name == "conv1_1" and p == "input grad":
        continue
      times = {"jax": [], "torch": []}
      for fn in (jx[p], tx[p], jx[p], tx[p]):  # warm-up, compile
        fn()
      for _ in range(FLAGS.rounds):
        for side, fn in (("jax", jx[p]), ("torch", tx[p])):
          start = time.perf_counter()
          fn()
          times[side].append(time.perf_counter() - start)
      j, t = (float(np.median(times[side])) for side in ("jax", "torch"))
      totals["jax"][p] += j
      totals["torch"][p] += t
      print(f"{name:9s} {p:12s} {1e3 * j:8.1f} {flop / j / 1e9:8.0f} {1e3 * t:9.1f} {flop / t / 1e9:8.0f} {t / j:9.2f}",
            flush=True)
  for p in PASSES:
    j, t = totals["jax"][p], totals["torch"][p]
    print(f"{'all convs':9s} {p:12s} {1e3 * j:8.1f} {'':8s} {1e3 * t:9.1f} {'':8s} {t / j:9.2f}")
  j, t = (sum(totals[side].values()) for side in ("jax", "torch"))
  print(f"{'all convs':9s} {'all passes':12s} {1e3 * j:8.1f} {'':8s} {1e3 * t:9.1f} {'':8s} {t / j:9.2f}")


if __name__ == "__main__":
  app.run(main)
