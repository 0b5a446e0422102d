"""Subprocess worker for the trainer tests that need their own JAX process.

Device counts (XLA_FLAGS), `jax.distributed` and signals must not touch the
pytest process, so tests run this script and compare the `.npz` it writes.
Modes:
  equiv      train_step pmapped over all local devices vs over one device, same global batch.
  meta       for update_rule='meta': equiv's check of meta_train_step, then train_and_evaluate uninterrupted
             and interrupted (SIGTERM) then resumed, in this one process (one compile, warm caches).
  train      train_and_evaluate on a tiny in-memory problem; exits 143 when preempted.
  multihost  as `train`, after jax.distributed.initialize on localhost (`--record_syncs` prints its syncs).
  evaluate   train.evaluate of a trained workdir (restores a checkpoint, writes the report).
  launch     runs a launch/ script (the arguments after `--`) as `python SCRIPT ...` would.
Every mode takes `--fault=PHASE:AT:SIGNAL`: this process sends itself SIGNAL
at a chosen moment (see `install_fault`). The tiny config and data it trains on are tests/helpers.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import dsn_saal_jax
from dsn_saal_jax import losses, models, optim, runtime, steps as steps_lib, train
from helpers import tiny_config, tiny_dataset

PREEMPTED_EXIT_CODE = 143  # as launch/train.py

# update_rule='meta' on a tinier VGG (one conv per stage): log10 alpha, a meta step every other step (both
# branches of its cond run), no dropout (its masks depend on the device count), equiv's learning rate.
META = {"meta.update_rule": "meta", "loss_kwargs.saal.alpha_param": "log10", "meta.every_steps": 2, "meta.lr": 0.05,
        "backbone": "vgg16_bn", "model.stages": (1, 1, 1, 1, 1), "model.widths": (4, 8, 8, 8, 8), "model.hidden": 16,
        "model.dropout_rate": 0.0, "learning_rate": 0.05}


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def equiv(out: str, **overrides) -> None:
  c = tiny_config(**{"model.dropout_rate": 0.0, "learning_rate": 0.05, **overrides})
  ds = tiny_dataset(c)
  model = models.create_model(c, 3)
  opt = optim.make_optimizer(c, ds.info.steps_per_epoch)
  loss_fn = losses.make_loss_fn(c, ds.info.class_counts)
  state = steps_lib.create_train_state(c, model, ds.info.image_shape, opt, jax.random.PRNGKey(0),
                                       class_counts=ds.info.class_counts)
  schedule = optim.make_lr_schedule(c, ds.info.steps_per_epoch)
  steps = {meta_step: steps_lib.make_train_step(c, ds.info.meta_counts, model, loss_fn, opt, schedule, meta_step)
           for meta_step in (True, False)}  # update_rule='meta': with and without the meta update
  results = {}
  for name, devices in (("many", jax.local_devices()), ("one", jax.local_devices()[:1])):
    p_steps = {k: jax.pmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None), devices=devices,
                           donate_argnums=(0,)) for k, step in steps.items()}
    rstate = runtime.replicate(state, devices)
    it = ds.train_iter(0)
    for step in range(3):
      batch = next(it)  # (local_devices, per_device, ...) -> regroup for `devices`.
      batch = {k: v.reshape(len(devices), -1, *v.shape[2:]) for k, v in batch.items()}
      rstate, metrics = p_steps[steps_lib.is_meta_step(c, step) or c.meta.update_rule == "joint"](
          rstate, batch, jax.random.PRNGKey(1))
    results[name] = flat(runtime.unreplicate(rstate))
  np.savez(out, **{f"{n}:{k}": v for n, r in results.items() for k, v in r.items()},
           **{f"init:{k}": v for k, v in flat(jax.device_get(state)).items()})
  print(json.dumps({"devices": jax.local_device_count()}))


class KillingDataset:
  """Wraps a dataset; when the loop asks for batch `at`, sends `sig` to this process.

  With `wait_for`, first waits until that checkpoint step is finalized on disk.
  """

  def __init__(self, inner, at: int, sig: int, wait_for: str | None = None):
    self.inner, self.info, self.at, self.sig, self.wait_for = inner, inner.info, at, sig, wait_for

  def train_iter(self, start_step: int = 0):
    for step, batch in enumerate(self.inner.train_iter(start_step), start=start_step):
      if step == self.at:
        deadline = time.time() + 120
        while self.wait_for and not os.path.isdir(self.wait_for) and time.time() < deadline:
          time.sleep(0.05)
        os.kill(os.getpid(), self.sig)
      yield batch

  def eval_iter(self, split):
    return self.inner.eval_iter(split)


def install_fault(spec: str) -> None:
  """Makes this process send itself a signal at one moment of a run: `PHASE:AT:SIGNAL`.

  step:N        when the loop asks for the batch of step N (0-based), mid-training
  validation:N  at the start of the N-th validation pass (1-based) of this process
  save:N        right after the async write of the latest checkpoint of step N started
  commit:N      in the checkpoint writer, when step N's files are written but not yet committed
  report:0      in the middle of the final test report (before its ROC plot)
  build:K       in the dataset build, after K generated examples
  """
  phase, at, sig = spec.split(":")
  at, sig = int(at), getattr(signal, sig)

  def fire():
    os.kill(os.getpid(), sig)
    if sig == signal.SIGKILL:
      time.sleep(60)  # it lands here, before the code after the hook runs

  if phase == "step":
    init = train._Run.__init__

    def run_init(self, *args, **kwargs):
      init(self, *args, **kwargs)
      self.dataset = KillingDataset(self.dataset, at, sig)

    train._Run.__init__ = run_init
  elif phase == "validation":
    predict_split, calls = train.predict_split, [0]

    def counting_predict_split(p_eval_step, rstate, dataset, split):
      if split == "validation":
        calls[0] += 1
        if calls[0] == at:
          fire()
      return predict_split(p_eval_step, rstate, dataset, split)

    train.predict_split = counting_predict_split
  elif phase == "save":
    from dsn_saal_jax import checkpointing  # pylint: disable=g-import-not-at-top
    save = checkpointing.Checkpoints.save

    def firing_save(self, step, state, which="latest", **meta):
      saved = save(self, step, state, which, **meta)
      if saved and which == "latest" and step == at:
        fire()
      return saved

    checkpointing.Checkpoints.save = firing_save
  elif phase == "commit":
    rename = os.rename

    def firing_rename(src, dst, *args, **kwargs):
      if f"{os.sep}checkpoints{os.sep}{at}.orbax-checkpoint-tmp" in str(src):
        fire()
      return rename(src, dst, *args, **kwargs)

    os.rename = firing_rename
  elif phase == "report":
    from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top
    plot_roc = reporting.plot_roc

    def firing_plot_roc(*args, **kwargs):
      fire()
      return plot_roc(*args, **kwargs)

    reporting.plot_roc = firing_plot_roc
  elif phase == "build":
    from dsn_saal_jax.data.builders import synthetic_ct  # pylint: disable=g-import-not-at-top
    generate, count = synthetic_ct.SyntheticCt._generate_examples, [0]

    def firing_generate(self, *args, **kwargs):
      for example in generate(self, *args, **kwargs):
        count[0] += 1
        if count[0] == at:
          fire()
        yield example

    synthetic_ct.SyntheticCt._generate_examples = firing_generate
  else:
    raise ValueError(f"Unknown fault phase {phase!r} in {spec!r}.")


def meta_run(out: str) -> None:
  """update_rule='meta': N devices vs one (equiv), then resume == uninterrupted, all in this process."""
  equiv(out + ".equiv.npz", **META)
  c = tiny_config(num_train_steps=6, log_every_steps=2, checkpoint_every_steps=2, **META)
  finals = {"uninterrupted": train.train_and_evaluate(c, out + ".uninterrupted", dataset=tiny_dataset(c))}
  try:  # SIGTERM when the loop asks for batch 4 (two ahead of the step): saves step 3, then Preempted
    train.train_and_evaluate(c, out + ".resumed", dataset=KillingDataset(tiny_dataset(c), 4, signal.SIGTERM))
    raise AssertionError("the run was not preempted")
  except runtime.Preempted as e:
    print("PREEMPTED", e, flush=True)
  finals["resumed"] = train.train_and_evaluate(c, out + ".resumed", dataset=tiny_dataset(c))
  np.savez(out, **{f"{name}:{k}": v for name, state in finals.items() for k, v in flat(state).items()})


def record_syncs() -> list[list]:
  """Records, in order, each step the loop dispatches (["step", s]) and each cross-process sync the main thread
  makes (["sync", name]: JAX's allgather or barrier, or the trainer's agreement on the preemption flag)."""
  events = []
  step_fn = train._Run.step_fn

  def recording_step_fn(self, step):
    events.append(["step", step])
    return step_fn(self, step)

  def recording(name, fn):
    def call(*args, **kwargs):
      if threading.current_thread() is threading.main_thread():
        events.append(["sync", name])
      return fn(*args, **kwargs)
    return call

  train._Run.step_fn = recording_step_fn
  for name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all"):
    setattr(multihost_utils, name, recording(name, getattr(multihost_utils, name)))
  runtime.any_process = recording("preemption_flag", runtime.any_process)
  return events


def run_train(args) -> None:
  events = record_syncs() if args.record_syncs else None
  overrides = json.loads(args.overrides)
  c = tiny_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  ds = tiny_dataset(c)
  if args.kill_at >= 0:
    wait_for = os.path.join(args.workdir, "checkpoints", args.wait_for) if args.wait_for else None
    ds = KillingDataset(ds, args.kill_at, getattr(signal, args.signal), wait_for)
  try:
    state = train.train_and_evaluate(c, args.workdir, dataset=ds)
  except runtime.Preempted as e:
    print(f"PREEMPTED {e}", flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)
  if args.out:  # Every process writes its copy, so tests can check that all processes agree.
    np.savez(args.out if jax.process_count() == 1 else f"{args.out}.{jax.process_index()}.npz", **flat(state))
  if events is not None:
    print("SYNCS", json.dumps(events), flush=True)
  print("FINISHED", int(state.step), flush=True)


def main() -> None:
  dsn_saal_jax.setup_host(tensorflow=False)  # before JAX starts, as the launchers do; in-memory data: no TF
  logging.set_verbosity(logging.INFO)  # Tests read the trainer's log lines ("Resumed from ...").
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("equiv", "meta", "train", "multihost", "evaluate", "launch"))
  parser.add_argument("--fault", default="")
  parser.add_argument("--checkpoint", default="best")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", default="")
  parser.add_argument("--overrides", default="{}")
  parser.add_argument("--kill_at", type=int, default=-1)
  parser.add_argument("--signal", default="SIGTERM")
  parser.add_argument("--wait_for", default="")
  parser.add_argument("--record_syncs", action="store_true")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  argv = sys.argv[1:]
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  args = parser.parse_args(argv[:len(argv) - len(rest) - (1 if rest else 0)])
  if args.fault:
    install_fault(args.fault)
  if args.mode == "launch":
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")
    return
  if args.mode == "equiv":
    equiv(args.out)
    return
  if args.mode == "meta":
    meta_run(args.out)
    return
  if args.mode == "evaluate":
    c = tiny_config(**json.loads(args.overrides))
    result = train.evaluate(c, args.workdir, "test", args.checkpoint, dataset=tiny_dataset(c))
    print("EVALUATED", json.dumps({"accuracy": result["accuracy"], "step": result["checkpoint_step"]}))
    return
  if args.mode == "multihost":
    runtime.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  run_train(args)


if __name__ == "__main__":
  main()
