"""Orbax checkpoints of the train state: resume, keep-best, and a model check on restore.

Two managers live in the workdir: `checkpoints/` (periodic and on SIGTERM,
the resume point; the data position is the saved step) and `best/` (the one
checkpoint with the best validation metric so far). Each checkpoint holds the
host copy of the state and a JSON `meta` item with the model fingerprint, so
that a workdir written by a different model is refused with a clear message
instead of failing deep inside a tree restore. Orbax writes every checkpoint
to a temporary directory and renames it when complete, so a process killed
mid-save never leaves a half-written checkpoint that `latest_step` returns;
a step damaged afterwards (disk or copy faults) is set aside on restore and
the newest intact one used (`newest_intact`, which `predict` uses too). An
intact step whose stored tree does not fit the state to restore (another
optimizer, loss or update rule) is refused from orbax's metadata before any
array is read (`CheckpointMismatchError`), never taken for a damaged one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import config_lib, models


# Version of the `inference` meta item; dsn_saal_jax.predict refuses specs newer than it reads.
INFERENCE_SPEC_VERSION = 1
# Builders that read HU sources (DICOM, generated slices) window and lung-mask them always,
# whatever config.lung_mask says; see dsn_saal_jax/data/builders.
_HU_DATASETS = ("synthetic_ct", "covid19_diag", "image_folder")


def inference_spec(config: Any, info: Any) -> dict[str, Any]:
  """What prediction needs besides the weights: classes, preprocessing as in training, the model.

  `info` is the dataset's `DataInfo`. `lung_mask` says which inputs the run's
  training slices were lung-masked like: `dicom` (HU -> window -> mask) and
  `images` (8-bit slices). An in-memory dataset records no normalization
  (its arrays were model inputs already), so such a run predicts arrays only.
  """
  masked_images = config.dataset == "synthetic_ct" or bool(config.lung_mask)
  return {
      "version": INFERENCE_SPEC_VERSION,
      "dataset": config.dataset,
      "class_names": [str(n) for n in info.class_names],
      "image_size": int(info.image_shape[0]),
      "channels": int(info.image_shape[-1]),
      "normalization": dict(info.normalization),
      "lung_mask": {"dicom": config.dataset in _HU_DATASETS or masked_images, "images": masked_images},
      "eval_head": config.eval_head,
      # The flat keys of the config schema before issue 28, so that specs of either time read alike
      # (predict upgrades them with config_lib.upgrade).
      "model": {"backbone": config.backbone, "model": "dsn" if config.model.dsn else "baseline",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in models.config_kwargs(config).items()},
                "fuse_channels": int(config.model.fuse_channels), "loss": config.loss,
                "compute_dtype": config.compute_dtype},
  }


def model_fingerprint(config: Any, num_classes: int) -> dict[str, Any]:
  """What a checkpoint must agree on to be restored into this config's state."""
  shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in models.config_kwargs(config).items()
           if k != "dropout_rate"}
  return {"backbone": config.backbone, "model": "dsn" if config.model.dsn else "baseline",
          "num_classes": int(num_classes), "channels": int(config.channels), **shape,
          "fuse_channels": int(config.model.fuse_channels),
          "loss_params": "mwn" if config.loss == "mwn" else config.loss == "saal",
          "saal_alpha_param": config.loss_kwargs.saal.alpha_param, "saal_update_rule": config.meta.update_rule}


# What checkpoints written before a fingerprint key existed hold for it.
_LEGACY_FINGERPRINT = {"backbone": models.DEFAULT_BACKBONE, "width_scale": 1.0, "saal_alpha_param": "sigmoid",
                       "saal_update_rule": "joint"}


def fingerprint_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """'key: checkpoint X vs config Y' for every key of `expected` that `saved` disagrees with."""
  return [f"{k}: checkpoint {saved.get(k, _LEGACY_FINGERPRINT.get(k))!r} vs config {v!r}"
          for k, v in expected.items() if saved.get(k, _LEGACY_FINGERPRINT.get(k)) != v]


class CheckpointMismatchError(config_lib.ConfigError):
  """An intact checkpoint that this config's state cannot be restored from (another model or state tree).

  A ConfigError: launchers print it as one `Error:` line (exit status 2); the workdir is left as it is.
  """


