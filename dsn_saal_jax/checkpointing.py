"""Orbax checkpoints of the train state: resume, keep-best, and a model check on restore.

Two managers live in the workdir: `checkpoints/` (periodic and on SIGTERM,
the resume point; the data position is the saved step) and `best/` (the one
checkpoint with the best validation metric so far). Each checkpoint holds the
host copy of the state and a JSON `meta` item with the model fingerprint, so
that a workdir written by a different model is refused with a clear message
instead of failing deep inside a tree restore. Orbax writes every checkpoint
to a temporary directory and renames it when complete, so a process killed
mid-save never leaves a half-written checkpoint that `latest_step` returns.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


# Version of the `inference` meta item; dsn_saal_jax.predict refuses specs newer than it reads.
INFERENCE_SPEC_VERSION = 1
# Builders that read HU sources (DICOM, generated slices) window and lung-mask them always,
# whatever config.lung_mask says; see dsn_saal_jax/data/builders.
_HU_DATASETS = ("synthetic_ct", "covid19_diag")


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
      "model": {"model": config.model, "widths": [int(w) for w in config.widths],
                "stages": [int(s) for s in config.stages], "hidden": int(config.hidden),
                "fuse_channels": int(config.fuse_channels), "dropout_rate": float(config.dropout_rate),
                "loss": config.loss, "compute_dtype": config.compute_dtype},
  }


def _all_finite(tree: Any) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


class Checkpoints:
  """The workdir's `checkpoints/` and `best/` managers behind one small interface."""

  def __init__(self, workdir: str, fingerprint: Mapping[str, Any], keep: int = 2,
               inference: Mapping[str, Any] | None = None):
    self.workdir = os.path.abspath(workdir)
    self.fingerprint = dict(fingerprint)
    self.inference = dict(inference) if inference is not None else None

    def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
      # Distinct barrier keys: otherwise both managers saving step s at once collide across processes.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
      return ocp.CheckpointManager(os.path.join(self.workdir, name), options=options, item_names=("state", "meta"))

    self.latest = manager("checkpoints", keep)
    self.best = manager("best", 1)

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which not in ("latest", "best"):
      raise ValueError(f"Checkpoint must be 'latest' or 'best', got {which!r}.")
    return self.latest if which == "latest" else self.best

  def latest_step(self, which: str = "latest") -> int | None:
    return self._manager(which).latest_step()

  def meta(self, which: str = "latest") -> dict[str, Any] | None:
    mgr = self._manager(which)
    step = mgr.latest_step()
    if step is None:
      return None
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _check_fingerprint(self, meta: Mapping[str, Any], which: str) -> None:
    saved = meta.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in self.fingerprint.items()
             if saved.get(k) != v]
    if diffs:
      raise ValueError(
          f"The workdir {self.workdir} holds a {which} checkpoint of a different model ({'; '.join(diffs)}). "
          "Use a new --workdir for this config, or set the config to match the checkpoint.")

  def restore(self, target: Any, which: str = "latest") -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest `which` checkpoint shaped like `target`, or None if there is none."""
    meta = self.meta(which)
    if meta is None:
      return None
    self._check_fingerprint(meta, which)
    mgr = self._manager(which)
    step = mgr.latest_step()
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"], meta

  def save(self, step: int, state: Any, which: str = "latest", **meta: Any) -> None:
    """Saves a host copy of `state`; refuses non-finite values so the last good checkpoint survives."""
    if not _all_finite(state):
      raise FloatingPointError(
          f"Refusing to save a non-finite state at step {step}; the last good checkpoint "
          f"(step {self.latest_step()}) in {self.workdir} is kept.")
    meta = {"fingerprint": self.fingerprint, "step": int(step),
            **({"inference": self.inference} if self.inference is not None else {}),
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}}
    self._manager(which).save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
