"""One VGG 3x3 convolution: XLA's own gradients vs `models.conv3x3_matmul_grads`, interleaved.

  python benchmarks/conv_grads.py                       # batch 8, 56x56, 256 -> 256, float32
  python benchmarks/conv_grads.py --size=112 --cin=128 --cout=128
  python benchmarks/conv_grads.py --model_size=112 --model_batch=8   # also the whole model's gradient

Prints GFLOP/s of the forward convolution, the input gradient and the weight
gradient, each as XLA differentiates `lax.conv_general_dilated` and as our
custom VJP computes it (flipped-kernel forward conv; 9 shifted matmuls). With
--model_size, also times the full-width DSN-VGG16-BN's parameter gradient with
`matmul_conv_grads` off and on, interleaved.
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
flags.DEFINE_integer("model_size", 0, "If > 0, also time the whole model's gradient at this image size.")
flags.DEFINE_integer("model_batch", 8, "Batch size of the whole-model comparison.")
flags.DEFINE_string("model_widths", "64x128x256x512x512", "Stage widths of the whole-model comparison.")


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
  if FLAGS.model_size:
    model_gradient_ab(FLAGS.model_size, FLAGS.model_batch, tuple(int(w) for w in FLAGS.model_widths.split("x")))


def model_gradient_ab(size: int, batch: int, widths: tuple[int, ...]) -> None:
  """The DSN model's parameter gradient (train mode, six heads) with XLA's conv gradients vs ours."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, size, size, 3)), jnp.float32)
  grads, times = {}, {}
  for flag in (False, True):
    model = models.DSNVGG16BN(2, widths=widths, hidden=256, matmul_conv_grads=flag)
    v = jax.jit(lambda x, model=model: model.init(jax.random.PRNGKey(0), x, train=False))(x)

    def loss(p, model=model, v=v):
      heads, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
      return sum(jnp.sum(h**2) for h in heads)

    grads[flag] = (jax.jit(jax.grad(loss)), v["params"])
    jax.block_until_ready(grads[flag][0](grads[flag][1]))
    times[flag] = []
  for _ in range(FLAGS.rounds):
    for flag, (fn, params) in grads.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params))
      times[flag].append(time.perf_counter() - start)
  xla, ours = statistics.median(times[False]), statistics.median(times[True])
  print(f"DSN-VGG16-BN {widths} gradient at {size}x{size}, batch {batch}: XLA conv grads {xla:.2f} s, "
        f"ours {ours:.2f} s, speedup {xla / ours:.2f}x")


if __name__ == "__main__":
  app.run(main)
