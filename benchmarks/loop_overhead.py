"""The trainer's loop against a bare loop over the same compiled train step, on a tiny model.

  taskset -c 0 python benchmarks/loop_overhead.py               # 4 runs of 1,000 steps, log every 50, one core
  taskset -c 0 python benchmarks/loop_overhead.py --runs=8
  taskset -c 0 python benchmarks/loop_overhead.py --control     # the bare loop against itself: the noise floor

What the loop adds to the step: the metric buffer (device metrics fetched at
log and epoch boundaries only), the log windows' summaries and history
writes, the SIGTERM check (with several processes an allgather at
log/checkpoint boundaries only). The bare loop only dispatches steps and
waits for the last one at the end of each log window.

Interleaved, window by window, in one thread. `train._Run.step_fn` (the hook
tests/test_multihost.py records steps by) is wrapped: at each step that starts a
log window, the trainer's window that just ended is stamped (wall clock and
this process's CPU time), then one window of the bare loop runs, then the
trainer's next window starts. The bare loop runs the trainer's own compiled
step (`run.p_train_step`, one executable for both) on its own state and
batches from the same dataset. So each trainer window is paired with a bare
window run right after it, on the same machine state: this machine's slow
drifts (the same program runs 10% faster or slower from one minute to the
next here, in one process) fall on both alike, which timing whole runs one
after the other could not separate from a few percent of overhead.

Windows from the third log window on: the first holds the compile, the second
the first log's one-time work (compiling the SAAL weights' summary); the
trainer's last window is never stamped (its end holds the checkpoint and the
report). A window ends after the trainer's log-boundary work (fetch,
summaries, writes, SIGTERM check) and after the bare loop's wait for its last
step, so both end with the device idle.

The claim is the pooled CPU-time speed ratio, bare seconds / trainer seconds
over all pairs, with a 95% bootstrap interval over the pairs, the process
pinned to one core (`taskset -c 0`) so the host's work cannot hide behind the
step's compute. Wall time is shown beside it: it would show a wait that costs
no CPU (a host round trip per step). `--control` pairs the bare loop with a
second bare loop the same way: its interval is the smallest difference this
design resolves on this machine. A tiny model makes the loop's share of a step
as large as it gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Callable, Iterator

import flax.jax_utils
import jax
import numpy as np
from absl import app, flags, logging

import dsn_saal_jax
from dsn_saal_jax import config_lib, runtime, train
from dsn_saal_jax.array_dataset import ArrayDataset

dsn_saal_jax.setup_host(tensorflow=False)  # the trainer's XLA:CPU flag and kernels, before JAX starts

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 1000, "Training steps per trainer run (one epoch).")
flags.DEFINE_integer("log_every", 50, "config.log_every_steps (the trainer's window).")
flags.DEFINE_integer("runs", 4, "Trainer runs, each paired window by window with a bare loop.")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_integer("batch_size", 16, "Global batch.")
flags.DEFINE_integer("seed", 0, "Seed of the bootstrap interval.")
flags.DEFINE_bool("control", False, "Pair the bare loop with a second bare loop (an A/A run): the noise floor.")


def tiny_config():
  c = config_lib.base_config()
  c.model.widths, c.model.hidden, c.image_size, c.channels = (8, 16, 16, 32, 32), 64, FLAGS.image_size, 1
  c.batch_size = c.eval_batch_size = FLAGS.batch_size
  c.num_train_steps, c.log_every_steps = FLAGS.steps, FLAGS.log_every
  c.checkpoint_every_steps = FLAGS.steps  # one save, at the end (after the last timed window)
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


def clocks() -> np.ndarray:
  """(wall, CPU) seconds: CPU time of all this process's threads, XLA's included."""
  return np.array([time.perf_counter(), time.process_time()])


def bare_windows(run, step_fn: Callable) -> Iterator[np.ndarray]:
  """The bare loop over `run`'s compiled step, one log window per `next()`: (wall, CPU) seconds of the window."""
  every = run.config.log_every_steps
  rstate = runtime.replicate(run.state)
  batches = flax.jax_utils.prefetch_to_device(run.dataset.train_iter(0), 2)
  step = 0
  while True:
    t0 = clocks()
    for _ in range(every):
      rstate, metrics = step_fn(run, step)(rstate, next(batches), run.dropout_rng)
      step += 1
    jax.block_until_ready(metrics)
    yield clocks() - t0


class Interleaved:
  """Hooks `train._Run.step_fn` so a bare window runs at each of the trainer's log boundaries (module doc)."""

  def __init__(self, config):
    self.every, self.first = config.log_every_steps, 3 * config.log_every_steps
    self.pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (trainer window, bare window), each (wall, CPU)

  def __enter__(self):
    self._step_fn = step_fn = train._Run.step_fn  # pylint: disable=protected-access
    resumed, bare = None, None

    def hooked(run, step):
      nonlocal resumed, bare
      if step % self.every == 0 and step >= self.every:
        ended = clocks() - resumed if step >= self.first else None  # the trainer's window that ends here
        bare = bare or bare_windows(run, step_fn)
        window = next(bare)  # the bare loop's first window (its start-up) is a warm-up, like the trainer's
        if ended is not None:
          self.pairs.append((ended, window))
        resumed = clocks()
      return step_fn(run, step)

    train._Run.step_fn = hooked  # pylint: disable=protected-access
    return self

  def __exit__(self, *exc):
    train._Run.step_fn = self._step_fn  # pylint: disable=protected-access


