"""Training and evaluation of DSN-SAAL: the loop `train_and_evaluate`, and `evaluate`.

Layout follows the Flax ImageNet example: the pure steps (`dsn_saal_jax.steps`)
wrapped in `jax.pmap` over the local devices (axis name `batch`), and
`train_and_evaluate(config, workdir)` that owns the loop. What a run needs
besides (devices, SIGTERM, the metric buffer, the scalar writer) is in
`dsn_saal_jax.runtime`; checkpoints in `dsn_saal_jax.checkpointing`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.jax_utils
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import checkpointing
from dsn_saal_jax import config_lib
from dsn_saal_jax import host
from dsn_saal_jax import losses
from dsn_saal_jax import metrics as metrics_lib
from dsn_saal_jax import models
from dsn_saal_jax import runtime
from dsn_saal_jax import steps
from dsn_saal_jax.models import AXIS
from dsn_saal_jax.optim import make_lr_schedule, make_optimizer
from dsn_saal_jax.runtime import Preempted, itstime
from dsn_saal_jax.steps import TrainState

# ----------------------------------------------------------------------------- the loop


class _Run:
  """Everything built from (config, dataset) that training and evaluation share."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, dataset, read_only: bool = False):
    config_lib.validate_config(config, jax.device_count())
    self.config, self.workdir = config, workdir
    if dataset is None:
      host.hide_accelerators_from_tensorflow()  # before TF starts: it must not claim accelerator memory
      from dsn_saal_jax import data  # pylint: disable=g-import-not-at-top
      dataset = data.create_dataset(config)
    self.dataset = dataset
    info = dataset.info
    self.num_classes = len(info.class_names)
    self.steps_per_epoch = int(info.steps_per_epoch)
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else config.num_epochs * self.steps_per_epoch)
    self.model = models.create_model(config, self.num_classes)
    self.optimizer = make_optimizer(config, self.steps_per_epoch)
    self.schedule = make_lr_schedule(config, self.steps_per_epoch)
    self.loss_fn = losses.make_loss_fn(config, np.asarray(info.class_counts), info.class_names)
    init_rng, self.dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    self.state = steps.create_train_state(config, self.model, info.image_shape, self.optimizer, init_rng,
                                          class_counts=np.asarray(info.class_counts))
    self.checkpoints = checkpointing.Checkpoints(
        workdir, checkpointing.model_fingerprint(config, self.num_classes), keep=config.keep_checkpoints,
        inference=checkpointing.inference_spec(config, info), read_only=read_only)
    p_step = lambda meta_step: jax.pmap(
        steps.make_train_step(config, info.meta_counts, self.model, self.loss_fn, self.optimizer, self.schedule,
                              meta_step),
        axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
    self.p_train_step = p_step(True)
    # update_rule='meta' steps between meta steps: their own program (compiled on first use).
    self.p_plain_step = p_step(False) if config.meta.update_rule == "meta" else self.p_train_step
    self.p_eval_step = jax.pmap(
        functools.partial(steps.eval_step, model=self.model, loss_fn=self.loss_fn, eval_head=config.eval_head),
        axis_name=AXIS)

  def step_fn(self, step: int) -> Callable:
    """The pmapped step that step `step` runs."""
    return self.p_train_step if steps.is_meta_step(self.config, step) else self.p_plain_step

  def host_state(self, rstate: TrainState) -> TrainState:
    return runtime.unreplicate(rstate)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset=None) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint), then writes the test report.

  `dataset` replaces `input_pipeline.create_dataset(config)` (tests, notebooks
  with in-memory data). Returns the final host state. On SIGTERM it raises
  `Preempted` (launch/train.py exits 143): during training after saving a
  checkpoint at the next step boundary (one save per step, whichever path asks
  for it), during the final report once the report is written, and before
  training at once. Rerunning the same command resumes.
  """
  from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top  (matplotlib only when reporting)
  with runtime.Preemption() as preemption:
    reporting.check_report_dir(os.path.join(workdir, "report", "test"))  # now, not after all the training
    runtime.log_backend()
    run = _Run(config, workdir, dataset)
    loop = _Loop(run)  # restores the newest checkpoint, writes config.json, logs the setup
    rstate, total = runtime.replicate(loop.state), run.total_steps
    train_iter = flax.jax_utils.prefetch_to_device(run.dataset.train_iter(loop.start_step), 2)
    with preemption.deferred(), _gc_frozen():
      for step in range(loop.start_step, total):
        rstate, metrics = run.step_fn(step)(rstate, next(train_iter), run.dropout_rng)
        loop.buffer.add(step, metrics)
        done = step + 1
        if itstime(done, config.log_every_steps, total):
          loop.log_scalars(done)
        if loop.val_split and itstime(done, loop.eval_every, total):
          loop.validate(done, rstate)
        if itstime(done, run.steps_per_epoch, total):
          loop.log_epoch(done)
        if itstime(done, loop.ckpt_every, total):
          loop.save(done, rstate)
        boundary = itstime(done, config.log_every_steps, total) or itstime(done, loop.ckpt_every, total)
        if preemption.stop_after(done, total, boundary):
          loop.save(done, rstate)  # a no-op when this step was just saved above
          loop.stop(f"Preempted (SIGTERM) at step {done}/{total}; checkpoint saved in {workdir}/checkpoints. "
                    "Rerun the same command to resume.")
      final = loop.test_report(rstate)
    if runtime.any_process(preemption.requested):
      loop.stop(f"Preempted (SIGTERM) during the final report; training is complete (step {int(final.step)}) "
                f"and the report in {workdir}/report/test is whole. Rerun the same command to finish.")
    loop.close()
    return final


@contextlib.contextmanager
def _gc_frozen():
  """Tracing and compiling leave many long-lived objects; kept out of the collector's view during the loop, its
  collections stay short (on a tiny CPU model, disabling them sped the loop ~20%, in noisy measurements)."""
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


class _Loop:
  """The training loop's own state between steps: the best validation value, the last good checkpoint, timers."""

  def __init__(self, run: _Run):
    config, workdir, info, ckpt = run.config, run.workdir, run.dataset.info, run.checkpoints
    self.run, self.config, self.info, self.ckpt = run, config, info, ckpt
    target = jax.device_get(run.state)
    restored = ckpt.restore(target)
    best_meta = ckpt.meta("best", target)  # refuses a best/ it could not restore, now
    self.best_value, self.best_step = None, None
    if best_meta:
      self.best_value, self.best_step = best_meta.get("best_value"), best_meta["step"]
    self.state = run.state
    if restored is not None:
      self.state = restored[0]
      logging.info("Resumed from %s at step %d.", os.path.join(workdir, "checkpoints"), int(self.state.step))
    self.start_step = int(self.state.step)
    if jax.process_index() == 0:
      _write_config(config, workdir)
    _log_setup(run, self.state)
    self.writer = runtime.Writer(workdir, config.tensorboard)
    self.buffer = runtime.MetricBuffer(workdir)
    self.val_split = "validation" if info.num_eval.get("validation", 0) > 0 else None
    self.ckpt_every = config.checkpoint_every_steps or run.steps_per_epoch
    self.eval_every = config.eval_every_epochs * run.steps_per_epoch
    self.last_good = ckpt.latest_step()
    self.t_log = self.t_epoch = self.t_start = time.time()
    self.log_from = self.epoch_from = self.start_step
    self.val_value = None

  def save(self, step: int, rstate: TrainState) -> None:
    self.buffer.fetch(self.last_good)
    self.ckpt.save(step, self.run.host_state(rstate), best_value=self.best_value)
    self.last_good = step

  def stop(self, message: str) -> None:
    self.ckpt.wait()
    self.close()
    raise Preempted(message)

  def close(self) -> None:
    self.writer.close()
    self.ckpt.close()

  def log_scalars(self, done: int) -> None:
    """The logged window's scalars to TensorBoard and history.jsonl (and the debug log)."""
    run, config = self.run, self.config
    fetched = self.buffer.take_window(self.last_good)
    now = time.time()
    values = _summaries(fetched, run.model.num_heads)
    if "alpha_logit" in fetched[-1][1]:
      values.update(_saal_weight_summaries(config, self.info, fetched[-1][1]["alpha_logit"]))
    values.update(_meta_summaries(fetched, self.info.class_names))
    values["train/examples_per_sec"] = (done - self.log_from) * config.batch_size / max(now - self.t_log, 1e-9)
    self.writer.scalars(done, values)
    eta = (now - self.t_start) / max(done - self.start_step, 1) * (run.total_steps - done)
    saal = f" alpha {values['train/alpha']:.3f}" if "train/alpha" in values else ""
    logging.debug("step %d/%d (epoch %.2f): loss %.4f acc %.3f lr %.2e%s, %.1f ex/s, ETA %s", done,
                  run.total_steps, done / run.steps_per_epoch, values["train/loss"], values["train/accuracy"],
                  values["train/learning_rate"], saal, values["train/examples_per_sec"],
                  datetime.timedelta(seconds=round(eta)))
    self.t_log, self.log_from = now, done

  def validate(self, done: int, rstate: TrainState) -> None:
    """The validation metrics; a new best is saved to best/."""
    pred = predict_split(self.run.p_eval_step, rstate, self.run.dataset, self.val_split)
    val = metrics_lib.compute_metrics(pred["labels"], pred["probs"], self.info.class_names)
    self.writer.scalars(done, {f"validation/{k}": val[k] for k in metrics_lib.SUMMARY_KEYS}
                        | {"validation/loss": pred["loss"]})
    value = self.val_value = float(val[self.config.selection_metric])
    logging.debug("step %d validation: %s", done, ", ".join(f"{k}={val[k]:.4f}" for k in metrics_lib.SUMMARY_KEYS))
    if np.isfinite(value) and (self.best_value is None or value > self.best_value):
      self.best_value, self.best_step = value, done
      self.buffer.fetch(self.last_good)
      self.ckpt.save(done, self.run.host_state(rstate), which="best", best_value=self.best_value,
                     selection_metric=self.config.selection_metric)

  def log_epoch(self, done: int) -> None:
    """The console's line for the epoch that ends at step `done`."""
    run, now = self.run, time.time()
    validation = (_validation_text(self.config.selection_metric, self.val_value, self.best_value, self.best_step)
                  if self.val_split else "")
    logging.info("%s", _epoch_line(
        done, run.total_steps, run.steps_per_epoch, self.buffer.take_epoch(self.last_good), validation,
        (done - self.epoch_from) * self.config.batch_size / max(now - self.t_epoch, 1e-9),
        (now - self.t_start) / max(done - self.start_step, 1) * (run.total_steps - done)))
    self.t_epoch, self.epoch_from, self.val_value = now, done, None

  def test_report(self, rstate: TrainState) -> TrainState:
    """Writes the test report of config.eval_checkpoint (best, else the final state); returns the final state."""
    run, config, ckpt = self.run, self.config, self.ckpt
    ckpt.wait()
    final = run.host_state(rstate)
    best = ckpt.restore(jax.device_get(final), which="best") if config.eval_checkpoint == "best" else None
    report_state, report_step = (best[0], best[1]["step"]) if best else (final, int(final.step))
    result = write_report(config, report_state, run.dataset, "test", os.path.join(run.workdir, "report", "test"),
                          run.p_eval_step, runtime.replicate(report_state),
                          extra={"checkpoint": "best" if best else "latest", "checkpoint_step": report_step})
    self.writer.scalars(int(final.step), {f"test/{k}": result[k] for k in metrics_lib.SUMMARY_KEYS})
    return final


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """workdir/config.json, replaced whole (a reader never sees half of it)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))


def _log_setup(run: _Run, state: TrainState) -> None:
  """The run's data, size and outputs, once before training."""
  config, info, workdir = run.config, run.dataset.info, run.workdir
  logging.info("%s: %d classes %s, k_n=%s, %d train examples, %d steps/epoch, %d steps, %d params.",
               config.dataset, run.num_classes, list(info.class_names), [int(k) for k in info.class_counts],
               info.num_train, run.steps_per_epoch, run.total_steps,
               sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params)))
  if _meta_set_record(info):
    logging.info("Meta set (config.meta.fraction=%g%s), held out of the training split: %s.",
                 config.meta.fraction, ", balanced" if config.meta.balanced else "",
                 _meta_set_record(info)["meta_counts"])
  network, _ = losses.split_params(state.params)
  runtime.warn_if_gpu_scale_on_cpu(config, models.create_model(config, run.num_classes, axis_name=None),
                                   {"params": network, "batch_stats": state.batch_stats}, info.image_shape,
                                   run.total_steps)
  logging.info("Every %d steps the training scalars go to %s%s.", config.log_every_steps,
               f"TensorBoard (tensorboard --logdir={os.path.join(workdir, 'tensorboard')}) and "
               if config.tensorboard else "", os.path.join(workdir, runtime.HISTORY_FILE))


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str = "test", checkpoint: str = "best",
             dataset=None) -> dict:
  """Restores the `checkpoint` ('best' | 'latest') of `workdir` and writes the report of `split`."""
  run = _Run(config, workdir, dataset, read_only=True)  # a job may still be writing to workdir
  restored = run.checkpoints.restore(jax.device_get(run.state), which=checkpoint)
  if restored is None:
    raise FileNotFoundError(f"No {checkpoint} checkpoint in {workdir}; train first with launch/train.py "
                            f"--workdir={workdir}, or pick --checkpoint=latest.")
  state, meta = restored
  out_dir = os.path.join(workdir, "report", f"{split}_{checkpoint}")
  return write_report(config, state, run.dataset, split, out_dir, run.p_eval_step,
                      runtime.replicate(state), extra={"checkpoint": checkpoint, "checkpoint_step": meta["step"]})


