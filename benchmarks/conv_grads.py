"""One VGG 3x3 convolution: XLA's own gradients vs `models.conv3x3_matmul_grads`, interleaved.

  python benchmarks/conv_grads.py                       # batch 8, 56x56, 256 -> 256, float32
  python benchmarks/conv_grads.py --size=112 --cin=128 --cout=128

Prints GFLOP/s of the forward convolution, the input gradient and the weight
gradient, each as XLA differentiates `lax.conv_general_dilated` and as our
custom VJP computes it (flipped-kernel forward conv; 9 shifted matmuls).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dsn_saal_jax import models

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("size", 56, "Height = width.")
flags.DEFINE_integer("cin", 256, "Input channels.")
flags.DEFINE_integer("cout", 256, "Output channels.")
flags.DEFINE_integer("rounds", 7, "Timed rounds; medians are reported.")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((FLAGS.batch, FLAGS.size, FLAGS.size, FLAGS.cin)), jnp.float32)
  w = jnp.asarray(0.05 * rng.standard_normal((3, 3, FLAGS.cin, FLAGS.cout)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((FLAGS.batch, FLAGS.size, FLAGS.size, FLAGS.cout)), jnp.float32)
  xla_conv = lambda x, w: models._conv3x3(x, w, None)  # pylint: disable=protected-access
  ours = lambda x, w: models.conv3x3_matmul_grads(x, w)
  grad = lambda conv, i: jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[i])
  fns = {"forward": jax.jit(xla_conv),
         "input grad, XLA": grad(xla_conv, 0), "input grad, ours": grad(ours, 0),
         "weight grad, XLA": grad(xla_conv, 1), "weight grad, ours": grad(ours, 1)}
  args = {"forward": (x, w)}
  for name in ("input grad, XLA", "weight grad, XLA"):
    ours_name = name.replace("XLA", "ours")
    np.testing.assert_allclose(fns[ours_name](x, w, dy), fns[name](x, w, dy), rtol=2e-3, atol=2e-3)
  times = {k: [] for k in fns}
  for fn_name, fn in fns.items():
    jax.block_until_ready(fn(*args.get(fn_name, (x, w, dy))))
  for _ in range(FLAGS.rounds):
    for fn_name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args.get(fn_name, (x, w, dy))))
      times[fn_name].append(time.perf_counter() - start)
  flops = 2 * FLAGS.batch * FLAGS.size**2 * FLAGS.cin * FLAGS.cout * 9
  print(f"batch {FLAGS.batch}, {FLAGS.size}x{FLAGS.size}, {FLAGS.cin} -> {FLAGS.cout}, float32, "
        f"{flops / 1e9:.1f} GFLOP each, median of {FLAGS.rounds}:")
  for fn_name, t in times.items():
    print(f"  {fn_name:18s} {flops / statistics.median(t) / 1e9:6.0f} GFLOP/s")


if __name__ == "__main__":
  app.run(main)
