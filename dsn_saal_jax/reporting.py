"""A run's report (metrics.json, confusion matrix, ROC, Grad-CAM grid) and its training-curve plots.

Grad-CAM (Selvaraju et al. 2017, the paper's Fig. 7) is taken at the feature
map each model marks (`models.layers.mark_cam`): for VGG the 7x7 adaptive
pool's output that feeds the first Linear, for the other backbones the last
feature map before their global pool. A zero perturbation there is
differentiated, so the model needs no hook and its outputs are unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
import shutil
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
from absl import logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top,wrong-import-position

from dsn_saal_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


MANIFEST = "manifest.json"
# What write_report writes (with evaluate --data's predictions.csv): a folder holding only these, one of them
# a report's metrics.json, is a report written before manifests existed, and may be replaced as well.
_LEGACY_FILES = frozenset({"metrics.json", "confusion_matrix.png", "roc.png", "gradcam.png", "predictions.csv"})


class ReportDirError(ValueError):
  """A report folder that write_report may not replace; the message names it and the fix."""


def write_report(out_dir: str, result: Mapping[str, Any], labels: np.ndarray, probs: np.ndarray,
                 model: nn.Module, variables: Mapping[str, Any], cam_images: np.ndarray, cam_labels: np.ndarray,
                 write_more: Callable[[str], None] | None = None) -> None:
  """metrics.json (`result`), the confusion matrix, ROC curves and a Grad-CAM grid of `cam_images` into `out_dir`.

  Training's split reports and `launch/evaluate.py --data` share it, so both
  read alike. Everything is written into a new folder beside `out_dir` and
  renamed into place when complete (`write_more(folder)` adds files first):
  a killed run never leaves a partial report. `out_dir` is replaced only when
  `check_report_dir` finds it is a report of ours; else ReportDirError, and
  nothing is touched.
  """
  out_dir = os.path.abspath(out_dir)
  check_report_dir(out_dir)
  class_names = result["class_names"]
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp_dir = f"{os.path.join(os.path.dirname(out_dir), '.' + os.path.basename(out_dir))}.tmp-{secrets.token_hex(4)}"
  os.makedirs(tmp_dir)  # a new name: no earlier folder of that name (ours or not) is ever removed
  try:
    with open(os.path.join(tmp_dir, "metrics.json"), "w") as f:
      f.write(metrics_lib.dumps(result, indent=2))
    plot_confusion_matrix(np.asarray(result["confusion_matrix"]), class_names,
                          os.path.join(tmp_dir, "confusion_matrix.png"))
    plot_roc(labels, probs, class_names, os.path.join(tmp_dir, "roc.png"))
    cams, cam_probs = grad_cam(model, variables, cam_images)
    plot_gradcam_grid(cam_images, cams, cam_labels, cam_probs, class_names, os.path.join(tmp_dir, "gradcam.png"))
    if write_more is not None:
      write_more(tmp_dir)
    written = {n: _sha256(os.path.join(tmp_dir, n)) for n in sorted(os.listdir(tmp_dir))}
    with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
      json.dump({"written_by": "dsn_saal_jax.reporting.write_report, which replaces this folder only while it "
                               "holds these files unchanged", "sha256": written}, f, indent=2)
    _replace_dir(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  logging.info("Report (%d examples) in %s: %s", result["num_examples"], out_dir,
               ", ".join(f"{k}={result[k]:.4f}" for k in metrics_lib.SUMMARY_KEYS))


def check_report_dir(out_dir: str) -> None:
  """Raises ReportDirError unless `out_dir` is new, empty, or a report write_report wrote and nobody changed since.

  Replacing a folder deletes it, so it must hold exactly the files its
  manifest lists, each with its recorded sha256. A folder without a
  manifest (a report of an earlier version) may go when it holds only files
  a report has, one of them a report's metrics.json.
  """
  if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
    kind = "a symbolic link" if os.path.islink(out_dir) else "an existing file"
    raise ReportDirError(f"{out_dir} is {kind}, not a report folder; nothing was written. Name a new folder for "
                         "the report.")
  names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
  problem = _not_a_report(out_dir, names) if names else None
  if problem:
    raise ReportDirError(f"{out_dir} is not a report folder this tool wrote ({problem}), and replacing it would "
                         "delete that; nothing was touched. Name a new folder for the report, or move this one away.")


def _not_a_report(folder: str, names: set[str]) -> str | None:
  """Why `folder` (holding `names`) is not an unchanged report of ours; None when it is one."""
  for name in sorted(names):
    if os.path.islink(os.path.join(folder, name)) or not os.path.isfile(os.path.join(folder, name)):
      return f"it holds {name!r}, which is not a plain file"
  if MANIFEST not in names:
    others = sorted(names - _LEGACY_FILES)
    if others:
      return f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
    try:
      with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
      return None if {"confusion_matrix", "class_names"} <= set(metrics) else "its metrics.json is not a report's"
    except (OSError, ValueError, TypeError):
      return "it has no report's metrics.json"
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      recorded = dict(json.load(f)["sha256"])
  except (OSError, ValueError, TypeError, KeyError):
    return f"its {MANIFEST} is not one this tool wrote"
  others = sorted(names - set(recorded) - {MANIFEST})
  if others:
    return f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, which the report did not write"
  changed = [n for n in sorted(names - {MANIFEST}) if _sha256(os.path.join(folder, n)) != recorded[n]]
  return f"{', '.join(changed)} changed since the report was written" if changed else None


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _replace_dir(src: str, dst: str) -> None:
  """Puts our new directory `src` at `dst`, replacing a report of ours there; `dst` is never seen half-written."""
  check_report_dir(dst)  # again, just before: the folder may have changed while the report was computed
  if not os.path.exists(dst):
    os.replace(src, dst)
    return
  old = f"{src}.old"  # beside our own new name, so no folder of the user's is in the way
  os.replace(dst, old)
  os.replace(src, dst)
  shutil.rmtree(old)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str) -> None:
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 1.0 * n))
  row = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  ax.imshow(row, cmap="Blues", vmin=0, vmax=1)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f"{cm[i, j]}\n{row[i, j]:.1%}", ha="center", va="center",
              color="white" if row[i, j] > 0.5 else "black", fontsize=9)
  ax.set_xticks(range(n), class_names, rotation=30, ha="right")
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str) -> None:
  """One-vs-rest ROC curve per class (for two classes, the positive class only)."""
  fig, ax = plt.subplots(figsize=(5, 5))
  classes = [1] if len(class_names) == 2 else range(len(class_names))
  for n in classes:
    y = (labels == n).astype(int)
    if y.min() == y.max():
      continue
    fpr, tpr, _ = skm.roc_curve(y, probs[:, n])
    ax.plot(fpr, tpr, label=f"{class_names[n]} (AUC {skm.auc(fpr, tpr):.3f})")
  ax.plot([0, 1], [0, 1], "k--", lw=0.8)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def grad_cam(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
             target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Grad-CAM maps (N, H, W) in [0, 1] of the final head's `target` class (default: predicted) and probs.

  Taken at the feature map each model marks with `models.layers.mark_cam`.
  """
  images = jnp.asarray(images, jnp.float32)
  classes = None if target is None else jnp.asarray(target)
  cam, probs = _grad_cam(model, variables, images, classes)
  return np.asarray(cam), np.asarray(probs)


