"""Subprocess worker for the trainer tests that need their own JAX process.

Device counts (XLA_FLAGS), `jax.distributed` and signals must not touch the
pytest process, so tests run this script and compare the `.npz` it writes.
Modes:
  equiv      train_step pmapped over all local devices vs over one device, same global batch.
  train      train_and_evaluate on a tiny in-memory problem; optionally kills itself.
  multihost  as `train`, after jax.distributed.initialize on localhost.
  evaluate   train.evaluate of a trained workdir (restores a checkpoint, writes the report).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import logging

from dsn_saal_jax import config_lib, train
from dsn_saal_jax.array_dataset import ArrayDataset

CLASSES = ("normal", "pneumonia", "covid")


def tiny_config(**overrides) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.widths, c.hidden, c.image_size = (8, 16, 16, 32, 32), 64, 32
  c.batch_size = c.eval_batch_size = 16
  c.learning_rate, c.num_train_steps, c.log_every_steps = 0.02, 12, 4
  c.checkpoint_every_steps, c.gradcam_per_class = 4, 2
  for k, v in overrides.items():
    c[k] = v
  return c


def blobs(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Images whose mean brightness and a bright square encode the class; imbalanced 3:2:1."""
  rng = np.random.default_rng(seed)
  y = rng.choice(3, size=n, p=[0.5, 1 / 3, 1 / 6])
  x = rng.normal(0, 0.5, size=(n, size, size, 1)).astype(np.float32)
  for i, label in enumerate(y):
    x[i, 4 + 8 * label:12 + 8 * label, 8:16] += 2.0
  return x, y.astype(np.int32)


def tiny_dataset(config) -> ArrayDataset:
  return ArrayDataset(blobs(64, 0), {"validation": blobs(24, 1), "test": blobs(29, 2)}, CLASSES,
                      config.batch_size, config.eval_batch_size, seed=config.seed)


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def equiv(out: str) -> None:
  c = tiny_config(dropout_rate=0.0, learning_rate=0.05)
  ds = tiny_dataset(c)
  model = train.create_model(c, 3)
  opt = train.make_optimizer(c, ds.info.steps_per_epoch)
  loss_fn = train.make_loss_fn(c, ds.info.class_counts)
  state = train.create_train_state(c, model, ds.info.image_shape, opt, jax.random.PRNGKey(0))
  step = functools.partial(train.train_step, model=model, loss_fn=loss_fn, optimizer=opt,
                           learning_rate_fn=train.make_lr_schedule(c, ds.info.steps_per_epoch))
  results = {}
  for name, devices in (("many", jax.local_devices()), ("one", jax.local_devices()[:1])):
    p_step = jax.pmap(step, axis_name=train.AXIS, in_axes=(0, 0, None), devices=devices)
    rstate = train.replicate(state, devices)
    it = ds.train_iter(0)
    for _ in range(3):
      batch = next(it)  # (local_devices, per_device, ...) -> regroup for `devices`.
      batch = {k: v.reshape(len(devices), -1, *v.shape[2:]) for k, v in batch.items()}
      rstate, metrics = p_step(rstate, batch, jax.random.PRNGKey(1))
    results[name] = flat(train.unreplicate(rstate))
  np.savez(out, **{f"{n}:{k}": v for n, r in results.items() for k, v in r.items()},
           **{f"init:{k}": v for k, v in flat(jax.device_get(state)).items()})
  print(json.dumps({"devices": jax.local_device_count()}))


class KillingDataset:
  """Wraps a dataset; when the loop asks for batch `at`, sends `sig` to this process.

  With `wait_for`, first waits until that checkpoint step is finalized on disk.
  """

  def __init__(self, inner, at: int, sig: int, wait_for: str | None):
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


def run_train(args) -> None:
  overrides = json.loads(args.overrides)
  c = tiny_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  ds = tiny_dataset(c)
  if args.kill_at >= 0:
    wait_for = os.path.join(args.workdir, "checkpoints", args.wait_for) if args.wait_for else None
    ds = KillingDataset(ds, args.kill_at, getattr(signal, args.signal), wait_for)
  try:
    state = train.train_and_evaluate(c, args.workdir, dataset=ds)
  except train.Preempted as e:
    print(f"PREEMPTED {e}", flush=True)
    sys.exit(3)
  if args.out:  # Every process writes its copy, so tests can check that all processes agree.
    np.savez(args.out if jax.process_count() == 1 else f"{args.out}.{jax.process_index()}.npz", **flat(state))
  print("FINISHED", int(state.step), flush=True)


def main() -> None:
  logging.set_verbosity(logging.INFO)  # Tests read the trainer's log lines ("Resumed from ...").
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("equiv", "train", "multihost", "evaluate"))
  parser.add_argument("--checkpoint", default="best")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", default="")
  parser.add_argument("--overrides", default="{}")
  parser.add_argument("--kill_at", type=int, default=-1)
  parser.add_argument("--signal", default="SIGTERM")
  parser.add_argument("--wait_for", default="")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  args = parser.parse_args()
  if args.mode == "equiv":
    equiv(args.out)
    return
  if args.mode == "evaluate":
    c = tiny_config(**json.loads(args.overrides))
    result = train.evaluate(c, args.workdir, "test", args.checkpoint, dataset=tiny_dataset(c))
    print("EVALUATED", json.dumps({"accuracy": result["accuracy"], "step": result["checkpoint_step"]}))
    return
  if args.mode == "multihost":
    train.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  run_train(args)


if __name__ == "__main__":
  main()
