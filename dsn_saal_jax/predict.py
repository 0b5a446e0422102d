"""Predictions for users: CT slices (PNG, JPEG, DICOM) -> class probabilities, with Grad-CAM.

Every checkpoint carries an inference spec (`checkpointing.inference_spec`):
class names, input size and normalization, which inputs the training slices
were lung-masked like, and the model fields. A `Predictor` therefore needs
neither the dataset nor the config, and feeds each file exactly as training did:

* DICOM (.dcm, .dicom, or any file pydicom recognizes): HU -> window
  WL -400 / WW 1500 -> lung mask (data/ct.py), masked as the spec says. Only
  CT slices with a rescale to HU; others (MR, ...) are refused by name.
* 8-bit images (PNG, JPEG, BMP, TIFF): to gray as the TFDS builders store
  slices, i.e. PIL's "L" (ITU-R 601-2 luma of RGB; alpha is dropped, not
  composited), so a slice saved as gray, RGB or RGBA predicts the same;
  lung-masked as the spec says. Images of more than 8 bits are refused.
* then `input_pipeline.preprocess`: resize to the run's size, gray repeated to
  its channels, normalized with its statistics. Slices under 16 px a side are
  refused, and a warning names any more than twice as long as wide.

Batches have a fixed size, the last one padded, so one compiled program serves
every batch. COVIDx-CT runs were trained on slices cropped to the body box:
crop inputs the same way.

One module (~500 lines) because it is one tool end to end, in the order a
file goes through it: inputs, the checkpoint, the `Predictor`, the CSV and
overlays; checkpoints are read through `checkpointing` and models built by
`models`, nothing of the trainer.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import secrets
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from PIL import Image

from dsn_saal_jax import checkpointing, config_lib, console, losses, models
from dsn_saal_jax.data import builders, ct, folders, input_pipeline
from dsn_saal_jax.data.builders import common
from dsn_saal_jax.models import predict_probs

CHECKPOINT_DIRS = {"best": "best", "latest": "checkpoints"}


class InputError(ValueError):
  """A file that cannot be predicted; the message names it and the fix."""


class CheckpointError(ValueError):
  """A checkpoint that cannot serve predictions; the message names it and the fix."""


class OutputError(ValueError):
  """An output path that would overwrite what this tool did not write; the message names it and the fix."""


@dataclasses.dataclass
class Prediction:
  """One input's result: `probs` over the class names and the predicted `label`, or the `error`."""
  path: str
  probs: np.ndarray | None = None
  label: str | None = None
  error: str | None = None
  image: np.ndarray | None = None  # The model input (S, S, C), kept only for Grad-CAM overlays.
  cam: np.ndarray | None = None    # Grad-CAM (S, S) in [0, 1] of `label`, when asked for.


# ----------------------------------------------------------------------------- inputs


def find_inputs(inputs: Sequence[str]) -> tuple[list[str], list[Prediction]]:
  """(files to predict, error rows) from files and folders, folders searched recursively and sorted.

  A file given by name is always tried, so a bad one gets its own error. In
  folders, files are listed as the labeled-folder scan lists them
  (`folders.walk_files`, `folders.count_once`: each real file once, no link
  followed back into the folder); those with an image or DICOM extension and
  files pydicom recognizes (`common.is_slice`) are taken, others skipped with
  a warning. A missing path or a folder without slices becomes an error row.
  """
  files: list[str] = []
  problems: list[Prediction] = []
  for given in inputs:
    if os.path.isfile(given):
      files.append(given)
    elif os.path.isdir(given):
      listed, passed = folders.walk_files(given)
      listed, duplicates = folders.count_once(listed, given)
      folders.warn_passed_over(passed + duplicates, given)
      found = [p for p in listed if common.is_slice(p)]
      skipped = sorted(set(listed) - set(found))
      if skipped:
        logging.warning("Skipping %d files under %s that are neither images nor DICOM, e.g. %s",
                        len(skipped), given, skipped[0])
      if not found:
        problems.append(Prediction(given, error=(
            f"{given}: folder holds no PNG, JPEG or DICOM files{' (only other files)' if skipped else ''}. "
            "Pass a folder of CT slices.")))
      files.extend(found)
    else:
      problems.append(Prediction(given, error=f"{given}: no such file or folder."))
  unique = list(dict.fromkeys(os.path.normpath(f) for f in files))
  return unique, problems


