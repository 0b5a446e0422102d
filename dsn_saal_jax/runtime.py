"""Run infrastructure shared by the trainer and pretraining: devices, preemption, metrics out, history.

big_vision keeps such code in its `utils.py`: replication onto the local
devices, `jax.distributed` setup, SIGTERM handling (`Preemption`), the periodic
schedule (`itstime`), the device-metric buffer, and the scalar writer
(TensorBoard events and `history.jsonl`, read back by `read_history`). Nothing
here knows the model or the loss.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import host
from dsn_saal_jax.models import AXIS

HISTORY_FILE = "history.jsonl"


class Preempted(RuntimeError):
  """Raised after SIGTERM once the checkpoint is saved; rerunning the same command resumes."""


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """`tree` copied to every local device, laid out exactly as pmap outputs are.

  The mesh axis must carry the steps' name: with any other (flax's
  `replicate`, or none), the second step, fed the first step's outputs,
  compiles the whole train step again.
  """
  n = len(devices) if devices else jax.local_device_count()
  stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), tree)
  return jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)(stacked)


def unreplicate(tree: Any) -> Any:
  """Host copy of device 0's replica (flax's `unreplicate` keeps the device axis on a 1-device mesh)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(jax.device_get(x.addressable_shards[0].data)).reshape(x.shape[1:]), tree)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize`, with CPU collectives (gloo) so CPU-only clusters and tests work too.

  Without arguments, JAX auto-detects Cloud TPU pods and SLURM jobs.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  if jax.default_backend() == "cpu":
    logging.warning(
        "jax.distributed joined %d processes, but JAX found only CPUs: each host trains on its CPU cores. For "
        "GPUs or TPUs install JAX's build for them (pip install -e '.[cuda12]' or '.[tpu]').", jax.process_count())


def log_backend() -> None:
  """One line naming the platform and devices JAX found (a CPU-only JAX on a GPU machine shows here)."""
  count, local = jax.device_count(), jax.local_device_count()
  kinds = ", ".join(sorted({d.device_kind for d in jax.local_devices()}))
  logging.info("JAX backend %s: %d device%s%s (%sprocess %d of %d).", jax.default_backend(), count,
               "" if count == 1 else "s", f", {local} in this process" if local != count else "",
               "" if jax.default_backend() == "cpu" else f"{kinds}; ", jax.process_index(), jax.process_count())


# Training work, in FLOPs, from which a config is GPU/TPU scale: 3x XLA's count of one example's forward pass
# (forward and backward), times the examples training sees. 1e15 is about a day at the ~13 GFLOP/s at which
# configs/default.py trains on 2 CPU cores, a few hours on 16; the paper configs (VGG16-BN at 224 px, 30 GFLOPs
# an image, 120 epochs) need ~5e15 on COVID19-CT's 425 training slices and more on the other sets.
CPU_SCALE_FLOPS = 1e15


def training_flops(config: ml_collections.ConfigDict, model: nn.Module, variables: Any, image_shape,
                   total_steps: int) -> float | None:
  """Estimated FLOPs of a whole training run (see CPU_SCALE_FLOPS); None if XLA gives no count.

  `variables` may be `jax.ShapeDtypeStruct`s: only the forward pass is traced, nothing is compiled.
  """
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  cost = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x).cost_analysis()
  if not cost or "flops" not in cost:
    return None
  return 3.0 * float(cost["flops"]) * total_steps * config.batch_size


def warn_if_gpu_scale_on_cpu(config: ml_collections.ConfigDict, model: nn.Module, variables: Any, image_shape,
                             total_steps: int) -> None:
  """A warning when only CPUs train a GPU/TPU-scale config; costs a trace of the forward pass (~0.5 s)."""
  if jax.default_backend() != "cpu":
    return
  flops = training_flops(config, model, variables, image_shape, total_steps)
  if flops is not None and flops > CPU_SCALE_FLOPS:
    logging.warning(
        "This config is GPU/TPU scale (training takes ~%.0e FLOPs, over %.0e), but JAX found only CPUs. Install "
        "JAX's build for your accelerator (pip install -e '.[cuda12]' or '.[tpu]'), or train a CPU-sized config "
        "such as configs/covid19_ct_cpu.py.", flops, CPU_SCALE_FLOPS)


def any_process(flag: bool) -> bool:
  """`flag` of any process: a cross-process allgather (a host round trip) with several processes."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class Preemption:
  """SIGTERM handling: raise at once while nothing needs saving, else record it for the next step boundary.

  Outside `deferred()` (building the dataset, compiling, restoring) a SIGTERM
  raises `Preempted` where the program is: nothing is half-written there, and a
  dataset build left unfinished is rebuilt on the next run. Inside it (the
  training loop and the final report) the loop saves a checkpoint at the next
  step boundary (`stop_after`) and then raises.

  With several processes the one that got the signal must not stop alone, so
  the flag is agreed by all (an allgather), but only at the steps where the
  loop waits for the device anyway (`stop_after`'s `boundary`: log and
  checkpoint steps); steps in between dispatch without any host round trip.
  JAX's own `multihost_utils.reached_preemption_sync_point` is not used: it
  takes SIGTERM through the coordination service's C handler, which the Python
  handler here (needed to stop before training and during the report) replaces.
  """

  def __init__(self):
    self.requested = False
    self._deferred = False
    self._previous = None

  def __enter__(self):
    if hasattr(signal, "SIGTERM"):
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: the caller handles signals.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if not self._deferred:
      raise Preempted("Preempted (SIGTERM) before training started; nothing new to save. Rerun the same "
                      "command to resume.")
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then stopping.")

  def stop_after(self, done: int, total: int, boundary: bool) -> bool:
    """Whether training stops (saving) after step `done`: this process's flag with one process, else
    the flag of any process, exchanged at `boundary` steps only. Never after the last step (the report runs)."""
    if done >= total:
      return False
    if jax.process_count() == 1:
      return self.requested
    return boundary and any_process(self.requested)

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    self._deferred = True
    try:
      yield
    finally:
      self._deferred = False

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def itstime(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, evaluate, save) is due after `done` of `total` steps; always at the end."""
  return (every > 0 and done % every == 0) or done == total


class MetricBuffer:
  """Device metrics of recent steps, fetched in one transfer when a log, save or epoch end needs them.

  Dispatch stays async in between. Each fetched step is checked for a finite
  loss, then kept for two readers: the logged window (TensorBoard,
  history.jsonl) and the epoch's console line.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._device: list[tuple[int, Any]] = []
    self._window: list[tuple[int, dict[str, np.ndarray]]] = []
    self._epoch: list[tuple[int, dict[str, np.ndarray]]] = []

  def add(self, step: int, metrics) -> None:
    self._device.append((step, metrics))

  def fetch(self, last_good: int | None) -> None:
    # Device 0's replica of every buffered step in one device_get: its copies overlap, one wait in all.
    first = [jax.tree_util.tree_map(lambda x: x.addressable_data(0), m) for _, m in self._device]
    fetched = [(s, jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(x.shape[1:]), m))
               for (s, _), m in zip(self._device, jax.device_get(first))]
    self._device = []
    for step, m in fetched:
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(
            f"The training loss became {m['loss']} at step {step}; training stopped. The last good checkpoint "
            f"(step {last_good}) in {self.workdir}/checkpoints is kept. Lower config.learning_rate, check the "
            "input data for NaN/inf, or (SAAL) try --config.loss_kwargs.saal.normalize_weights=true.")
    self._window += fetched
    self._epoch += fetched

  def take_window(self, last_good: int | None) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The steps since the last logged window."""
    self.fetch(last_good)
    taken, self._window = self._window, []
    return taken

  def take_epoch(self, last_good: int | None) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The steps since the last epoch line (since the start, for the first epoch of a resumed run)."""
    self.fetch(last_good)
    taken, self._epoch = self._epoch, []
    return taken


class Writer:
  """Scalars from process 0 only: TensorBoard event files and `history.jsonl` for plots and sweeps.

  Events go through TensorFlow's summary writer, which the TFDS pipeline has
  loaded already (tensorboardX imported torch, +3 s a run, where installed),
  tagged for TensorBoard's scalars plugin as `tf.summary.scalar` tags them (that
  function needs the tensorboard package, the viewer's extra). A run on an
  in-memory dataset can skip them (config.tensorboard=False) rather than load
  TensorFlow for them. A resumed run appends again from its checkpoint's step,
  so readers keep the last record of each step (`read_history`).
  """

  def __init__(self, workdir: str, tensorboard: bool):
    self._writer = None
    self._history = None
    if jax.process_index() == 0:
      if tensorboard:
        host.hide_accelerators_from_tensorflow()  # before TF starts: it must not claim accelerator memory
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
        self._tf = tf
        self._scalar = summary_pb2.SummaryMetadata(plugin_data={"plugin_name": "scalars"})
        self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      path = os.path.join(workdir, HISTORY_FILE)
      torn = os.path.exists(path) and os.path.getsize(path) > 0 and _last_byte(path) != b"\n"
      self._history = open(path, "a")
      if torn:  # a run killed mid-write: end its partial record so the next one starts on its own line
        self._history.write("\n")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      with self._writer.as_default():
        for k, v in values.items():
          self._tf.summary.write(k, self._tf.constant(v, self._tf.float32), step=int(step), metadata=self._scalar)
      self._writer.flush()
    if self._history is not None:
      self._history.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
      self._history.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
    if self._history is not None:
      self._history.close()


def _last_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_history(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{scalar name: (steps, values)} from `workdir/history.jsonl`, one value per step (the last written)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; it is written by train_and_evaluate while training.")
  series: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # the partial last record of a killed run
        logging.warning("%s:%d is a partial record (the run was killed while writing it); skipped.", path, number)
        continue
      step = record.pop("step")
      for k, v in record.items():
        series.setdefault(k, {})[step] = v
  return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}
