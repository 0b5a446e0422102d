"""Input pipeline: deterministic, resumable, multi-host batches from the TFDS CT datasets.

Once per dataset build and image size, process 0 decodes every stored slice and
resizes it to `image_size` into a prepared variant (`dsn_saal_jax.prepared`:
uint8 NumPy arrays keyed by dataset, build, split, size and resize); TensorFlow
runs only then. Every epoch then reads those bytes by index: the global order of
an epoch is a plain numpy permutation of (seed, epoch), so a resumed run, or a
run on a different number of processes, sees exactly the same global batches,
and a batch is one gather plus a lookup-table normalization in worker threads. For
`config.meta.update_rule='meta'` a seeded slice of the kept training examples is
held out as the meta set (`dsn_saal_jax.meta`), and every training batch
carries that step's `meta_image` and `meta_label`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import config_lib, meta, prepared
from dsn_saal_jax.data_info import DataInfo
from dsn_saal_jax.data import builders

# ImageNet statistics (torchvision), because the backbone starts from ImageNet weights.
# One channel uses their mean, matching a first conv summed over RGB (DESIGN.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Independent random streams derived from config.seed.
_SUBSAMPLE_STREAM = 0
_SHUFFLE_STREAM = 1
_PER_CLASS_STREAM = 2
_SCAN_CHUNK = 1024
RESIZE = "bilinear_antialias"


def normalization_for(config: Any) -> dict[str, Any]:
  """Preprocessing constants: pixel / 255, then (x - mean) / std per channel."""
  channels = config.get("channels", 1)
  if channels not in (1, 3):
    raise ValueError(f"config.channels must be 1 or 3, got {channels}.")
  mean = config.get("norm_mean") or (IMAGENET_MEAN if channels == 3 else (float(np.mean(IMAGENET_MEAN)),))
  std = config.get("norm_std") or (IMAGENET_STD if channels == 3 else (float(np.mean(IMAGENET_STD)),))
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"norm_mean/norm_std need {channels} values, got {mean} and {std}.")
  return {"scale": 255.0, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
          "resize": RESIZE, "channels": channels}


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


def subsample_class(labels: np.ndarray, target: int, fraction: float, seed: int,
                    name: str | None = None) -> np.ndarray:
  """Sorted indices kept by the imbalance protocol: all others, round(fraction * n) of `target`.

  The kept target examples are a seeded choice (same seed, same examples).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"covid_fraction must be in (0, 1], got {fraction}.")
  target_idx = np.flatnonzero(labels == target)
  keep = round(fraction * len(target_idx))
  if keep == 0:
    raise config_lib.ConfigError(f"covid_fraction={fraction} keeps round({fraction} * {len(target_idx)}) = 0 "
                                 f"examples of class {name or target}; raise covid_fraction.")
  rng = np.random.default_rng([seed, _SUBSAMPLE_STREAM])
  chosen = rng.choice(target_idx, size=keep, replace=False)
  return np.sort(np.concatenate([np.flatnonzero(labels != target), chosen]))


def keep_per_class(labels: np.ndarray, per_class: int, seed: int,
                   class_names: Sequence[str]) -> np.ndarray:
  """Sorted indices of a seeded `per_class` examples of every class (COVIDx-CT's 1000 per class, Table 7)."""
  counts = np.bincount(labels, minlength=len(class_names))
  short = [f"{name} ({n})" for name, n in zip(class_names, counts) if n < per_class]
  if short:
    raise config_lib.ConfigError(f"config.train_per_class={per_class} exceeds the training examples of class "
                                 f"{', '.join(short)}; lower it to at most {counts.min()}, or 0 to keep all.")
  rng = np.random.default_rng([seed, _PER_CLASS_STREAM])
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
                                 for c in range(len(class_names))]))


def minority_class(name: str, class_names: Sequence[str], default: int | None) -> int | None:
  """The class covid_fraction thins: `name`, else the builder's COVID class, else one named covid.

  "Named covid" ignores case and punctuation and takes covid19 too, so
  COVID-19/ matches. None when no class (or more than one) matches.
  """
  if name:
    if name not in class_names:
      raise config_lib.ConfigError(
          f"config.minority_class={name!r} is not one of the classes {list(class_names)}.")
    return list(class_names).index(name)
  if default is not None:
    return default
  covid = [i for i, c in enumerate(class_names) if re.sub(r"[^a-z0-9]", "", c.lower()) in ("covid", "covid19")]
  return covid[0] if len(covid) == 1 else None


def training_subset(labels: np.ndarray, class_names: Sequence[str], *, per_class: int, fraction: float,
                    minority: int | None, seed: int) -> np.ndarray:
  """Sorted indices of the training examples a run uses.

  `per_class` (> 0) first keeps that many of each class, then `fraction`
  (< 1) thins the `minority` class of what is left, so "1000 per class,
  COVID at 10%" keeps 1000 of every class and 100 COVID examples.
  """
  kept = keep_per_class(labels, per_class, seed, class_names) if per_class else np.arange(len(labels))
  if fraction == 1.0:
    return kept
  if minority is None:
    raise config_lib.ConfigError(
        f"config.covid_fraction={fraction} thins the minority class, but none of the classes "
        f"{list(class_names)} is named covid; set --config.minority_class to one of them.")
  return kept[subsample_class(labels[kept], minority, fraction, seed, class_names[minority])]


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
  """Writes the prepared variant of every split at `image_size` unless it exists (process 0's job)."""
  for split in builder.info.splits:
    key = variant_key(builder, split, image_size)
    if prepared.open_variant(variants_root(builder), key) is None:
      logging.info("Preparing %s %s at %d px (decode and resize once) in %s", builder.name, split,
                   image_size, variants_root(builder))
      _write_variant(builder, split, key)


