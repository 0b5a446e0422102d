"""The trainer's loop against a bare loop over the same compiled train step, on a tiny model.

  python benchmarks/loop_overhead.py                 # 200 steps, log every 50, 3 interleaved rounds
  python benchmarks/loop_overhead.py --steps=400 --rounds=5

What the loop adds to the step: the metric buffer (device metrics fetched at
log and epoch boundaries only), logging, the SIGTERM check (with several
processes an allgather at log/checkpoint boundaries only). Both sides run the
trainer's pmapped step (`train._Run`) on the same in-memory batches through
the same device prefetch; the bare loop only dispatches steps and waits at
the end of each log window. The trainer's speed is its own
`train/examples_per_sec` of each logged window after the first (which holds the
compile), the bare loop's the same windows timed alike; medians per side.
A tiny model makes the loop's share of a step as large as it gets.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time

import flax.jax_utils
import jax
import numpy as np
from absl import app, flags, logging

import dsn_saal_jax
from dsn_saal_jax import config_lib, runtime, train
from dsn_saal_jax.array_dataset import ArrayDataset

dsn_saal_jax.setup_host(tensorflow=False)  # the trainer's XLA:CPU flag and kernels, before JAX starts

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 200, "Training steps per run.")
flags.DEFINE_integer("log_every", 50, "config.log_every_steps (the trainer's window).")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (one trainer run, one bare run each).")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_integer("batch_size", 16, "Global batch.")


def tiny_config():
  c = config_lib.base_config()
  c.model.widths, c.model.hidden, c.image_size, c.channels = (8, 16, 16, 32, 32), 64, FLAGS.image_size, 1
  c.batch_size = c.eval_batch_size = FLAGS.batch_size
  c.num_train_steps, c.log_every_steps = FLAGS.steps, FLAGS.log_every
  c.checkpoint_every_steps = FLAGS.steps  # one save, at the end (after the last window is logged)
  c.tensorboard, c.gradcam_per_class = False, 1
  return c


def dataset(config) -> ArrayDataset:
  rng = np.random.default_rng(0)
  # One epoch: an epoch end (its console line, the validation pass) waits for the device by design.
  n, size = config.num_train_steps * config.batch_size, config.image_size
  x = rng.normal(size=(n, size, size, 1)).astype(np.float32)
  y = rng.integers(0, 2, n).astype(np.int32)
  # No validation split: the loop's own work only (the final test report runs after the timed windows).
  return ArrayDataset((x, y), {"test": (x[:config.batch_size], y[:config.batch_size])}, ("a", "b"),
                      config.batch_size, config.eval_batch_size)


def trainer_windows(config) -> list[float]:
  """examples/s of each logged window after the first, from the trainer's history.jsonl."""
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir, dataset=dataset(config))
    steps, values = runtime.read_history(workdir)["train/examples_per_sec"]
  return [float(v) for s, v in zip(steps, values) if s > config.log_every_steps]


def bare_windows(config) -> list[float]:
  """examples/s of the same windows: the trainer's compiled step, dispatched back to back."""
  with tempfile.TemporaryDirectory() as workdir:
    run = train._Run(config, workdir, dataset(config))  # pylint: disable=protected-access
    rstate = runtime.replicate(run.state)
    batches = flax.jax_utils.prefetch_to_device(run.dataset.train_iter(0), 2)
    rates, t = [], time.time()
    for step in range(config.num_train_steps):
      rstate, metrics = run.step_fn(step)(rstate, next(batches), run.dropout_rng)
      if runtime.itstime(step + 1, config.log_every_steps, config.num_train_steps):
        jax.block_until_ready(metrics)
        now = time.time()
        if step + 1 > config.log_every_steps:
          rates.append(config.log_every_steps * config.batch_size / (now - t))
        t = now
    run.checkpoints.close()
  return rates


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "unknown")
  except OSError:
    return "unknown"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = tiny_config()
  trainer, bare = [], []
  for r in range(FLAGS.rounds):
    t, b = trainer_windows(config), bare_windows(config)
    trainer, bare = trainer + t, bare + b
    print(f"round {r + 1}: trainer {statistics.median(t):.0f}, bare {statistics.median(b):.0f} examples/s "
          f"(ratio {statistics.median(t) / statistics.median(b):.3f})", flush=True)
  result = {"device": jax.devices()[0].device_kind, "cpu": cpu_model(), "steps": FLAGS.steps,
            "log_every_steps": FLAGS.log_every, "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size,
            "trainer_examples_per_sec": statistics.median(trainer), "bare_examples_per_sec": statistics.median(bare),
            "windows_per_side": len(trainer)}
  result["trainer_over_bare"] = result["trainer_examples_per_sec"] / result["bare_examples_per_sec"]
  print(json.dumps(result))
  print(f"trainer loop / bare loop: {result['trainer_over_bare']:.3f} "
        f"({result['trainer_examples_per_sec']:.0f} against {result['bare_examples_per_sec']:.0f} examples/s, "
        f"medians of {len(trainer)} windows of {FLAGS.log_every} steps; {result['device']}, {result['cpu']})")


if __name__ == "__main__":
  app.run(main)
