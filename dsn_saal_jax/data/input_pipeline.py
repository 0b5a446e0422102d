"""Input pipeline, the TensorFlow half: build the TFDS dataset, prepare each split once, open it.

Once per dataset build and image size, process 0 decodes every stored slice and
resizes it to `image_size` into a prepared variant (`dsn_saal_jax.prepared`:
uint8 NumPy arrays keyed by dataset, build, split, size and resize), plus a
catalog of them; TensorFlow runs only then. Every epoch then reads those bytes
by index through `dsn_saal_jax.prepared_dataset.Dataset` (NumPy alone): a
deterministic, resumable, per-process order, the meta set of
`config.meta.update_rule='meta'`, eval padding. `preprocess` is the same
per-slice path for inference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import prepared, prepared_dataset
from dsn_saal_jax.data import builders
# The reading half, NumPy only; re-exported because callers know these names from here.
from dsn_saal_jax.data_info import DataInfo  # noqa: F401  (re-exported for dsn_saal_jax.data)
from dsn_saal_jax.prepared_dataset import (IMAGENET_MEAN, IMAGENET_STD, RESIZE, Dataset,  # noqa: F401
                                           PreparedSplits, keep_per_class, minority_class, normalization_for,
                                           subsample_class, training_subset)

_SCAN_CHUNK = 1024


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 (H, W, 1) slice -> float32 (S, S, 1) in [0, 255].

  Bilinear, antialiased (like torchvision's PIL resize when shrinking),
  straight to a square as in the paper. The antialias filter only changes
  shrinking, and costs ~3x, so enlarging takes the plain (identical) path.
  """
  image = tf.cast(image, tf.float32)
  size = (image_size, image_size)
  return tf.cond(
      tf.reduce_all(tf.shape(image)[:2] <= image_size),
      lambda: tf.image.resize(image, size, method="bilinear", antialias=False),
      lambda: tf.image.resize(image, size, method="bilinear", antialias=True))