def _open_split(builder: tfds.core.DatasetBuilder, spec: str, image_size: int) -> prepared.Rows:
  """The prepared splits of `spec` ('a+b' lays them end to end)."""
  parts = []
  for split in spec.split("+"):
    variant = prepared.open_variant(variants_root(builder), variant_key(builder, split, image_size))
    if variant is None:
      raise FileNotFoundError(
          f"{builder.name} {split} is not prepared at {image_size} px under {variants_root(builder)}. "
          "Process 0 prepares it in create_dataset; give every process the same (shared) "
          "config.data_dir.")
    parts.append(variant)
  return prepared.Rows(parts)


class Dataset:
  """Train and eval iterators over one dataset, sharded for this process and its local devices."""

  def __init__(self, config: Any, builder: tfds.core.DatasetBuilder, *, process_index: int,
               process_count: int, local_device_count: int):
    self._builder = builder
    self._process_index = process_index
    self._process_count = process_count
    self._local_devices = local_device_count
    self._seed = int(config.get("seed", 0))
    self._image_size = int(config.image_size)
    self._batch_size = int(config.batch_size)
    self._eval_batch_size = int(config.get("eval_batch_size", config.batch_size))
    self._per_device = self._per_device_batch(self._batch_size, "batch_size")
    self._eval_per_device = self._per_device_batch(self._eval_batch_size, "eval_batch_size")

    train_spec, eval_specs = split_specs(config.dataset, list(builder.info.splits),
                                         int(config.get("fold", 0)))
    self._train = _open_split(builder, train_spec, self._image_size)
    self._eval = {name: _open_split(builder, spec, self._image_size) for name, spec in eval_specs.items()}
    removed = (self._duplicates(train_spec.split("+"), eval_specs) if config.get("dedup", False)
               else {name: np.zeros(0, np.int64) for name in eval_specs})
    # Rows of each eval split that are evaluated, in storage order.
    self._eval_rows = {name: np.setdiff1d(np.arange(len(split)), removed[name])
                       for name, split in self._eval.items()}
    class_names = tuple(builder.info.features["label"].names)
    self._kept = training_subset(
        self._train.labels, class_names, per_class=int(config.get("train_per_class", 0)),
        fraction=float(config.get("covid_fraction", 1.0)), seed=self._seed,
        minority=minority_class(config.get("minority_class", ""), class_names, builder.COVID_CLASS))
    meta_config = config.get("meta") or {}
    self._meta = None  # rows of the train split held out as the meta set
    if meta_config.get("update_rule", "joint") == "meta":
      train_pos, meta_pos = meta.meta_split(self._train.labels[self._kept], float(meta_config["fraction"]),
                                            bool(meta_config["balanced"]), self._seed, class_names)
      self._kept, self._meta = self._kept[train_pos], self._kept[meta_pos]
    counts = np.bincount(self._train.labels[self._kept], minlength=len(class_names))
    steps = len(self._kept) // self._batch_size
    if steps == 0:
      raise config_lib.ConfigError(f"batch_size {self._batch_size} exceeds the {len(self._kept)} training "
                                   "examples; lower config.batch_size.")
    normalization = normalization_for(config)
    self._table = prepared.lookup_table(normalization)
    self.info = DataInfo(
        class_names=class_names,
        class_counts=counts.astype(np.int64),
        num_train=len(self._kept),
        num_eval={name: len(rows) for name, rows in self._eval_rows.items()},
        image_shape=(self._image_size, self._image_size, normalization["channels"]),
        steps_per_epoch=steps,
        normalization=normalization,
        duplicates_removed={name: len(rows) for name, rows in removed.items()},
        meta_counts=(None if self._meta is None
                     else np.bincount(self._train.labels[self._meta], minlength=len(class_names))),
    )

  def _duplicates(self, train_splits: list[str], eval_specs: dict[str, str]) -> dict[str, np.ndarray]:
    """Rows of each eval split identical to a training slice or an earlier eval split's, logged."""
    report = builders.duplicates.ensure(self._builder)
    copies = builders.duplicates.copies_to_remove(report, train_splits, list(eval_specs.values()))
    removed = {}
    for name, spec in eval_specs.items():
      rows = np.asarray([m["index"] for m in copies[spec]], np.int64)
      total = len(self._eval[name])
      if len(rows) == total:
        raise ValueError(f"config.dedup removes all {total} examples of {name} ({spec}): each is a "
                         f"copy of a slice in {', '.join(train_splits)} or an earlier eval split (see "
                         f"{builders.duplicates.report_path(self._builder)}). Evaluate without "
                         "config.dedup, or split the data again.")
      logging.warning("config.dedup: %s (%s) evaluates %d of %d examples; %d are copies of slices in "
                      "%s or an earlier eval split%s", name, spec, total - len(rows), total, len(rows),
                      ", ".join(train_splits),
                      f", e.g. {', '.join(m['id'] for m in copies[spec][:5])}." if len(rows) else ".")
      removed[name] = rows
    return removed

  def _per_device_batch(self, global_batch: int, field: str) -> int:
    shards = self._process_count * self._local_devices
    if global_batch <= 0 or global_batch % shards:
      raise ValueError(
          f"config.{field}={global_batch} must be a positive multiple of process_count * "
          f"local_device_count = {self._process_count} * {self._local_devices} = {shards}.")
    return global_batch // shards

  def example_ids(self, split: str) -> list[str]:
    """File ids of `split` by the 'index' eval yields.

    'train' is the training examples the network sees, 'meta' the meta set; eval splits leave out what
    config.dedup removed.
    """
    if split == "train":
      return [self._train.ids[i] for i in self._kept]
    if split == "meta" and self._meta is not None:
      return [self._train.ids[i] for i in self._meta]
    ids = self._split(split).ids
    return [ids[i] for i in self._eval_rows[split]]

  def _split(self, split: str) -> prepared.Rows:
    if split not in self._eval:
      raise ValueError(f"Unknown eval split {split!r}; this dataset has {sorted(self._eval)}.")
    return self._eval[split]

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Global order of the kept training examples in `epoch` (indices into the train split)."""
    rng = np.random.default_rng([self._seed, _SHUFFLE_STREAM, epoch])
    return self._kept[rng.permutation(len(self._kept))]

  def _train_rows(self, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """This process's rows of the train split for each step from `start_step` on, and its meta rows."""
    per_process = self._per_device * self._local_devices
    begin = self._process_index * per_process
    steps, epoch, order = self.info.steps_per_epoch, -1, None
    for step in itertools.count(start_step):
      if step // steps != epoch:
        epoch = step // steps
        order = self.epoch_order(epoch)
      first = (step - epoch * steps) * self._batch_size + begin
      meta_rows = None
      if self._meta is not None:
        positions = meta.meta_batch_positions(len(self._meta), self._batch_size, self._seed, step)
        meta_rows = self._meta[positions[begin:begin + per_process]]
      yield order[first:first + per_process], meta_rows

  def _examples(self, source: prepared.Rows, rows: np.ndarray, per_device: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (devices, per_device, S, S, C), label int32 (devices, per_device)) of `rows`."""
    image = prepared.normalize(source.gather(rows), self._table)
    shape = (self._local_devices, per_device)
    return image.reshape(shape + image.shape[1:]), source.labels[rows].astype(np.int32).reshape(shape)

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches from global step `start_step` on.

    Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch (the
    epoch's remainder is dropped). Yields 'image' float32 (devices,
    per_device, H, W, C) and 'label' int32 (devices, per_device).
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")

    def batch(rows: tuple[np.ndarray, np.ndarray | None]) -> dict[str, np.ndarray]:
      image, label = self._examples(self._train, rows[0], self._per_device)
      if rows[1] is None:
        return {"image": image, "label": label}
      meta_image, meta_label = self._examples(self._train, rows[1], self._per_device)
      return {"image": image, "label": label, "meta_image": meta_image, "meta_label": meta_label}

    return prepared.ordered_map(batch, self._train_rows(start_step))

  def eval_iter(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `split`, padded to whole global batches.

    Adds 'mask' (1 real, 0 padding) and 'index' (position among the evaluated
    examples, -1 for padding; `example_ids(split)[index]` is the file), so every
    example counts exactly once across all processes.
    """
    source, rows = self._split(split), self._eval_rows[split]
    per_process = self._eval_per_device * self._local_devices
    shape = (self._local_devices, self._eval_per_device)

    def batch(b: int) -> dict[str, np.ndarray]:
      begin = b * self._eval_batch_size + self._process_index * per_process
      index = np.arange(begin, begin + per_process)
      index = np.where(index < len(rows), index, -1).astype(np.int32)
      image, label = self._examples(source, rows[np.maximum(index, 0)], self._eval_per_device)
      return {"image": image, "label": label, "index": index.reshape(shape),
              "mask": (index >= 0).astype(np.float32).reshape(shape)}

    return prepared.ordered_map(batch, range(-(-len(rows) // self._eval_batch_size)))


def create_dataset(config: Any, *, process_index: int | None = None,
                   process_count: int | None = None,
                   local_device_count: int | None = None) -> Dataset:
  """Builds the configured TFDS dataset and its variant at image_size if needed (process 0 only).

  The keyword overrides exist to test multi-process sharding in one process.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_device_count = jax.local_device_count() if local_device_count is None else local_device_count
  manual_dir = config.get("manual_dir") or builders.default_manual_dir(config.dataset)
  if process_index == 0:
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
  return Dataset(config, builder, process_index=process_index, process_count=process_count,
                 local_device_count=local_device_count)