def read_slice(path: str, lung_mask: Mapping[str, bool]) -> np.ndarray:
  """A file as the TFDS datasets store slices: (H, W, 1) uint8, lung-masked as `lung_mask` says."""
  try:
    if common.is_dicom(path):
      return common.check_slice_shape(ct.preprocess_dicom(path, mask=lung_mask["dicom"])[:, :, None], path)
    with open(path, "rb") as f:
      data = f.read()
    return common.check_slice_shape(common.decode_image(data, path, mask=lung_mask["images"]), path)
  except ct.CTReadError as e:
    raise InputError(str(e)) from e
  except common.DatasetError as e:
    if e.__cause__ is None:  # The builders' own diagnosis, e.g. a 16-bit image.
      raise InputError(str(e)) from e
    raise InputError(
        f"{path}: neither a readable image (PNG, JPEG, ...) nor a DICOM file "
        f"({type(e.__cause__).__name__}: {e.__cause__}). Re-export it, or remove it from the inputs.") from e
  except OSError as e:
    raise InputError(f"{path}: cannot read the file ({e}).") from e


def to_gray(image: np.ndarray, name: str, lung_mask: Mapping[str, bool]) -> np.ndarray:
  """An 8-bit gray, RGB or RGBA array -> (H, W, 1) uint8 slice, converted and masked as files are."""
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise InputError(f"{name}: dtype {a.dtype}; arrays must be 8-bit windowed slices (uint8). "
                     "Window HU slices with dsn_saal_jax.data.ct.window first.")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[:, :, 0]
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    a = np.asarray(Image.fromarray(a).convert("L"))
  if a.ndim != 2:
    raise InputError(f"{name}: shape {a.shape}; expected (H, W) gray or (H, W, 1|3|4) gray/RGB/RGBA.")
  if lung_mask["images"]:
    a = ct.apply_lung_mask(a)
  return a[:, :, None]


# ----------------------------------------------------------------------------- checkpoints


