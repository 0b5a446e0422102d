"""Which XLA:CPU library runs a 3x3 conv and a dot fastest on this CPU, in float32 and bfloat16, against PyTorch.

  python benchmarks/conv_kernels.py                    # every XLA:CPU choice below, then PyTorch
  python benchmarks/conv_kernels.py --shapes=8x56x256x256 --rounds=9

The XLA:CPU library choice is an XLA_FLAGS value read once when JAX starts,
so each choice runs in its own subprocess (this script with --worker=jax).
For each conv shape (batch x size x in x out channels, NHWC, SAME padding)
it prints the forward and the forward + both gradients rate, and for the
matching im2col dot, (N*H*W, 9*C) @ (9*C, K), its rate and the library the
compiled program calls (ynn / onednn / eigen). This is the measurement
behind the XLA_FLAGS value `dsn_saal_jax.setup_host()` sets, for each CPU kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["8x224x64x64", "8x56x256x256", "8x14x512x512"],
                  "Conv shapes, batch x size x in channels x out channels.")
flags.DEFINE_integer("rounds", 7, "Timed calls per measurement (median).")
flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: time one side in this process.")

# XLA_FLAGS choices: XLA's defaults (YNNPACK), Eigen for everything (what dsn_saal_jax sets), YNNPACK for
# dots only, and oneDNN for convolutions.
CHOICES = {
    "XLA defaults": "",
    "Eigen (dsn_saal_jax)": "--xla_cpu_experimental_ynn_fusion_type=",
    "YNNPACK dots only": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "oneDNN convs": ("--xla_cpu_experimental_ynn_fusion_type= "
                     "--xla_cpu_experimental_onednn_fusion_type=individual_convolution"),
}


def _median_seconds(fn, rounds: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _shapes() -> list[tuple[int, int, int, int]]:
  return [tuple(int(v) for v in s.split("x")) for s in FLAGS.shapes]


def _library(lowered) -> str:
  """Which library the compiled program hands its conv or dot to."""
  hlo = lowered.compile().as_text()
  return "ynn" if "ynn_fusion" in hlo else "onednn" if "onednn" in hlo else "eigen"


def _time_jax() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def conv_grads(x, w):
    return jax.grad(lambda x, w: jnp.sum(jnp.square(conv(x, w).astype(jnp.float32))), (0, 1))(x, w)

  def dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)

  rng = np.random.default_rng(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    for n, s, c, k in _shapes():
      flop = 2 * n * s * s * c * k * 9
      x = jnp.asarray(rng.standard_normal((n, s, s, c)), dtype)
      w = jnp.asarray(rng.standard_normal((3, 3, c, k)) * 0.05, dtype)
      a = jnp.asarray(rng.standard_normal((n * s * s, 9 * c)), dtype)
      b = jnp.asarray(rng.standard_normal((9 * c, k)), dtype)
      f, g, d = jax.jit(conv), jax.jit(conv_grads), jax.jit(dot)
      fwd = _median_seconds(lambda: f(x, w).block_until_ready(), FLAGS.rounds)
      both = _median_seconds(lambda: jax.block_until_ready(g(x, w)), FLAGS.rounds)
      mm = _median_seconds(lambda: d(a, b).block_until_ready(), FLAGS.rounds)
      conv_lib, dot_lib = _library(f.lower(x, w)), _library(d.lower(a, b))
      print(f"  {jnp.dtype(dtype).name:8s} {n}x{s}x{c}->{k}: conv fwd {flop / fwd / 1e9:5.0f}, "
            f"fwd+grads {3 * flop / both / 1e9:5.0f}, im2col dot {flop / mm / 1e9:5.0f} GFLOP/s (conv: {conv_lib}, dot: {dot_lib})",
            flush=True)


def _time_torch() -> None:
  import torch  # pylint: disable=g-import-not-at-top

  for dtype in (torch.float32, torch.bfloat16):
    for n, s, c, k in _shapes():
      flop = 2 * n * s * s * c * k * 9
      x = torch.randn(n, c, s, s, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
      w = (torch.randn(k, c, 3, 3) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
      a, b = torch.randn(n * s * s, 9 * c, dtype=dtype), torch.randn(9 * c, k, dtype=dtype)

      def forward():
        with torch.no_grad():
          torch.nn.functional.conv2d(x, w, padding=1)

      def forward_backward():
        torch.nn.functional.conv2d(x, w, padding=1).float().square().sum().backward()

      fwd = _median_seconds(forward, FLAGS.rounds)
      both = _median_seconds(forward_backward, FLAGS.rounds)
      mm = _median_seconds(lambda: a @ b, FLAGS.rounds)
      print(f"  {str(dtype).split('.')[-1]:8s} {n}x{s}x{c}->{k}: conv fwd {flop / fwd / 1e9:5.0f}, "
            f"fwd+grads {3 * flop / both / 1e9:5.0f}, im2col dot {flop / mm / 1e9:5.0f} GFLOP/s", flush=True)


def main(argv):
  del argv
  if FLAGS.worker:
    _time_jax() if FLAGS.worker == "jax" else _time_torch()
    return
  from dsn_saal_jax import cpu  # pylint: disable=g-import-not-at-top
  print(f"{cpu.describe()}; {os.cpu_count()} CPUs; medians of {FLAGS.rounds}")
  passed = [f"--shapes={','.join(FLAGS.shapes)}", f"--rounds={FLAGS.rounds}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for name, xla_flags in [*CHOICES.items(), ("PyTorch", None)]:
    print(f"{name}: {xla_flags if xla_flags is not None else ''}", flush=True)
    worker = "torch" if xla_flags is None else "jax"
    subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={worker}", *passed], check=True,
                   env=env if xla_flags is None else {**env, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"})


if __name__ == "__main__":
  app.run(main)
