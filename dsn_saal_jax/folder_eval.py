"""A checkpoint measured on any labeled folder (cross-source evaluation), from its inference spec alone.

`launch/evaluate.py --data=FOLDER` needs no training config and no dataset
build: the folder is scanned as the `image_folder` builder scans it
(`data.folders`), each slice is fed as `Predictor` feeds files (the run's
preprocessing, from the checkpoint's spec), and the report is training's
(`reporting.write_report`) plus `predictions.csv`. Files that cannot be read
(undecodable, 16-bit, not an image) become CSV rows with their reason and are
counted in metrics.json; the rest are evaluated. The report has no `loss`:
the SAAL loss needs the training set's class counts, which the spec lacks.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from dsn_saal_jax import metrics as metrics_lib
from dsn_saal_jax import console, models, predict, reporting
from dsn_saal_jax.data import folders
from dsn_saal_jax.data.builders.common import DatasetError

SPLITS = tuple(folders.SPLIT_FOLDERS)


def parse_class_map(text: str) -> dict[str, str]:
  """'Healthy:non_covid,Covid:covid' -> {folder: class}; a malformed entry is refused by name."""
  mapping: dict[str, str] = {}
  for entry in filter(None, (e.strip() for e in text.split(","))):
    folder, sep, name = (part.strip() for part in entry.partition(":"))
    if not sep or not folder or not name:
      raise ValueError(f"Class map entry {entry!r} is not FOLDER:CLASS; write e.g. "
                       "--class_map=Healthy:non_covid,Covid:covid.")
    if folder in mapping:
      raise ValueError(f"Class map names folder {folder!r} twice ({mapping[folder]} and {name}); keep one.")
    mapping[folder] = name
  if not mapping:
    raise ValueError(f"Class map {text!r} is empty; write e.g. --class_map=Healthy:non_covid,Covid:covid.")
  return mapping


def default_out_dir(workdir: str, data: str, checkpoint: str, split: str | None = None) -> str:
  """WORKDIR/report/data_<folder>[_<split>]_<checkpoint>: beside training's reports, never over them."""
  name = os.path.basename(os.path.normpath(os.path.abspath(data)))
  return os.path.join(workdir, "report", "_".join(["data", name, *([split] if split else []), checkpoint]))


def _overlap(a: str, b: str) -> bool:
  """Whether real paths `a` and `b` are the same, or one lies inside the other."""
  return os.path.commonpath([a, b]) in (a, b)


def check_out_dir(out_dir: str, data: str, workdir: str | None = None) -> None:
  """Raises reporting.ReportDirError unless `out_dir` may take the report of `data` (nothing is touched).

  It may not be, hold or lie inside the folder evaluated, nor be or hold the
  run's `workdir`, nor be, hold or lie inside the workdir's own entries
  (checkpoints/, best/, ...; only a folder inside report/ is fine); and it
  must be new, empty or a report of ours (`reporting.check_report_dir`) of
  a --data evaluation, not a split's (training's report/test/).
  """
  out = os.path.realpath(out_dir)
  if _overlap(out, os.path.realpath(data)):
    raise reporting.ReportDirError(
        f"--out={out_dir} is, holds or lies inside the folder being evaluated ({data}); the report must go "
        "elsewhere. Drop --out (the report goes to WORKDIR/report/) or name a folder outside it.")
  if workdir is not None and os.path.isdir(workdir):
    work = os.path.realpath(workdir)
    own = [os.path.join(work, n) for n in sorted(os.listdir(work)) if n != "report"]
    inside = out != work and os.path.commonpath([out, work]) == work  # a new entry, or inside report/
    if _overlap(out, work) and not (inside and out != os.path.join(work, "report")
                                    and not any(_overlap(out, p) for p in own)):
      raise reporting.ReportDirError(
          f"--out={out_dir} is, holds or lies inside the run's own files ({workdir}: checkpoints, logs, "
          "training's reports); the report must not replace them. Drop --out (the report goes to "
          f"{os.path.join(workdir, 'report', 'data_...')}) or name a folder outside {workdir}.")
  reporting.check_report_dir(out_dir)
  try:  # a report of ours: only one of a --data evaluation, never a split's that sweeps read (report/test)
    with open(os.path.join(out_dir, "metrics.json")) as f:
      split_report = "data" not in json.load(f)
  except (OSError, ValueError):
    split_report = False
  if split_report:
    raise reporting.ReportDirError(
        f"--out={out_dir} is the report of a split of the run's own dataset (written by training or evaluate "
        "--config), which a --data evaluation does not replace. Drop --out, or name another folder.")