def spec_from_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The spec a run of `config` writes: for checkpoints saved before specs existed (needs no data)."""
  config_lib.validate_config(config, jax.device_count())
  normalization = input_pipeline.normalization_for(config)
  info = types.SimpleNamespace(
      class_names=builders.make_builder(config).info.features["label"].names,
      image_shape=(config.image_size, config.image_size, normalization["channels"]),
      normalization=normalization)
  return checkpointing.inference_spec(config, info)


def _step_dirs(path: str) -> list[str]:
  """A checkpoint step directory, or the committed steps of a manager directory (WORKDIR/best), newest first."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint directory. Pass WORKDIR/best/<step> or "
                          "WORKDIR/checkpoints/<step>, or --workdir=WORKDIR.")
  if os.path.isdir(os.path.join(path, "state")) or os.path.isdir(os.path.join(path, "meta")):
    return [path]
  steps = checkpointing.committed_steps(path)
  if steps:
    return [os.path.join(path, str(s)) for s in steps]
  if any(os.path.isdir(os.path.join(path, d)) for d in CHECKPOINT_DIRS.values()):
    raise CheckpointError(f"{path} is a training workdir, not a checkpoint: pass --workdir={path} "
                          "(with --checkpoint=best|latest), or use Predictor.from_workdir.")
  return [path]  # Let _load say what it is not.


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(v.shape)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_weights(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Raises CheckpointError unless `saved` (checkpoint metadata) has exactly the model's variables."""
  params, _ = losses.split_params(saved.get("params", {}))
  have = _flat_shapes({"params": params, "batch_stats": saved.get("batch_stats", {})})
  want = _flat_shapes(expected)
  problems = ([f"missing {k}" for k in want if k not in have] + [f"unexpected {k}" for k in have if k not in want]
              + [f"{k}: {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]])
  if problems:
    raise CheckpointError(
        f"{where}: its weights do not fit the model it describes ({len(problems)} differences, e.g. "
        f"{'; '.join(problems[:4])}). It is a checkpoint of another model: pass the --config it was "
        "trained with, or a checkpoint of this model.")


def _load(step_dir: str, config: ml_collections.ConfigDict | None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(inference spec, {'params', 'batch_stats'}) of one checkpoint step directory.

  Files that cannot be read make it a damaged step for `checkpointing.newest_intact`.
  """
  if not (os.path.isdir(os.path.join(step_dir, "state")) and os.path.isdir(os.path.join(step_dir, "meta"))):
    raise CheckpointError(
        f"{step_dir} is not a dsn_saal_jax training checkpoint (no 'state' and 'meta' items). Pass a "
        "checkpoint from a launch/train.py workdir; launch/convert_torchvision.py writes ImageNet "
        "initializations for training, not classifiers.")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      state=ocp.PyTreeCheckpointHandler(), meta=ocp.JsonCheckpointHandler())) as checkpointer:
    with checkpointing.unreadable_as_damaged():
      meta = checkpointer.restore(step_dir, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if config is not None:
      spec = spec_from_config(config)
      fingerprint = checkpointing.model_fingerprint(config, len(spec["class_names"]))
      diffs = checkpointing.fingerprint_differences(meta.get("fingerprint", {}), fingerprint)
      if diffs:
        raise CheckpointError(f"{step_dir} holds a different model than the config ({'; '.join(diffs)}). "
                              "Pass the --config the run was trained with.")
    elif "inference" in meta:
      spec = meta["inference"]
    else:
      raise CheckpointError(
          f"{step_dir} was saved before checkpoints carried an inference spec (class names, "
          "preprocessing, model). Retrain with this version, or pass the run's training config: "
          "--config=configs/<file>.py (Predictor.from_checkpoint(path, config=...)).")
    if spec.get("version", 0) > checkpointing.INFERENCE_SPEC_VERSION:
      raise CheckpointError(f"{step_dir}: inference spec version {spec['version']} is newer than this "
                            f"code reads ({checkpointing.INFERENCE_SPEC_VERSION}); update dsn_saal_jax.")
    model = _model(spec)
    size, channels = spec["image_size"], spec["channels"]
    expected = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                                 jnp.zeros((1, size, size, channels)), train=False))
    expected = {"params": expected["params"], "batch_stats": expected["batch_stats"]}
    with checkpointing.unreadable_as_damaged():
      saved = checkpointer.metadata(step_dir).item_metadata["state"]
    _check_weights(saved, expected, step_dir)
    with checkpointing.unreadable_as_damaged():
      restored = checkpointer.restore(step_dir, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=expected, partial_restore=True)))["state"]
  return spec, restored


def _model(spec: Mapping[str, Any]):
  # Specs written before mixed precision or other backbones existed: float32 VGG16-BN. A spec's model entry
  # keeps the flat keys of the config schema before issue 28 (model: dsn|baseline, widths, ...): upgrade them.
  fields = config_lib.upgrade({"compute_dtype": "float32", "backbone": models.DEFAULT_BACKBONE, **spec["model"]})
  return models.create_model(ml_collections.ConfigDict(fields), len(spec["class_names"]), axis_name=None)


# ----------------------------------------------------------------------------- the predictor


class Predictor:
  """A trained checkpoint that classifies CT slices; build it with `from_workdir` or `from_checkpoint`.

  `eval_head` defaults to the run's ('final' or 'mean' of the six softmaxes).
  """

  def __init__(self, spec: Mapping[str, Any], variables: Mapping[str, Any], *, batch_size: int = 32,
               eval_head: str | None = None, source: str = "<in-memory>"):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.spec, self.source, self.batch_size = dict(spec), source, batch_size
    self.class_names = tuple(spec["class_names"])
    self.eval_head = eval_head or spec["eval_head"]
    if self.eval_head not in config_lib.EVAL_HEADS:
      raise ValueError(f"eval_head must be one of {', '.join(config_lib.EVAL_HEADS)}, got {self.eval_head!r}.")
    self.input_shape = (spec["image_size"], spec["image_size"], spec["channels"])
    self.model = _model(spec)
    # On the device once: jit arguments given as NumPy would be copied at every call.
    network, _ = losses.split_params(variables["params"])
    self.variables = jax.tree_util.tree_map(jnp.asarray,
                                            {"params": network, "batch_stats": variables["batch_stats"]})
    model, head = self.model, self.eval_head
    self._probs = jax.jit(lambda v, x: predict_probs(model.apply(v, x, train=False), head))
    self._preprocess = None

  @classmethod
  def from_checkpoint(cls, path: str, config: ml_collections.ConfigDict | None = None, **kwargs) -> Predictor:
    """From a step directory (WORKDIR/best/<step>) or a manager directory (its newest step).

    `config` (the run's training config) replaces the stored spec; it is needed
    only for checkpoints saved before specs existed, and must match the weights.
    """
    step_dirs = _step_dirs(os.path.abspath(path))
    found, damaged = checkpointing.newest_intact(step_dirs, lambda step_dir: (step_dir, _load(step_dir, config)))
    damage = [f"{step_dir} cannot be read ({reason}): it is damaged (a truncated or missing file)"
              for step_dir, reason in damaged]
    if found is None:
      raise checkpointing.CheckpointDamagedError("; ".join(damage))
    for text in damage:
      logging.warning("%s; using the next older step.", text)
    step_dir, (spec, variables) = found
    return cls(spec, variables, source=step_dir, **kwargs)

  @classmethod
  def from_workdir(cls, workdir: str, which: str = "best", config: ml_collections.ConfigDict | None = None,
                   **kwargs) -> Predictor:
    """The run's `which` checkpoint: 'best' (by the validation metric) or 'latest'."""
    if which not in CHECKPOINT_DIRS:
      raise CheckpointError(f"Checkpoint must be 'best' or 'latest' for a workdir, got {which!r}.")
    folder = os.path.join(workdir, CHECKPOINT_DIRS[which])
    if not os.path.isdir(folder) or not checkpointing.committed_steps(folder):
      other = "latest" if which == "best" else "best"
      raise CheckpointError(
          f"No {which} checkpoint in {workdir} ({folder} holds none). Train first with launch/train.py "
          f"--workdir={workdir}, or pick --checkpoint={other} (runs without a validation split have no best).")
    return cls.from_checkpoint(folder, config, **kwargs)

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """(H, W, 1) uint8 slice -> model input (S, S, C): `input_pipeline.preprocess` with the run's constants."""
    if not self.spec["normalization"]:
      raise CheckpointError(
          f"{self.source} was trained on in-memory arrays and records no file preprocessing; pass model "
          "inputs prepared like its training arrays to predict_inputs.")
    if self._preprocess is None:
      size, normalization = self.spec["image_size"], self.spec["normalization"]
      self._preprocess = tf.function(lambda x: input_pipeline.preprocess(x, size, normalization),
                                     input_signature=[tf.TensorSpec((None, None, 1), tf.uint8)])
    return self._preprocess(image).numpy()

  def load(self, path: str) -> np.ndarray:
    """One file as the model input (S, S, C), preprocessed as the run's training slices were."""
    return self.preprocess(read_slice(path, self.spec["lung_mask"]))

  def predict_inputs(self, inputs: np.ndarray) -> np.ndarray:
    """Class probabilities (N, C) of model inputs (N, S, S, C), in fixed-size batches (the last padded)."""
    x = np.asarray(inputs, np.float32)
    if x.ndim != 4 or x.shape[1:] != self.input_shape:
      raise ValueError(f"Model inputs must be (N, {', '.join(map(str, self.input_shape))}), got {x.shape}.")
    out = [np.zeros((0, len(self.class_names)), np.float32)]
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      padded = np.zeros((self.batch_size, *self.input_shape), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._probs(self.variables, padded))[:len(chunk)])
    return np.concatenate(out)

  def predict_arrays(self, images: Iterable[np.ndarray]) -> np.ndarray:
    """Class probabilities (N, C) of 8-bit windowed slices (gray, RGB or RGBA; any size)."""
    x = [self.preprocess(to_gray(im, f"image {i}", self.spec["lung_mask"])) for i, im in enumerate(images)]
    return self.predict_inputs(np.stack(x) if x else np.zeros((0, *self.input_shape), np.float32))

  def grad_cam(self, inputs: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] of `classes` at the final head (`reporting.grad_cam`)."""
    from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top  (matplotlib only when needed)
    return reporting.grad_cam(self.model, self.variables, inputs, target=classes)[0]

  def iter_predictions(self, paths: Sequence[str], cam: bool = False) -> Iterator[Prediction]:
    """Per-file results in order, one batch at a time; a file that fails gets its error, the rest go on."""
    for start in range(0, len(paths), self.batch_size):
      results, inputs = [], []
      for path in paths[start:start + self.batch_size]:
        try:
          inputs.append(self.load(path))
          results.append(Prediction(path))
        except InputError as e:
          results.append(Prediction(path, error=str(e)))
      good = [r for r in results if r.error is None]
      if good:
        x = np.stack(inputs)
        probs = self.predict_inputs(x)
        classes = np.argmax(probs, -1)
        cams = self.grad_cam(x, classes) if cam else None
        for i, r in enumerate(good):
          r.probs, r.label = probs[i], self.class_names[classes[i]]
          if cam:
            r.image, r.cam = x[i], cams[i]
      yield from results

  def predict_files(self, paths: Sequence[str], cam: bool = False) -> list[Prediction]:
    """`iter_predictions` as a list; Grad-CAM maps and model inputs are kept when `cam`."""
    return list(self.iter_predictions(paths, cam))


# ----------------------------------------------------------------------------- output


def csv_header(class_names: Sequence[str]) -> list[str]:
  return ["path", "prediction", *[f"prob_{n}" for n in class_names], "error"]


def csv_row(p: Prediction, num_classes: int) -> list[str]:
  probs = [f"{v:.8g}" for v in p.probs] if p.probs is not None else [""] * num_classes
  return [p.path, p.label or "", *probs, p.error or ""]


def _is_predictions_csv(path: str) -> bool:
  """Whether the file's first line is a header `write_predictions` writes: path,prediction,prob_<class>...,error."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      header = next(csv.reader([f.readline(1 << 16)]), [])
  except (OSError, UnicodeDecodeError, csv.Error):
    return False
  return (len(header) >= 4 and header[:2] == ["path", "prediction"] and header[-1] == "error"
          and all(h.startswith("prob_") for h in header[2:-1]))


def check_output(output: str, inputs: Sequence[str]) -> None:
  """Raises OutputError unless `output` is new or a predictions CSV this tool wrote (which a rerun replaces).

  Refused: a folder, a symbolic link, one of `inputs` (files or folders), and
  any other existing file, e.g. a slice (`--output a.dcm b.dcm` makes a.dcm
  the output: the easy slip).
  """
  if os.path.isdir(output):
    raise OutputError(f"--output={output} is a folder; --output names the CSV file to write, e.g. "
                      f"--output={os.path.join(output, 'predictions.csv')}.")
  if os.path.islink(output):
    raise OutputError(f"--output={output} is a symbolic link; name a new CSV file (the link and its target are "
                      "left as they are).")
  if not os.path.exists(output):
    return
  if any(os.path.exists(i) and os.path.samefile(output, i) for i in inputs):
    raise OutputError(f"--output={output} is one of the inputs; it was left as it is. Name a new CSV file, e.g. "
                      "--output=predictions.csv, before the inputs.")
  if not _is_predictions_csv(output):
    raise OutputError(
        f"--output={output} exists and is not a predictions CSV this tool wrote (its first line is not "
        "path,prediction,prob_<class>...,error); it was left as it is. Name a new CSV file, or move this one "
        "away. (`--output a.dcm b.dcm` takes a.dcm as the output: write --output=FILE.csv.)")


CAM_MANIFEST = ".dsn_saal_cams.json"  # {overlay path relative to the folder: sha256} of the overlays written


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def cam_paths(cam_dir: str, files: Sequence[str]) -> dict[str, str]:
  """{file: cam_dir/<its path below the files' common folder>.png}, the overlay each predicted file gets."""
  root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if files else ""
  return {f: os.path.join(cam_dir, os.path.relpath(os.path.abspath(f), root) + ".png") for f in files}


def _cam_manifest(cam_dir: str) -> dict[str, str]:
  try:
    with open(os.path.join(cam_dir, CAM_MANIFEST)) as f:
      return dict(json.load(f))
  except (OSError, ValueError, TypeError):
    return {}


def check_cam_dir(cam_dir: str, files: Sequence[str], inputs: Sequence[str]) -> None:
  """Raises OutputError unless every overlay `write_predictions` would write to `cam_dir` is new or its own.

  Refused: a file or link as `cam_dir`; a folder that is, holds or lies inside
  an input folder (overlays would join the slices); an existing file where an
  overlay goes, unless an earlier run wrote it unchanged (CAM_MANIFEST).
  """
  if os.path.islink(cam_dir) or (os.path.exists(cam_dir) and not os.path.isdir(cam_dir)):
    raise OutputError(f"--cam={cam_dir} is an existing file or link; --cam names a folder for the overlays.")
  real = os.path.realpath(cam_dir)
  for i in inputs:
    if os.path.isdir(i):
      folder = os.path.realpath(i)
      if os.path.commonpath([real, folder]) in (real, folder):
        raise OutputError(f"--cam={cam_dir} is, holds or lies inside the input folder {i}; the overlays would "
                          "be written among the slices. Name a folder outside the inputs.")
  ours = _cam_manifest(cam_dir)
  for path in cam_paths(cam_dir, files).values():
    rel = os.path.relpath(path, cam_dir)
    if os.path.lexists(path) and (os.path.islink(path) or ours.get(rel) != _sha256(path)):
      raise OutputError(f"--cam={cam_dir}: {path} exists and is not an overlay this tool wrote; it was left as "
                        "it is. Name a new --cam folder, or move that file away.")


def write_predictions(predictor: Predictor, files: Sequence[str], output: str, cam_dir: str | None = None,
                      problems: Sequence[Prediction] = ()) -> tuple[int, int]:
  """Predicts `files` into the CSV `output` (a row per file, then `problems`); returns (predicted, failed).

  `output` must pass `check_output` (else OutputError, nothing written). The
  rows go to a new file beside it, renamed to `output` when every file is
  done: a CSV under that name is always complete. With `cam_dir`, each
  predicted file's Grad-CAM overlay goes to cam_dir/<path relative to the
  inputs' common folder>.png, only where `check_cam_dir` allows (else
  OutputError before anything is written), and is listed in its CAM_MANIFEST.
  """
  check_output(output, files)
  if cam_dir is not None:
    check_cam_dir(cam_dir, files, files)
    targets, written = cam_paths(cam_dir, files), _cam_manifest(cam_dir)
  counts = {"predicted": 0, "failed": 0}
  folder, name = os.path.split(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(4)}")
  try:
    with open(tmp, "x", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(csv_header(predictor.class_names))
      rows = console.progress(predictor.iter_predictions(files, cam=cam_dir is not None), len(files), "files")
      for p in itertools.chain(rows, problems):
        writer.writerow(csv_row(p, len(predictor.class_names)))
        if p.error is not None:
          logging.error("%s", p.error)
          counts["failed"] += 1
          continue
        counts["predicted"] += 1
        if cam_dir is not None:
          from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top  (matplotlib only when needed)
          path = targets[p.path]
          os.makedirs(os.path.dirname(path), exist_ok=True)
          title = f"{os.path.basename(p.path)}: {p.label} {float(np.max(p.probs)):.2f}"
          reporting.plot_gradcam_overlay(p.image, p.cam, title, path)
          written[os.path.relpath(path, cam_dir)] = _sha256(path)
    check_output(output, files)  # again, just before replacing: it may have changed meanwhile
    os.replace(tmp, output)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  finally:  # even after an error, so that a rerun may replace the overlays written so far
    if cam_dir is not None and os.path.isdir(cam_dir):
      with open(os.path.join(cam_dir, CAM_MANIFEST), "w") as f:
        json.dump(written, f, indent=1, sort_keys=True)
  return counts["predicted"], counts["failed"]