# What differences under a state's top-level key most likely mean, for CheckpointMismatchError.
_TREE_CAUSES = {
    "opt_state": "another optimizer or optimizer settings (optim.make_optimizer)",
    "meta_opt_state": "another config.meta.update_rule (joint vs meta) or meta optimizer",
    "params": "another model shape or loss parameters (config.loss, config.model, config.loss_kwargs)",
    "batch_stats": "another model shape (config.model)",
}


def _flat_tree(tree: Any) -> dict[str, str]:
  """{'a/0/b': 'float32(3, 3)' or 'empty'} of a state tree or orbax's stored metadata of one.

  Paths are the keys as strings (a namedtuple's field and a dict key alike, as orbax stores them); an empty
  node (optax's EmptyState, stored as None) is a leaf 'empty', so that a state with one more or one fewer
  stateless transform differs too.
  """
  empty = lambda x: x is None or (isinstance(x, (tuple, list, dict)) and not x)
  name = lambda k: str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))

  def leaf(x: Any) -> str:  # an array, orbax's ArrayMetadata or ScalarMetadata, or a Python scalar
    if empty(x):
      return "empty"
    x = x if hasattr(x, "dtype") and hasattr(x, "shape") else np.asarray(x)
    return f"{np.dtype(x.dtype).name}{tuple(x.shape)}"

  return {"/".join(name(k) for k in path): leaf(x) for path, x in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=empty)[0]}


def tree_differences(saved: Any, expected: Any) -> list[str]:
  """'path: missing in checkpoint' | 'path: only in checkpoint' | 'path: checkpoint X vs config Y' for each leaf
  where `saved` (orbax's metadata of a stored tree) and `expected` (the tree to restore into) differ."""
  have, want = _flat_tree(saved), _flat_tree(expected)
  return ([f"{k}: missing in checkpoint" for k in want if k not in have]
          + [f"{k}: only in checkpoint" for k in have if k not in want]
          + [f"{k}: checkpoint {have[k]} vs config {want[k]}" for k in want if k in have and have[k] != want[k]])


class CheckpointDamagedError(RuntimeError):
  """No intact checkpoint where one was asked for: every committed step there is damaged (unreadable)."""


class _Unreadable(Exception):
  """A committed step whose files cannot be read back (its cause is orbax's or tensorstore's error)."""

  @property
  def reason(self) -> str:
    cause = self.__cause__
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]


@contextlib.contextmanager
def unreadable_as_damaged() -> Iterator[None]:
  """orbax/tensorstore errors while reading a committed step, as a damaged step for `newest_intact`."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many types)
    raise _Unreadable(e) from e


_Step = TypeVar("_Step")
_Read = TypeVar("_Read")


def newest_intact(steps: Sequence[_Step], read: Callable[[_Step], _Read]
                  ) -> tuple[_Read | None, list[tuple[_Step, str]]]:
  """(read(step) of the first of `steps` (newest first) that reads back whole, [(step, reason)] of the damaged
  ones tried before it); (None, all of them) if none does. The one "newest intact checkpoint" routine: the
  trainer's resume (`Checkpoints.restore`) and prediction (`predict.Predictor.from_checkpoint`) use it.

  A step is damaged when `read` raises orbax's or tensorstore's errors inside `unreadable_as_damaged()`
  (a truncated array file, missing metadata: a disk or copy fault, since orbax never commits a
  half-written step); any other error (another model's checkpoint or state tree, say) propagates.
  """
  damaged = []
  for step in steps:
    try:
      return read(step), damaged
    except _Unreadable as e:
      damaged.append((step, e.reason))
  return None, damaged


def committed_steps(directory: str) -> list[int]:
  """The committed steps of an orbax manager directory (WORKDIR/best, WORKDIR/checkpoints), newest first.

  Only committed steps have all-digit names: orbax writes a step under a
  temporary name and renames it when complete, so a checkpoint that a
  running job is still writing is never listed.
  """
  steps = (int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  return sorted(steps, reverse=True)


def _saved_tree(state: Any) -> Any:
  """The tree a checkpoint holds for `state`: the tree of before issue 28, whatever wrappers the state has since.

  A dataclass state becomes a dict of its fields, less those that are None: so
  the train state's optional `meta_opt_state` (update_rule='meta' only) adds
  nothing to other runs' checkpoints (orbax refuses a target with an entry the
  checkpoint lacks, even None). An `optax.masked` state (the weight-decay mask,
  `optim.decay_mask`) becomes its inner state: the mask holds no arrays.
  """
  if dataclasses.is_dataclass(state) and not isinstance(state, type):
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    state = {k: v for k, v in fields.items() if v is not None}
  masked = lambda x: isinstance(x, optax.MaskedState)
  return jax.tree_util.tree_map(lambda x: _saved_tree(x.inner_state) if masked(x) else x, state, is_leaf=masked)


def _from_saved_tree(target: Any, restored: Any) -> Any:
  """`_saved_tree`'s inverse: the arrays of `restored` (the tree `_saved_tree(target)`) in the tree of `target`."""
  treedef = jax.tree_util.tree_structure(target)
  numbered = jax.tree_util.tree_unflatten(treedef, range(treedef.num_leaves))
  position = jax.tree_util.tree_leaves(_saved_tree(numbered))  # each saved leaf's index among target's
  leaves = [None] * treedef.num_leaves
  for i, leaf in zip(position, jax.tree_util.tree_leaves(restored), strict=True):
    leaves[i] = leaf
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _all_finite(tree: Any) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