@functools.partial(jax.jit, static_argnums=0)
def _grad_cam(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
              classes: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  heads, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  features = state["intermediates"]["cam"][0]
  classes = jnp.argmax(heads[-1], -1) if classes is None else classes

  def score(perturbation):
    logits = model.apply({**variables, "perturbations": {"cam": perturbation}}, images, train=False)[-1]
    return jnp.sum(jnp.take_along_axis(logits, classes[:, None], axis=1)), logits

  grads, logits = jax.grad(score, has_aux=True)(jnp.zeros_like(features))
  weights = jnp.mean(grads, axis=(1, 2), keepdims=True)
  cam = nn.relu(jnp.sum(weights * features, axis=-1)).astype(jnp.float32)
  cam = jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]), "bilinear")
  cam = cam / jnp.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12)
  return cam, jax.nn.softmax(logits, -1)


def _display_gray(image: np.ndarray) -> np.ndarray:
  """A normalized model input (H, W, C) as a [0, 1] gray image for display."""
  gray = image.mean(-1)
  return (gray - gray.min()) / max(gray.max() - gray.min(), 1e-12)


def plot_gradcam_grid(images: np.ndarray, cams: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                      class_names: Sequence[str], path: str) -> None:
  """Two rows per group of 8 examples: the input slice, and the Grad-CAM heat map over it."""
  n = len(images)
  cols = min(n, 8)
  groups = math.ceil(n / cols)
  fig, axes = plt.subplots(2 * groups, cols, figsize=(1.9 * cols, 4.0 * groups), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for k in range(n):
    g, c = divmod(k, cols)
    gray = _display_gray(images[k])
    pred = int(np.argmax(probs[k]))
    axes[2 * g, c].imshow(gray, cmap="gray")
    axes[2 * g, c].set_title(f"true {class_names[labels[k]]}", fontsize=8)
    axes[2 * g + 1, c].imshow(gray, cmap="gray")
    axes[2 * g + 1, c].imshow(cams[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[2 * g + 1, c].set_title(f"pred {class_names[pred]} {probs[k, pred]:.2f}", fontsize=8,
                                 color="green" if pred == labels[k] else "red")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_gradcam_overlay(image: np.ndarray, cam: np.ndarray, title: str, path: str) -> None:
  """One prediction: the preprocessed slice the model saw, and its Grad-CAM heat map over it."""
  gray = _display_gray(image)
  fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6))
  for ax in axes:
    ax.imshow(gray, cmap="gray")
    ax.axis("off")
  axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- training curves

History = Mapping[str, tuple[np.ndarray, np.ndarray]]  # scalar name -> (steps, values), as runtime.read_history


def plot_saal_history(groups: Mapping[str, Sequence[History]], path: str) -> None:
  """What SAAL learns, one column per group of runs (e.g. seeds of one setting), one line per run.

  Rows: alpha; beta_1..6 (mean over the group's runs); the class weights w_n
  the loss applied (log scale: alpha -> 1 drives w_n to 1/k_n); validation
  macro F1. Rows share their y-axis across columns so settings compare at a glance.
  """
  rows = ("alpha", "beta", "weights", "f1")
  fig, axes = plt.subplots(len(rows), len(groups), figsize=(4.2 * len(groups), 2.4 * len(rows)),
                           squeeze=False, sharex="col", sharey="row")
  for col, (label, runs) in enumerate(groups.items()):
    ax = axes[:, col]
    ax[0].set_title(f"{label} ({len(runs)} runs)", fontsize=10)
    for i, h in enumerate(runs):
      if "train/alpha" not in h:
        raise ValueError(f"Run {i} of {label!r} has no train/alpha: not a SAAL run.")
      ax[0].plot(*h["train/alpha"], lw=1)
      if "validation/macro_f1" in h:
        ax[3].plot(*h["validation/macro_f1"], lw=1)
      for k, name in enumerate(sorted(n for n in h if n.startswith("train/saal_weight_"))):
        label = name.rsplit("_weight_", 1)[1]
        ax[2].plot(*h[name], lw=1, color=f"C{k}", label=None if label in ax[2].get_legend_handles_labels()[1] else label)
    heads = sorted((n for n in runs[0] if n.startswith("train/beta_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    for k, name in enumerate(heads):
      steps = runs[0][name][0]
      mean = np.mean([h[name][1][:len(steps)] for h in runs if len(h[name][1]) >= len(steps)], axis=0)
      ax[1].plot(steps, mean, lw=1, label="final" if k == len(heads) - 1 else f"side {k + 1}")
    ax[2].set_yscale("log")
    ax[-1].set_xlabel("step")
    for a in ax[1:3]:
      if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7, ncol=2)
  weights = [v for runs in groups.values() for h in runs for n in h if n.startswith("train/saal_weight_")
             for v in h[n][1]]
  if weights:  # At least a decade (rows share y), so that float noise around a constant w_n stays flat.
    axes[2, 0].set_ylim(min(min(weights), 1.0) / 3, max(max(weights), 1.0) * 3)
  for a, name in zip(axes[:, 0], ("alpha", "beta_i (mean)", "w_n in use", "val. macro F1")):
    a.set_ylabel(name)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