def _slices(folder: folders.LabeledFolder, split: str | None) -> list[folders.Slice]:
  if split is None:
    return list(folder.slices)
  if not folder.explicit_splits:
    raise DatasetError(f"--split={split} needs split folders ({folder.root}/train, val, test), but "
                       f"{folder.root} holds class folders only. Drop --split to evaluate every slice.")
  chosen = [s for s in folder.slices if s.split == split]
  if not chosen:
    present = sorted({s.split for s in folder.slices})
    raise DatasetError(f"{folder.root} has no {split} split folder (it has {present}). Pick one of those.")
  return chosen


def _write_csv(path: str, folder: folders.LabeledFolder, slices: list[folders.Slice],
               results: list[predict.Prediction], skipped: list[tuple[str, str]]) -> None:
  """One row per file: id, true class, then predict.py's columns (path, prediction, prob_<class>..., error).

  `skipped` files (under the class folders, but no slice by extension) close
  the table, with an empty prediction and the reason, as unreadable slices have.
  """
  names = folder.class_names
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "true_class", *predict.csv_header(names)])
    for s, p in zip(slices, results):
      writer.writerow([s.id, names[s.label], *predict.csv_row(p, len(names))])
    for rel, reason in skipped:
      file = os.path.join(os.fspath(folder.root), rel)
      writer.writerow([rel, "", *predict.csv_row(predict.Prediction(file, error=f"{file}: {reason}"), len(names))])


def evaluate_folder(predictor: predict.Predictor, data: str, out_dir: str, *,
                    class_map: Mapping[str, str] | None = None, split: str | None = None,
                    gradcam_per_class: int = 4, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates `predictor` on the labeled folder `data`; writes the report into `out_dir` and returns metrics.json.

  Without `class_map` the folder names must be the run's class names. With
  explicit split folders every slice is evaluated, or only `split`'s
  ('train', 'val', 'test'). Raises DatasetError (naming the folder) for a
  layout or class map that does not fit the run, or when no slice is readable;
  reporting.ReportDirError, before any work, for an `out_dir` that is not
  ours to replace (`check_out_dir`).
  """
  check_out_dir(out_dir, data)
  folder = folders.scan(data, predictor.class_names, class_map, require_train=False)
  slices = _slices(folder, split)
  results = list(console.progress(predictor.iter_predictions([os.fspath(s.path) for s in slices]), len(slices),
                                  "slices"))
  good = [i for i, r in enumerate(results) if r.error is None]
  unreadable = {slices[i].id: r.error for i, r in enumerate(results) if r.error is not None}
  for reason in unreadable.values():
    logging.error("%s", reason)
  if not good:
    raise DatasetError(f"None of the {len(slices)} slices under {folder.root} could be read, e.g. "
                       f"{next(iter(unreadable.values()))}")
  skipped = [(rel, reason) for rel, reason in folder.skipped
             if split is None or rel.split("/")[0].lower() in folders.SPLIT_FOLDERS[split]]
  if skipped:
    logging.warning("Skipping %d files under %s that are neither images nor DICOM, e.g. %s", len(skipped),
                    folder.root, skipped[0][0])
  labels = np.array([slices[i].label for i in good])
  probs = np.stack([results[i].probs for i in good])
  result = metrics_lib.compute_metrics(labels, probs, predictor.class_names)
  spec_model = predictor.spec["model"]
  result.update({
      "data": os.fspath(folder.root), "split": split or "all", "class_map": dict(class_map) if class_map else None,
      "backbone": spec_model.get("backbone", models.DEFAULT_BACKBONE), "model": spec_model["model"],
      "eval_head": predictor.eval_head, "num_params": models.count_params(predictor.variables["params"]),
      "checkpoint_dir": predictor.source, "num_unreadable": len(unreadable), "num_skipped": len(skipped),
      "unreadable": unreadable, **(extra or {})})
  cam_rows = []  # the first `gradcam_per_class` readable slices of each class, as training's report shows
  for n in range(len(folder.class_names)):
    cam_rows += [i for i in good if slices[i].label == n][:gradcam_per_class]
  cam_images = np.stack([predictor.load(os.fspath(slices[i].path)) for i in cam_rows])
  reporting.write_report(
      out_dir, result, labels, probs, predictor.model, predictor.variables, cam_images,
      np.array([slices[i].label for i in cam_rows]),
      write_more=lambda tmp: _write_csv(os.path.join(tmp, "predictions.csv"), folder, slices, results, skipped))
  return result