def to_pixels(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 (H, W, 1) slice -> uint8 (S, S, 1): `resize`, rounded half to even (the prepared bytes)."""
  return tf.cast(tf.round(tf.clip_by_value(resize(image, image_size), 0.0, 255.0)), tf.uint8)


def normalize(pixels: tf.Tensor, normalization: dict[str, Any]) -> tf.Tensor:
  """float32 (..., 1) pixels in [0, 255] -> (..., C) model input: gray repeated, /255, -mean, /std."""
  x = tf.repeat(pixels, normalization["channels"], axis=-1) / normalization["scale"]
  return (x - tf.constant(normalization["mean"])) / tf.constant(normalization["std"])


def preprocess(image: tf.Tensor, image_size: int, normalization: dict[str, Any]) -> tf.Tensor:
  """uint8 (H, W, 1) slice -> float32 (S, S, C): exactly what training and evaluation feed the model.

  The resized slice is rounded to uint8 first, as the prepared variants store it.
  For inference on a DICOM file:
  `preprocess(ct.preprocess_dicom(path)[..., None], info.image_shape[0], info.normalization)`.
  """
  return normalize(tf.cast(to_pixels(image, image_size), tf.float32), normalization)


def split_specs(dataset: str, splits: Sequence[str], fold: int) -> tuple[str, dict[str, str]]:
  """(TFDS train split, {eval name: TFDS split}); sars_cov2_ct holds out fold `fold` as 'test'."""
  if dataset == "sars_cov2_ct":
    num_folds = builders.sars_cov2_ct.NUM_FOLDS
    if fold not in range(num_folds):
      raise ValueError(f"config.fold must be in 0..{num_folds - 1} for sars_cov2_ct, got {fold}.")
    name = builders.sars_cov2_ct.fold_name
    return "+".join(name(k) for k in range(num_folds) if k != fold), {"test": name(fold)}
  return "train", {s: s for s in ("validation", "test") if s in splits}


def variants_root(builder: tfds.core.DatasetBuilder) -> str:
  """Where the prepared variants of a build live: inside it, so a rebuilt dataset drops them."""
  return os.path.join(os.fspath(builder.data_dir), "prepared")


def variant_key(builder: tfds.core.DatasetBuilder, split: str, image_size: int) -> dict[str, Any]:
  """Everything a prepared split depends on.

  The builder config's name carries the source options (lung_mask, image_folder's
  folder digest and split, synthetic_ct's size and seed). Channels are not in it:
  the variant stores the gray slice, repeated per batch.
  """
  return {"format": prepared.FORMAT, "dataset": builder.name, "builder_config": builder.builder_config.name,
          "version": str(builder.version), "split": split,
          "num_examples": int(builder.info.splits[split].num_examples), "image_size": int(image_size),
          "resize": RESIZE, "rounding": prepared.ROUNDING}


def _data_source(builder: tfds.core.DatasetBuilder, split: str):
  try:
    return builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except NotImplementedError as e:
    raise ValueError(
        f"{builder.data_path} was built as {builder.info.file_format}, but this pipeline reads "
        "ArrayRecord files by index. Delete that directory (or use another data_dir) and let "
        "create_dataset build it again.") from e


def _write_variant(builder: tfds.core.DatasetBuilder, split: str, key: dict[str, Any]) -> str:
  """Decodes and resizes every slice of `split` once (TensorFlow, in parallel) into a variant."""
  raw = _data_source(builder, split)
  features = builder.info.features
  size = key["image_size"]

  def records():
    for start in range(0, len(raw), _SCAN_CHUNK):
      yield from raw.__getitems__(range(start, min(start + _SCAN_CHUNK, len(raw))))

  def parse(record):
    ex = features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
    return to_pixels(tf.io.decode_png(ex["image"], channels=1), size), ex["label"], ex["id"]

  ds = tf.data.Dataset.from_generator(records, output_signature=tf.TensorSpec((), tf.string))
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256).prefetch(2)
  writer = prepared.Writer(variants_root(builder), key, len(raw))
  labels, ids, filled = [], [], 0
  try:
    for images, label, ex_id in ds.as_numpy_iterator():
      writer.images[filled:filled + len(images)] = images
      filled += len(images)
      labels.append(label)
      ids.extend(i.decode() for i in ex_id)
    return writer.commit(np.concatenate(labels) if labels else np.zeros(0, np.int64), ids)
  except BaseException:
    writer.abort()
    raise


def prepare_variants(builder: tfds.core.DatasetBuilder, image_size: int) -> None:
  """Writes the prepared variant of every split at `image_size` unless it exists (process 0's job).

  Then its catalog, which lets `prepared_dataset.open_prepared` read them without TensorFlow.
  """
  keys = {}
  for split in builder.info.splits:
    keys[split] = key = variant_key(builder, split, image_size)
    if prepared.open_variant(variants_root(builder), key) is None:
      logging.info("Preparing %s %s at %d px (decode and resize once) in %s", builder.name, split,
                   image_size, variants_root(builder))
      _write_variant(builder, split, key)
  folds = builders.sars_cov2_ct.NUM_FOLDS if builder.name == "sars_cov2_ct" else 1
  prepared_dataset.write_catalog(
      variants_root(builder), image_size, dataset=builder.name,
      class_names=builder.info.features["label"].names, covid_class=builder.COVID_CLASS, keys=keys,
      specs={fold: split_specs(builder.name, list(keys), fold) for fold in range(folds)})


def _open_split(builder: tfds.core.DatasetBuilder, spec: str, image_size: int) -> prepared.Rows:
  """The prepared splits of `spec` ('a+b' lays them end to end)."""
  return prepared_dataset.open_rows(variants_root(builder),
                                    [variant_key(builder, split, image_size) for split in spec.split("+")])


def _removed_duplicates(builder: tfds.core.DatasetBuilder, train_spec: str, eval_specs: dict[str, str],
                        evals: dict[str, prepared.Rows]) -> dict[str, np.ndarray]:
  """config.dedup: rows of each eval split identical to a training slice or an earlier eval split's, logged."""
  train_splits = train_spec.split("+")
  report = builders.duplicates.ensure(builder)
  copies = builders.duplicates.copies_to_remove(report, train_splits, list(eval_specs.values()))
  removed = {}
  for name, spec in eval_specs.items():
    rows = np.asarray([m["index"] for m in copies[spec]], np.int64)
    total = len(evals[name])
    if len(rows) == total:
      raise ValueError(f"config.dedup removes all {total} examples of {name} ({spec}): each is a "
                       f"copy of a slice in {', '.join(train_splits)} or an earlier eval split (see "
                       f"{builders.duplicates.report_path(builder)}). Evaluate without "
                       "config.dedup, or split the data again.")
    logging.warning("config.dedup: %s (%s) evaluates %d of %d examples; %d are copies of slices in "
                    "%s or an earlier eval split%s", name, spec, total - len(rows), total, len(rows),
                    ", ".join(train_splits),
                    f", e.g. {', '.join(m['id'] for m in copies[spec][:5])}." if len(rows) else ".")
    removed[name] = rows
  return removed


def prepared_splits(config: Any, builder: tfds.core.DatasetBuilder) -> PreparedSplits:
  """The prepared splits config.dataset trains and evaluates on (config.fold's for sars_cov2_ct)."""
  image_size = int(config.image_size)
  train_spec, eval_specs = split_specs(config.dataset, list(builder.info.splits), int(config.get("fold", 0)))
  evals = {name: _open_split(builder, spec, image_size) for name, spec in eval_specs.items()}
  removed = (_removed_duplicates(builder, train_spec, eval_specs, evals) if config.get("dedup", False)
             else {name: np.zeros(0, np.int64) for name in eval_specs})
  return PreparedSplits(class_names=tuple(builder.info.features["label"].names), covid_class=builder.COVID_CLASS,
                        train=_open_split(builder, train_spec, image_size), evals=evals, removed=removed)


def create_dataset(config: Any, *, process_index: int | None = None,
                   process_count: int | None = None,
                   local_device_count: int | None = None) -> Dataset:
  """Builds the configured TFDS dataset and its variant at image_size if needed (process 0 only).

  The keyword overrides exist to test multi-process sharding in one process.
  """
  shard = prepared_dataset.local_shard(process_index, process_count, local_device_count)
  manual_dir = config.get("manual_dir") or builders.default_manual_dir(config.dataset)
  if shard["process_index"] == 0:
    builder = builders.make_builder(config)
    builders.prepare(builder, manual_dir)
    prepare_variants(builder, int(config.image_size))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dsn_saal_jax.data: dataset prepared")
  builder = builders.make_builder(config)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"{builder.data_path} is not prepared. Process 0 builds datasets; give every process the "
        "same (shared) config.data_dir, or build it once beforehand.")
  return Dataset(config, prepared_splits(config, builder), **shard)