# ----------------------------------------------------------------------------- evaluation and summaries


def predict_split(p_eval_step: Callable, rstate: TrainState, dataset, split: str) -> dict[str, np.ndarray]:
  """Labels, probabilities and mean loss over every example of `split`, gathered from all processes."""
  labels, probs, loss_sum = [], [], 0.0
  for batch in dataset.eval_iter(split):
    out = jax.device_get(p_eval_step(rstate, batch))
    local = {"probs": out["probs"], "label": np.asarray(batch["label"]), "mask": np.asarray(batch["mask"]),
             "loss_sum": out["loss_sum"]}
    if jax.process_count() > 1:
      local = multihost_utils.process_allgather(local)
    mask = local["mask"].reshape(-1) > 0
    labels.append(local["label"].reshape(-1)[mask])
    probs.append(local["probs"].reshape(-1, local["probs"].shape[-1])[mask])
    loss_sum += float(np.sum(local["loss_sum"]))
  labels_all = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  probs_all = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
  return {"labels": labels_all, "probs": probs_all, "loss": loss_sum / max(len(labels_all), 1)}


def _first_examples(dataset, split: str, per_class: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Up to `per_class` images of each class from this process's part of `split` (for Grad-CAM)."""
  images, labels, counts = [], [], np.zeros(num_classes, int)
  for batch in dataset.eval_iter(split):
    img = np.asarray(batch["image"]).reshape(-1, *np.asarray(batch["image"]).shape[2:])
    for x, y, m in zip(img, np.asarray(batch["label"]).reshape(-1), np.asarray(batch["mask"]).reshape(-1)):
      if m > 0 and counts[y] < per_class:
        images.append(x)
        labels.append(int(y))
        counts[y] += 1
    if np.all(counts >= per_class):
      break
  return np.stack(images), np.asarray(labels)


def _meta_set_record(info) -> dict[str, dict[str, int]]:
  """Examples per class the network trained on and the meta set held out of them; {} without a meta set."""
  if info.meta_counts is None:
    return {}
  per_class = lambda counts: {str(n): int(k) for n, k in zip(info.class_names, counts)}
  return {"train_counts": per_class(info.class_counts), "meta_counts": per_class(info.meta_counts)}


def write_report(config: ml_collections.ConfigDict, state: TrainState, dataset, split: str, out_dir: str,
                 p_eval_step: Callable, rstate: TrainState, extra: Mapping[str, Any] | None = None) -> dict:
  """metrics.json and the PNG plots (confusion matrix, ROC, Grad-CAM grid) of `split` into `out_dir`."""
  from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top  (matplotlib only when reporting)
  info = dataset.info
  network, _ = losses.split_params(state.params)
  pred = predict_split(p_eval_step, rstate, dataset, split)
  result = metrics_lib.compute_metrics(pred["labels"], pred["probs"], info.class_names)
  # num_examples (from compute_metrics) counts what was evaluated; this, what config.dedup left out.
  result.update({"split": split, "loss": pred["loss"], "backbone": config.backbone, "model": "dsn" if config.model.dsn else "baseline",
                 "duplicates_removed": info.duplicates_removed.get(split, 0),
                 "num_params": models.count_params(network), **_meta_set_record(info),
                 **(extra or {})})
  if jax.process_index() == 0:
    images, labels = _first_examples(dataset, split, config.gradcam_per_class, len(info.class_names))
    variables = {"params": network, "batch_stats": state.batch_stats}
    reporting.write_report(out_dir, result, pred["labels"], pred["probs"],
                           models.create_model(config, len(info.class_names), axis_name=None), variables, images, labels)
  if jax.process_count() > 1:  # Others must not reach jax.distributed's shutdown barrier (timeout) first.
    multihost_utils.sync_global_devices(f"dsn_saal_jax: {split} report written")
  return result


def _summaries(fetched: list[tuple[int, dict[str, np.ndarray]]], num_heads: int) -> dict[str, float]:
  mean = lambda k: float(np.mean([m[k] for _, m in fetched], axis=0))
  out = {"train/loss": mean("loss"), "train/accuracy": mean("accuracy"),
         "train/learning_rate": float(fetched[-1][1]["learning_rate"])}
  per_head = np.mean([m["loss_per_head"] for _, m in fetched], axis=0)
  names = [f"side{i}" for i in range(1, num_heads)] + ["final"]
  out.update({f"train/loss_{n}": float(v) for n, v in zip(names, per_head)})
  last = fetched[-1][1]
  if "alpha" in last:
    out["train/alpha"] = float(last["alpha"])
    out.update({f"train/beta_{i}": float(b) for i, b in enumerate(last["beta"], start=1)})
  return out


def _meta_summaries(fetched: list[tuple[int, dict[str, np.ndarray]]], class_names: Sequence[str]) -> dict[str, float]:
  """The bilevel step's scalars over a logged window: mean meta loss of its meta steps, MW-Net's mean weights."""
  out = {}
  meta_losses = [float(m["meta_loss"]) for _, m in fetched if "meta_loss" in m and np.isfinite(m["meta_loss"])]
  if meta_losses:
    out["train/meta_loss"] = float(np.mean(meta_losses))
  if "mwn_weight_sum" in fetched[-1][1]:
    sums = np.sum([m["mwn_weight_sum"] for _, m in fetched], axis=0)
    counts = np.sum([m["class_count"] for _, m in fetched], axis=0)
    out.update({f"train/mwn_weight_{name}": float(w / k) for name, w, k in zip(class_names, sums, counts) if k > 0})
  return out


def _epoch_line(done: int, total: int, steps_per_epoch: int, fetched: list[tuple[int, dict[str, np.ndarray]]],
                validation: str, examples_per_sec: float, eta: float) -> str:
  """The console's line for an epoch: its mean loss and accuracy, `validation` and speed."""
  mean = lambda k: float(np.mean([m[k] for _, m in fetched]))
  return (f"epoch {round(done / steps_per_epoch, 2):g}/{round(total / steps_per_epoch, 2):g} (step {done}/{total}): "
          f"loss {mean('loss'):.4f}, accuracy {mean('accuracy'):.3f}{validation}; {examples_per_sec:.0f} ex/s, "
          f"ETA {datetime.timedelta(seconds=round(eta))}")


def _validation_text(metric: str, value: float | None, best: float | None, best_step: int | None) -> str:
  """The epoch line's validation part: this epoch's `metric`, if it was validated, and the best so far."""
  best_text = "none yet" if best is None else f"{best:.4f} at step {best_step}"
  if value is None:
    return f"; best validation {metric} {best_text}"
  return f"; validation {metric} {value:.4f} (best {best_text})"


# One compiled program (~0.2 s once, then ~10 us a log window) where op-by-op dispatch compiled each op (~0.5 s at
# the first log) and then took ~0.14 ms a window.
_saal_class_weights = jax.jit(losses.saal_class_weights, static_argnums=2)


def _saal_weight_summaries(config: ml_collections.ConfigDict, info, alpha_logit: np.ndarray) -> dict[str, float]:
  """The class weights w_n the SAAL loss applies at this alpha (what alpha -> 1 does is plain here)."""
  w = _saal_class_weights(np.float32(alpha_logit), np.asarray(info.class_counts, np.float32),
                          bool(config.loss_kwargs.saal.normalize_weights))
  return {f"train/saal_weight_{name}": float(v) for name, v in zip(info.class_names, np.asarray(w))}