class Checkpoints:
  """The workdir's `checkpoints/` and `best/` managers behind one small interface."""

  def __init__(self, workdir: str, fingerprint: Mapping[str, Any], keep: int = 2,
               inference: Mapping[str, Any] | None = None, read_only: bool = False):
    """`read_only` (evaluation next to a running job): never delete or move anything in `workdir`."""
    self.workdir = os.path.abspath(workdir)
    self.read_only = read_only
    self.fingerprint = dict(fingerprint)
    self.inference = dict(inference) if inference is not None else None

    def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
      # Distinct barrier keys: otherwise both managers saving step s at once collide across processes.
      # Read-only, orbax would override (and warn about) anything that saves or deletes.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None if read_only else max_to_keep, save_interval_steps=0 if read_only else 1,
          create=not read_only, cleanup_tmp_directories=not read_only, read_only=read_only,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
      # Handlers named up front: a fresh manager's item_metadata (the tree check in `_read`) needs them.
      return ocp.CheckpointManager(os.path.join(self.workdir, name), options=options, item_handlers={
          "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    self.latest = manager("checkpoints", keep)
    self.best = manager("best", 1)
    self._saved = {"latest": set(self.latest.all_steps()), "best": set(self.best.all_steps())}

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which not in ("latest", "best"):
      raise ValueError(f"Checkpoint must be 'latest' or 'best', got {which!r}.")
    return self.latest if which == "latest" else self.best

  def latest_step(self, which: str = "latest") -> int | None:
    return self._manager(which).latest_step()

  def _read(self, which: str, step: int, target: Any | None, arrays: bool = True) -> tuple[Any, dict[str, Any]]:
    """(state or None, meta) of one step; `arrays=False` checks `target` against the stored tree only.

    The model and tree checks come before any array is read, so that a checkpoint of another model or
    state tree is refused as such (CheckpointMismatchError), never taken for a damaged one.
    """
    mgr = self._manager(which)
    with unreadable_as_damaged():
      meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    self._check_fingerprint(meta, which)
    if target is None:
      return None, meta
    saved_tree = _saved_tree(target)
    with unreadable_as_damaged():
      stored = mgr.item_metadata(step)["state"]
    if stored is not None:  # None: no tree metadata to check against; the restore below says what it is
      self._check_tree(stored, saved_tree, os.path.join(mgr.directory, str(step)), which)
    if not arrays:
      return None, meta
    with unreadable_as_damaged():
      restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved_tree)))
    return _from_saved_tree(target, restored["state"]), meta

  def _newest_intact(self, which: str, target: Any | None, arrays: bool = True
                     ) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest `which` step that reads back whole; damaged newer steps are set aside.

    A damaged step (truncated array file, missing metadata: a disk or copy
    fault, since orbax never commits a half-written step) is moved to
    `<workdir>/damaged/<which>/<step>`, not deleted, and named in the log. With
    no intact step left the run stops with an error naming every damaged path.
    An intact step of another model or state tree stops it too, and is left in place.
    """
    mgr = self._manager(which)
    found, damaged = newest_intact(sorted(mgr.all_steps(), reverse=True),
                                   lambda s: self._read(which, s, target, arrays))
    path = lambda step: os.path.join(mgr.directory, str(step))
    if found is None and damaged and which == "latest":
      listing = "; ".join(f"step {s} at {path(s)}: {r}" for s, r in damaged)
      raise CheckpointDamagedError(
          f"No intact checkpoint in {mgr.directory}: every step is damaged ({listing}). Move those "
          "directories away to start this run afresh, or use a new --workdir.")
    for bad_step, reason in damaged:  # a damaged best only: the next validation saves a new one
      self._set_aside(which, bad_step, path(bad_step), reason)
    if damaged:
      mgr.reload()
      self._saved[which] = set(mgr.all_steps())
    return found

  def _set_aside(self, which: str, step: int, path: str, reason: str) -> None:
    if self.read_only:
      logging.warning("The %s checkpoint of step %d (%s) is damaged and cannot be read (%s); using the newest "
                      "intact one.", which, step, path, reason)
      return
    dest = os.path.join(self.workdir, "damaged", which, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.replace(path, dest)
    logging.warning("The %s checkpoint of step %d (%s) is damaged and cannot be read (%s); it was moved to "
                    "%s and the newest intact one is used instead.", which, step, path, reason, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"dsn_saal_jax: set aside {which} {step}")

  def meta(self, which: str = "latest", target: Any | None = None) -> dict[str, Any] | None:
    """The meta item of the newest intact `which` checkpoint, or None if there is none.

    With `target`, the checkpoint must also hold its tree (checked from orbax's metadata; no array is
    read), so that a run learns at its start, not at its test report, that it cannot restore it.
    """
    found = self._newest_intact(which, target, arrays=False)
    return None if found is None else found[1]

  def _check_fingerprint(self, meta: Mapping[str, Any], which: str) -> None:
    diffs = fingerprint_differences(meta.get("fingerprint", {}), self.fingerprint)
    if diffs:
      raise CheckpointMismatchError(
          f"The workdir {self.workdir} holds a {which} checkpoint of a different model ({'; '.join(diffs)}). "
          "Use a new --workdir for this config, or set the config to match the checkpoint.")

  def _check_tree(self, stored: Any, expected: Any, path: str, which: str) -> None:
    """Refuses an intact step whose stored tree (orbax's metadata) is not `expected`'s, naming a few entries."""
    diffs = tree_differences(stored, expected)
    if not diffs:
      return
    kinds = ("missing in checkpoint", "only in checkpoint", " vs config ")
    examples = [d for kind in kinds for d in [d for d in diffs if kind in d][:2]]
    causes = sorted({_TREE_CAUSES.get(d.split("/")[0].split(":")[0], "another version of this code")
                     for d in diffs})
    raise CheckpointMismatchError(
        f"The workdir {self.workdir} holds a {which} checkpoint ({path}) of another state tree than this "
        f"config's ({len(diffs)} entries "
        f"differ, e.g. {'; '.join(examples)}); the same model, so likely {' or '.join(causes)}. It is intact "
        "and left in place. Use a new --workdir for this config, or set the config back to the checkpoint's "
        "(e.g. the optimizer, config.loss, config.meta.update_rule).")

  def restore(self, target: Any, which: str = "latest") -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest intact `which` checkpoint shaped like `target`, or None if there is none."""
    return self._newest_intact(which, target)

  def save(self, step: int, state: Any, which: str = "latest", **meta: Any) -> bool:
    """Saves a host copy of `state` unless step `step` is saved already; returns whether it saved.

    One save per step, whichever path asks (epoch boundary, SIGTERM, a replay
    after resume): orbax refuses a second one. Non-finite values are refused
    so that the last good checkpoint survives.
    """
    if int(step) in self._saved[which]:
      return False
    if not _all_finite(state):
      raise FloatingPointError(
          f"Refusing to save a non-finite state at step {step}; the last good checkpoint "
          f"(step {self.latest_step()}) in {self.workdir} is kept.")
    meta = {"fingerprint": self.fingerprint, "step": int(step),
            **({"inference": self.inference} if self.inference is not None else {}),
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}}
    self._manager(which).save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saved_tree(state)), meta=ocp.args.JsonSave(meta)), force=True)
    self._saved[which].add(int(step))
    return True

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
