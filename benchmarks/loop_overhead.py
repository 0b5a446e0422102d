"""The trainer's loop against a bare loop over the same compiled train step, on a tiny model.

  taskset -c 0 nice python benchmarks/loop_overhead.py    # 500 steps, log every 50, 8 rounds, one core
  taskset -c 0 python benchmarks/loop_overhead.py --steps=800 --rounds=12
  taskset -c 0 python benchmarks/loop_overhead.py --control     # the bare loop against itself: the noise

What the loop adds to the step: the metric buffer (device metrics fetched at
log and epoch boundaries only), the log windows' summaries and history
writes, the SIGTERM check (with several processes an allgather at
log/checkpoint boundaries only). Both sides run the trainer's pmapped step
(`train._Run`) on the same in-memory batches through the same device
prefetch; the bare loop only dispatches steps and waits for the last one at
the end of each log window.

Both sides are timed by the same code over the same windows: `train._Run.step_fn`
(the hook tests/test_multihost.py records steps by) is wrapped to stamp the wall
clock and this process's CPU time before dispatching each step that starts a
log window. A window is from one stamp to the next, so it holds its steps
and everything the loop did at the window's end (fetch, summaries, writes,
SIGTERM check). Windows from step 2 x log_every on: the first holds the compile,
the second the first log's one-time work (compiling the SAAL weights' summary);
the last window is left out (the trainer's end holds the checkpoint and report).

Rounds alternate the order (trainer first, then bare first) so drift in the
machine's load falls on both sides alike. Per round, the speed ratio
trainer/bare over its windows; then their median and spread, and the ratio
pooled over all windows. Two clocks:
- CPU time (`time.process_time`, all this process's threads) counts the work
  the loop does, per step or per window, and not the time other processes
  take from the core. **The claim is the pooled CPU-time ratio**, the process
  pinned to one core (`taskset -c 0`), where the host's work cannot hide
  behind the step's compute either. It is not blind to load: a busy sibling
  hyperthread or shared cache slows this process's own instructions too,
  which the alternation spreads over both sides.
- Wall time is shown beside it: it would show a wait that costs no CPU (a
  host round trip per step), but on a shared machine it carries the others'
  load, hence the spread printed.
A tiny model makes the loop's share of a step as large as it gets.
"""

from __future__ import annotations

import json
import os
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
flags.DEFINE_integer("steps", 500, "Training steps per run (one epoch).")
flags.DEFINE_integer("log_every", 50, "config.log_every_steps (the trainer's window).")
flags.DEFINE_integer("rounds", 8, "Rounds of one trainer run and one bare run, the order alternating.")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_integer("batch_size", 16, "Global batch.")
flags.DEFINE_bool("control", False, "Time the bare loop against itself (an A/A run): the spread identical sides show "
                  "on this machine, the smallest trainer/bare difference it can resolve.")


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


class Stamps:
  """(wall, CPU) seconds before dispatching each step that starts a timed window, through `_Run.step_fn`."""

  def __init__(self, config):
    self.every, self.first, self.times = config.log_every_steps, 2 * config.log_every_steps, []

  def __enter__(self):
    self._step_fn = step_fn = train._Run.step_fn  # pylint: disable=protected-access

    def stamped(run, step):
      if step >= self.first and step % self.every == 0:
        self.times.append((time.perf_counter(), time.process_time()))
      return step_fn(run, step)

    train._Run.step_fn = stamped  # pylint: disable=protected-access
    return self

  def __exit__(self, *exc):
    train._Run.step_fn = self._step_fn  # pylint: disable=protected-access

  def windows(self) -> np.ndarray:
    """(windows, 2): wall and CPU seconds of each window."""
    return np.diff(np.asarray(self.times), axis=0)


def trainer(config) -> np.ndarray:
  with tempfile.TemporaryDirectory() as workdir, Stamps(config) as stamps:
    train.train_and_evaluate(config, workdir, dataset=dataset(config))
  return stamps.windows()


