"""Input pipeline: deterministic, resumable, multi-host batches from the TFDS CT datasets.

Examples are read by index from ArrayRecord files (`tfds.data_source`), so the
global order of every epoch is a plain numpy permutation of (seed, epoch):
a resumed run, or a run on a different number of processes, sees exactly the
same global batches. TensorFlow only decodes, resizes and normalizes. For
`config.saal.update_rule='meta'` a seeded slice of the kept training examples is
held out as the meta set (`dsn_saal_jax.meta`), and every training batch
carries that step's `meta_image` and `meta_label`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import config_lib, meta
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


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the trainer, the loss and inference need to know about the data."""
  class_names: tuple[str, ...]
  class_counts: np.ndarray  # k_n the network trains on (train_per_class, covid_fraction, less the meta set), int64 (C,)
  num_train: int
  num_eval: dict[str, int]  # examples each eval split evaluates (after config.dedup)
  image_shape: tuple[int, int, int]
  steps_per_epoch: int
  normalization: dict[str, Any]  # JSON-serializable, see `preprocess`
  # Copies of earlier splits' slices left out of each eval split by config.dedup.
  duplicates_removed: dict[str, int] = dataclasses.field(default_factory=dict)
  meta_counts: np.ndarray | None = None  # examples per class of the meta set; None: no meta set


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
          "resize": "bilinear_antialias", "channels": channels}


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


def normalize(pixels: tf.Tensor, normalization: dict[str, Any]) -> tf.Tensor:
  """float32 (..., 1) pixels in [0, 255] -> (..., C) model input: gray repeated, /255, -mean, /std."""
  x = tf.repeat(pixels, normalization["channels"], axis=-1) / normalization["scale"]
  return (x - tf.constant(normalization["mean"])) / tf.constant(normalization["std"])


def preprocess(image: tf.Tensor, image_size: int, normalization: dict[str, Any]) -> tf.Tensor:
  """uint8 (H, W, 1) slice -> float32 (S, S, C): exactly what training and evaluation feed the model.

  For inference on a DICOM file:
  `preprocess(ct.preprocess_dicom(path)[..., None], info.image_shape[0], info.normalization)`.
  """
  return normalize(resize(image, image_size), normalization)


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