def trainer_pairs(config) -> list[tuple[np.ndarray, np.ndarray]]:
  with tempfile.TemporaryDirectory() as workdir, Interleaved(config) as hook:
    train.train_and_evaluate(config, workdir, dataset=dataset(config))
  return hook.pairs


def control_pairs(config) -> list[tuple[np.ndarray, np.ndarray]]:
  """Two bare loops over one compiled step, window by window, paired as the trainer run pairs them."""
  with tempfile.TemporaryDirectory() as workdir:
    run = train._Run(config, workdir, dataset(config))  # pylint: disable=protected-access
    step_fn = train._Run.step_fn  # pylint: disable=protected-access
    a, b = bare_windows(run, step_fn), bare_windows(run, step_fn)
    windows = config.num_train_steps // config.log_every_steps
    pairs = [(next(a), next(b)) for _ in range(windows - 1)][2:]  # the same windows the trainer run times
    run.checkpoints.close()
  return pairs


def pooled_ratio(pairs: np.ndarray) -> np.ndarray:
  """Speed ratio trainer/bare (bare seconds / trainer seconds) over `pairs` (pairs, 2, clocks), per clock."""
  return pairs[:, 1].sum(0) / pairs[:, 0].sum(0)


def bootstrap_interval(pairs: np.ndarray, seed: int, samples: int = 4000) -> np.ndarray:
  """95% percentile interval of the pooled ratio, pairs resampled with replacement: (2 bounds, clocks)."""
  idx = np.random.default_rng(seed).integers(0, len(pairs), (samples, len(pairs)))
  ratios = pairs[idx, 1].sum(1) / pairs[idx, 0].sum(1)  # (samples, clocks)
  return np.percentile(ratios, [2.5, 97.5], axis=0)


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
  if config.num_train_steps < 5 * config.log_every_steps:
    raise app.UsageError(f"Error: --steps={FLAGS.steps} leaves no timed window; give at least 5 x --log_every.")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"{cores} core(s) allowed (run under `taskset -c 0` for the claim); load average {os.getloadavg()[0]:.1f}",
        flush=True)
  side = "bare (control)" if FLAGS.control else "trainer"
  all_pairs = []
  for r in range(FLAGS.runs):
    pairs = np.asarray(control_pairs(config) if FLAGS.control else trainer_pairs(config))  # (pairs, 2, clocks)
    all_pairs.append(pairs)
    wall, cpu = pooled_ratio(pairs)
    ms = pairs.mean(0) / FLAGS.log_every * 1e3
    print(f"run {r + 1}: {len(pairs)} window pairs, {side}/bare wall {wall:.3f}, CPU {cpu:.3f} (ms per step, "
          f"wall/CPU: {side} {ms[0, 0]:.2f}/{ms[0, 1]:.2f}, bare {ms[1, 0]:.2f}/{ms[1, 1]:.2f})", flush=True)
  pairs = np.concatenate(all_pairs)
  pooled, interval = pooled_ratio(pairs), bootstrap_interval(pairs, FLAGS.seed)
  per_pair = pairs[:, 1] / pairs[:, 0]  # (pairs, clocks)
  steps = len(pairs) * FLAGS.log_every
  result = {"device": jax.devices()[0].device_kind, "cpu": cpu_model(), "cores": cores,
            "load_average_end": os.getloadavg()[0], "steps": FLAGS.steps, "log_every_steps": FLAGS.log_every,
            "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size, "runs": FLAGS.runs,
            "window_pairs": len(pairs), "timed_steps_per_side": steps, "control": FLAGS.control}
  for i, clock in enumerate(("wall_time", "cpu_time")):
    result[clock] = {"pooled": float(pooled[i]), "interval_95": [float(interval[0, i]), float(interval[1, i])],
                     "median_pair": float(np.median(per_pair[:, i])),
                     "runs": [round(float(pooled_ratio(p)[i]), 4) for p in all_pairs],
                     "side_ms_per_step": float(pairs[:, 0, i].sum() / steps * 1e3),
                     "bare_ms_per_step": float(pairs[:, 1, i].sum() / steps * 1e3)}
  print(json.dumps(result))
  for clock, name in (("cpu_time", "CPU time"), ("wall_time", "wall time")):
    r = result[clock]
    print(f"{side}/bare speed, {name}: {r['pooled']:.3f} pooled over {len(pairs)} window pairs ({steps} steps a "
          f"side), 95% interval {r['interval_95'][0]:.3f}-{r['interval_95'][1]:.3f}; {r['side_ms_per_step']:.2f} "
          f"against {r['bare_ms_per_step']:.2f} ms per step; runs {r['runs']}")
  if FLAGS.control:
    print("--control: the first side was a second bare loop; its ratio and interval are this machine's noise")
  print(f"claim (CPU time, pooled): {result['cpu_time']['pooled']:.3f} "
        f"[{result['cpu_time']['interval_95'][0]:.3f}, {result['cpu_time']['interval_95'][1]:.3f}]; "
        f"{cores} core(s); {result['device']}, {result['cpu']}")


if __name__ == "__main__":
  app.run(main)