def bare(config) -> np.ndarray:
  """The trainer's compiled step, dispatched back to back, waiting at the end of each window."""
  with tempfile.TemporaryDirectory() as workdir, Stamps(config) as stamps:
    run = train._Run(config, workdir, dataset(config))  # pylint: disable=protected-access
    rstate = runtime.replicate(run.state)
    batches = flax.jax_utils.prefetch_to_device(run.dataset.train_iter(0), 2)
    for step in range(config.num_train_steps):
      rstate, metrics = run.step_fn(step)(rstate, next(batches), run.dropout_rng)
      if runtime.itstime(step + 1, config.log_every_steps, config.num_train_steps):
        jax.block_until_ready(metrics)
    run.checkpoints.close()
  return stamps.windows()


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
  if config.num_train_steps < 4 * config.log_every_steps:
    raise app.UsageError(f"Error: --steps={FLAGS.steps} leaves no timed window; give at least 4 x --log_every.")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"{cores} core(s) allowed (run under `taskset -c 0` for the claim); load average {os.getloadavg()[0]:.1f}",
        flush=True)
  rounds = []  # per round: (trainer windows, bare windows), each (windows, [wall, cpu])
  for r in range(FLAGS.rounds):
    sides = [("trainer", bare if FLAGS.control else trainer), ("bare", bare)]
    sides = sides if r % 2 == 0 else sides[::-1]
    got = {name: side(config) for name, side in sides}
    rounds.append((got["trainer"], got["bare"]))
    # Speed ratio trainer/bare = bare seconds / trainer seconds over the same windows.
    wall, cpu = (got["bare"].sum(0) / got["trainer"].sum(0)).tolist()
    ms = {k: v.mean(0) / FLAGS.log_every * 1e3 for k, v in got.items()}
    print(f"round {r + 1} ({sides[0][0]} first): trainer/bare wall {wall:.3f}, CPU {cpu:.3f} (ms per step, "
          f"wall/CPU: trainer {ms['trainer'][0]:.2f}/{ms['trainer'][1]:.2f}, bare {ms['bare'][0]:.2f}/"
          f"{ms['bare'][1]:.2f})", flush=True)
  ratios = np.asarray([b.sum(0) / t.sum(0) for t, b in rounds])  # (rounds, [wall, cpu])
  pooled = sum(b.sum(0) for _, b in rounds) / sum(t.sum(0) for t, _ in rounds)
  steps = sum(t.shape[0] for t, _ in rounds) * FLAGS.log_every
  result = {"device": jax.devices()[0].device_kind, "cpu": cpu_model(), "cores": cores,
            "load_average_end": os.getloadavg()[0], "steps": FLAGS.steps, "log_every_steps": FLAGS.log_every,
            "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size, "rounds": FLAGS.rounds,
            "timed_steps_per_side": steps, "control": FLAGS.control}
  for i, clock in enumerate(("wall_time", "cpu_time")):
    result[clock] = {"pooled": float(pooled[i]), "median_round": float(statistics.median(ratios[:, i])),
                     "min_round": float(ratios[:, i].min()), "max_round": float(ratios[:, i].max()),
                     "rounds": [round(float(v), 4) for v in ratios[:, i]],
                     "trainer_ms_per_step": float(sum(t[:, i].sum() for t, _ in rounds) / steps * 1e3),
                     "bare_ms_per_step": float(sum(b[:, i].sum() for _, b in rounds) / steps * 1e3)}
  print(json.dumps(result))
  for clock, name in (("cpu_time", "CPU time"), ("wall_time", "wall time")):
    r = result[clock]
    print(f"trainer/bare speed, {name}: {r['pooled']:.3f} pooled over {steps} steps a side "
          f"({r['trainer_ms_per_step']:.2f} against {r['bare_ms_per_step']:.2f} ms per step), rounds "
          f"{r['min_round']:.3f}-{r['max_round']:.3f}, median {r['median_round']:.3f}")
  if FLAGS.control:
    print("--control: the 'trainer' side was a second bare loop; its ratios are this machine's noise")
  print(f"claim (CPU time, pooled): {result['cpu_time']['pooled']:.3f}; {cores} core(s); {result['device']}, "
        f"{result['cpu']}")


if __name__ == "__main__":
  app.run(main)