class _Split:
  """Random access to one (possibly composite) split: raw records, labels, ids."""

  def __init__(self, builder: tfds.core.DatasetBuilder, spec: str):
    try:
      self.raw = builder.as_data_source(
          spec, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError as e:
      raise ValueError(
          f"{builder.data_path} was built as {builder.info.file_format}, but this pipeline reads "
          "ArrayRecord files by index. Delete that directory (or use another data_dir) and let "
          "create_dataset build it again.") from e
    decoded = builder.as_data_source(spec, decoders={"image": tfds.decode.SkipDecoding()})
    labels, ids = [], []
    for start in range(0, len(decoded), _SCAN_CHUNK):
      for ex in decoded.__getitems__(range(start, min(start + _SCAN_CHUNK, len(decoded)))):
        labels.append(ex["label"])
        ids.append(ex["id"].decode())
    self.labels = np.asarray(labels, dtype=np.int64)
    self.ids = ids

  def __len__(self) -> int:
    return len(self.labels)


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
    self._train = _Split(builder, train_spec)
    self._eval = {name: _Split(builder, spec) for name, spec in eval_specs.items()}
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
    saal = config.get("saal") or {}
    self._meta = None  # rows of the train split held out as the meta set
    if saal.get("update_rule", "joint") == "meta":
      train_pos, meta_pos = meta.meta_split(self._train.labels[self._kept], float(saal["meta_fraction"]),
                                            bool(saal["meta_balanced"]), self._seed, class_names)
      self._kept, self._meta = self._kept[train_pos], self._kept[meta_pos]
    counts = np.bincount(self._train.labels[self._kept], minlength=len(class_names))
    steps = len(self._kept) // self._batch_size
    if steps == 0:
      raise config_lib.ConfigError(f"batch_size {self._batch_size} exceeds the {len(self._kept)} training "
                                   "examples; lower config.batch_size.")
    normalization = normalization_for(config)
    self._normalization = normalization
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

  def _split(self, split: str) -> _Split:
    if split not in self._eval:
      raise ValueError(f"Unknown eval split {split!r}; this dataset has {sorted(self._eval)}.")
    return self._eval[split]

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Global order of the kept training examples in `epoch` (indices into the train split)."""
    rng = np.random.default_rng([self._seed, _SHUFFLE_STREAM, epoch])
    return self._kept[rng.permutation(len(self._kept))]

  def _train_indices(self, start_step: int) -> Iterator[int]:
    per_process = self._per_device * self._local_devices
    steps = self.info.steps_per_epoch
    epoch = start_step // steps
    while True:
      order = self.epoch_order(epoch)
      for step in range(max(start_step - epoch * steps, 0), steps):
        begin = step * self._batch_size + self._process_index * per_process
        yield from order[begin:begin + per_process].tolist()
      epoch += 1

  def _eval_indices(self, n: int) -> Iterator[int]:
    """This process's share of each padded global eval batch; -1 marks padding."""
    per_process = self._eval_per_device * self._local_devices
    num_batches = -(-n // self._eval_batch_size)
    for b in range(num_batches):
      begin = b * self._eval_batch_size + self._process_index * per_process
      for i in range(begin, begin + per_process):
        yield i if i < n else -1

  def _pipeline(self, source: Sequence[bytes], items: Iterator[tuple[int, int]], per_device: int,
                with_index: bool) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the records `source[row]` for each (row, index) of `items`; `index` is yielded."""
    features = self._builder.info.features
    size, normalization = self._image_size, self._normalization

    def records():
      for row, index in items:
        yield source[row], index

    def parse(raw, index):
      ex = features.deserialize_example(raw, decoders={"image": tfds.decode.SkipDecoding()})
      # Per example only what depends on its size; normalization runs once per batch.
      out = {"image": resize(tf.io.decode_png(ex["image"], channels=1), size),
             "label": tf.cast(ex["label"], tf.int32)}
      if with_index:
        out["index"] = index
        out["mask"] = tf.cast(index >= 0, tf.float32)
      return out

    def shard(batch):
      batch = {**batch, "image": normalize(batch["image"], normalization)}
      return {k: tf.reshape(v, (self._local_devices, per_device) + tuple(v.shape[1:]))
              for k, v in batch.items()}

    ds = tf.data.Dataset.from_generator(
        records, output_signature=(tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32)))
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_device * self._local_devices, drop_remainder=True)
    ds = ds.map(shard).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches from global step `start_step` on.

    Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch (the
    epoch's remainder is dropped). Yields 'image' float32 (devices,
    per_device, H, W, C) and 'label' int32 (devices, per_device).
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    train = self._pipeline(self._train.raw, ((i, i) for i in self._train_indices(start_step)),
                           self._per_device, with_index=False)
    if self._meta is None:
      return train
    rows = (i for i in self._meta_indices(start_step))
    held = self._pipeline(self._train.raw, ((i, i) for i in rows), self._per_device, with_index=False)
    return ({**batch, "meta_image": m["image"], "meta_label": m["label"]} for batch, m in zip(train, held))

  def _meta_indices(self, start_step: int) -> Iterator[int]:
    """This process's share of each step's global meta batch (rows of the train split)."""
    per_process = self._per_device * self._local_devices
    step = start_step
    while True:
      positions = meta.meta_batch_positions(len(self._meta), self._batch_size, self._seed, step)
      begin = self._process_index * per_process
      yield from self._meta[positions[begin:begin + per_process]].tolist()
      step += 1

  def eval_iter(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `split`, padded to whole global batches.

    Adds 'mask' (1 real, 0 padding) and 'index' (position among the evaluated
    examples, -1 for padding; `example_ids(split)[index]` is the file), so every
    example counts exactly once across all processes.
    """
    source, rows = self._split(split), self._eval_rows[split]
    items = ((int(rows[max(i, 0)]), i) for i in self._eval_indices(len(rows)))
    return self._pipeline(source.raw, items, self._eval_per_device, with_index=True)


def create_dataset(config: Any, *, process_index: int | None = None,
                   process_count: int | None = None,
                   local_device_count: int | None = None) -> Dataset:
  """Builds the configured TFDS dataset if needed (process 0 only) and returns its pipeline.

  The keyword overrides exist to test multi-process sharding in one process.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_device_count = jax.local_device_count() if local_device_count is None else local_device_count
  manual_dir = config.get("manual_dir") or builders.default_manual_dir(config.dataset)
  if process_index == 0:
    builders.prepare(builders.make_builder(config), manual_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dsn_saal_jax.data: dataset prepared")
  builder = builders.make_builder(config)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"{builder.data_path} is not prepared. Process 0 builds datasets; give every process the "
        "same (shared) config.data_dir, or build it once beforehand.")
  return Dataset(config, builder, process_index=process_index, process_count=process_count,
                 local_device_count=local_device_count)
