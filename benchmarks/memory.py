"""Memory on paper: XLA's memory analysis of the compiled DSN train step, per backbone, batch and dtype.

  python benchmarks/memory.py                                   # VGG16-BN and ResNet-50, 224 px, 32/64/128
  python benchmarks/memory.py --backbones=densenet169,mobilenet_v2 --out=/tmp/memory.json

For each configuration the trainer's train step (one device's program: the
step vmapped over a 1-element `batch` axis, state donated, as under pmap) is
lowered from shapes alone and compiled, nothing run, and its
`memory_analysis()` read: arguments (state and batch), outputs, outputs
aliased to donated arguments, temporaries (activations kept for the backward
pass and scratch) and generated code. Peak = arguments + outputs - aliased +
temporaries. The largest per-device batch under --budget_gb is a line through
the measured batches (memory is affine in the batch), extrapolated, not
measured.

This is XLA:CPU's buffer assignment of the program a GPU runs (the CPU-only
kernels are turned off, `DSN_SAAL_CPU_KERNELS=off`), compiled at LLVM -O0
(buffer assignment happens before code generation, so it is unchanged). A
GPU's assignment differs (cuDNN workspaces, its own fusions and scheduling,
the allocator's slack); `benchmarks/accelerator.py` measures real peaks.
"""

from __future__ import annotations

import functools
import json
import os
import time

CPU_KERNELS = os.environ.get("DSN_SAAL_CPU_KERNELS", "off")  # the program GPUs and TPUs run

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import dsn_saal_jax
from dsn_saal_jax import config_lib, losses, models, optim, steps as steps_lib

dsn_saal_jax.setup_host(cpu_kernels=CPU_KERNELS, tensorflow=False)

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["vgg16_bn", "resnet50"], "Backbones (each with its side heads).")
flags.DEFINE_list("batches", ["32", "64", "128"], "Per-device batches.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "config.compute_dtype values.")
flags.DEFINE_integer("image_size", 224, "Image side.")
flags.DEFINE_float("budget_gb", 80.0, "Device memory (1e9 bytes) for the largest-batch estimate.")
flags.DEFINE_string("out", "", "Write the results as JSON here too.")

NUM_CLASSES, CLASS_COUNTS = 3, np.array([50, 30, 20])


def abstract_state(config, model, image_shape, optimizer) -> steps_lib.TrainState:
  """`steps.create_train_state`'s shapes and dtypes, traced only (nothing initialized)."""
  key = jax.random.PRNGKey(0)
  variables = jax.eval_shape(functools.partial(model.init, train=False), {"params": key},
                             jnp.zeros((1, *image_shape), jnp.float32))
  params = dict(variables["params"])
  if config.loss == "saal":
    params["saal"] = jax.eval_shape(lambda k: losses.init_saal_params(
        k, model.num_heads, config.loss_kwargs.saal.init_stddev, alpha_param=config.loss_kwargs.saal.alpha_param,
        class_counts=CLASS_COUNTS), key)
  return steps_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              batch_stats=variables["batch_stats"], opt_state=jax.eval_shape(optimizer.init, params))


def analyse(backbone: str, dtype: str, batch: int) -> dict:
  c = config_lib.base_config()
  c.backbone, c.compute_dtype, c.image_size, c.batch_size = backbone, dtype, FLAGS.image_size, batch
  model, optimizer = models.create_model(c, NUM_CLASSES), optim.make_optimizer(c, 100)
  loss_fn, schedule = losses.make_loss_fn(c, CLASS_COUNTS), optim.make_lr_schedule(c, 100)
  shape = (FLAGS.image_size, FLAGS.image_size, c.channels)
  state = abstract_state(c, model, shape, optimizer)
  step = steps_lib.make_train_step(c, None, model, loss_fn, optimizer, schedule)
  one = lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype)  # the 1-device mapped axis
  batch_spec = {"image": jax.ShapeDtypeStruct((1, batch, *shape), jnp.float32),
                "label": jax.ShapeDtypeStruct((1, batch), jnp.int32)}
  start = time.perf_counter()
  lowered = jax.jit(jax.vmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None)), donate_argnums=(0,)).lower(
      jax.tree_util.tree_map(one, state), batch_spec, jax.ShapeDtypeStruct((2,), jnp.uint32))
  m = lowered.compile(compiler_options={"xla_backend_optimization_level": 0}).memory_analysis()
  r = {"backbone": backbone, "dtype": dtype, "image_size": FLAGS.image_size, "batch": batch,
       "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
       "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
       "generated_code_bytes": int(m.generated_code_size_in_bytes), "compile_s": time.perf_counter() - start}
  r["peak_bytes"] = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
  return r


def largest_batch(points: list[dict], budget: float) -> int | None:
  """The largest batch whose line through (batch, peak_bytes) stays under `budget` bytes; extrapolated."""
  b = np.array([p["batch"] for p in points], float)
  y = np.array([p["peak_bytes"] for p in points], float)
  if len(b) < 2:
    return None
  slope, intercept = np.polyfit(b, y, 1)
  return int((budget - intercept) // slope) if slope > 0 else None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  gb = lambda x: f"{x / 1e9:.2f}"
  print(f"jax {jax.__version__}, XLA:CPU buffer assignment of the GPU program (DSN_SAAL_CPU_KERNELS="
        f"{CPU_KERNELS}), {FLAGS.image_size} px, GB = 1e9 bytes")
  print("| backbone | dtype | batch | arguments | outputs (aliased) | temporaries | code | peak |")
  print("|---|---|---|---|---|---|---|---|")
  results, summary = [], []
  for backbone in FLAGS.backbones:
    for dtype in FLAGS.dtypes:
      points = []
      for batch in (int(b) for b in FLAGS.batches):
        r = analyse(backbone, dtype, batch)
        points.append(r)
        print(f"| {backbone} | {dtype} | {batch} | {gb(r['argument_bytes'])} | {gb(r['output_bytes'])} "
              f"({gb(r['alias_bytes'])}) | {gb(r['temp_bytes'])} | {r['generated_code_bytes'] / 1e6:.1f} MB | "
              f"{gb(r['peak_bytes'])} |", flush=True)
      results += points
      summary.append({"backbone": backbone, "dtype": dtype,
                      "largest_batch": largest_batch(points, FLAGS.budget_gb * 1e9)})
  print(f"\nLargest per-device batch under {FLAGS.budget_gb:g} GB (a line through the batches above, extrapolated):")
  for s in summary:
    print(f"  {s['backbone']} {s['dtype']}: {s['largest_batch']}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"points": results, "largest_batch": summary, "budget_gb": FLAGS.budget_gb}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
