"""Batches from prepared variants: the input pipeline's reading half, NumPy alone (no TensorFlow).

`data/input_pipeline.py` builds a TFDS dataset and prepares each split once at
the training size (`dsn_saal_jax.prepared`); everything after that lives here:
which training examples a run keeps (train_per_class, covid_fraction, the meta
set), the global order of an epoch as a numpy permutation of (seed, epoch),
this process's shard of each step, eval padding, and a batch as one gather
plus a lookup-table normalization in worker threads. So a resumed run, or a
run on another number of processes, sees exactly the same global batches; and
a machine without TensorFlow (an accelerator image) trains from a prepared
directory copied to it: `open_prepared(config, root)` reads the catalog that
preparation writes beside the variants.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dsn_saal_jax import config_lib, meta, prepared
from dsn_saal_jax.data_info import DataInfo

# ImageNet statistics (torchvision), because the backbone starts from ImageNet weights.
# One channel uses their mean, matching a first conv summed over RGB (DESIGN.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Independent random streams derived from config.seed.
_SUBSAMPLE_STREAM = 0
_SHUFFLE_STREAM = 1
_PER_CLASS_STREAM = 2
RESIZE = "bilinear_antialias"  # how a stored slice becomes image_size: see input_pipeline.resize


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


CATALOG_FORMAT = 1


def catalog_path(root: str | os.PathLike, image_size: int) -> str:
  return os.path.join(os.fspath(root), f"catalog_px{int(image_size)}.json")


def write_catalog(root: str | os.PathLike, image_size: int, *, dataset: str, class_names: Sequence[str],
                  covid_class: int | None, keys: Mapping[str, dict[str, Any]],
                  specs: Mapping[int, tuple[str, dict[str, str]]]) -> str:
  """What a reader without the TFDS build needs: the classes, each split's variant key, the split specs.

  `specs` maps a fold to (train spec, {eval name: spec}) as input_pipeline.split_specs gives
  it. Written after the variants, through a rename, so a catalog names only complete ones.
  """
  body = {"format": CATALOG_FORMAT, "dataset": dataset, "image_size": int(image_size),
          "class_names": list(class_names), "covid_class": covid_class, "keys": dict(keys),
          "specs": {str(fold): [train, dict(evals)] for fold, (train, evals) in specs.items()}}
  path = catalog_path(root, image_size)
  fd, tmp = tempfile.mkstemp(prefix=".catalog.tmp-", dir=os.fspath(root))
  with os.fdopen(fd, "w") as f:
    json.dump(body, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return path


@dataclasses.dataclass(frozen=True)
class PreparedSplits:
  """One build's prepared splits at one image size, as `Dataset` reads them."""
  class_names: tuple[str, ...]
  covid_class: int | None  # the class covid_fraction thins by default (None: found by name)
  train: prepared.Rows
  evals: dict[str, prepared.Rows]  # eval name ('validation', 'test') -> its rows
  removed: dict[str, np.ndarray]  # rows of each eval split config.dedup leaves out


def open_rows(root: str | os.PathLike, keys: Sequence[dict[str, Any]]) -> prepared.Rows:
  """The variants of `keys` laid end to end (a composite split such as 4 of 5 folds)."""
  parts = []
  for key in keys:
    variant = prepared.open_variant(root, key)
    if variant is None:
      raise FileNotFoundError(
          f"{key['dataset']} {key['split']} is not prepared at {key['image_size']} px under {root}. "
          "Process 0 prepares it in input_pipeline.create_dataset; give every process the same (shared) "
          "config.data_dir.")
    parts.append(variant)
  return prepared.Rows(parts)


def open_prepared(config: Any, root: str | os.PathLike, **shard: int | None) -> Dataset:
  """The Dataset of a prepared directory (`<build>/prepared`, or a copy of it), without TensorFlow.

  The catalog must be for config.dataset at config.image_size with this code's
  resize and rounding; anything else is an error naming both. config.dedup
  needs the TFDS build's duplicate report and is refused here.
  """
  root = os.fspath(root)
  path = catalog_path(root, config.image_size)
  if not os.path.isfile(path):
    found = sorted(f for f in os.listdir(root) if f.startswith("catalog_px")) if os.path.isdir(root) else []
    raise FileNotFoundError(f"{path} does not exist: {root} holds no data prepared at {config.image_size} px"
                            f"{' (it has ' + ', '.join(found) + ')' if found else ''}. Prepare it with "
                            "TensorFlow (input_pipeline.create_dataset at this image_size) and copy the "
                            "prepared directory.")
  with open(path) as f:
    catalog = json.load(f)
  expected = {"format": CATALOG_FORMAT, "dataset": config.dataset, "image_size": int(config.image_size)}
  found = {k: catalog.get(k) for k in expected}
  stale = [k for key in catalog["keys"].values() for k, v in (("resize", RESIZE), ("rounding", prepared.ROUNDING),
                                                              ("format", prepared.FORMAT)) if key.get(k) != v]
  if found != expected or stale:
    raise prepared.VariantError(f"{path} is for {found} with {sorted(set(stale)) or 'the same'} preprocessing, but "
                                f"this run needs {expected}, resize {RESIZE}, rounding {prepared.ROUNDING}. "
                                "Prepare the data again for this config.")
  if config.get("dedup", False):
    raise config_lib.ConfigError("config.dedup needs the TFDS build's duplicate report; a prepared directory "
                                 "alone has none. Run without it, or with TensorFlow from the build.")
  fold = str(int(config.get("fold", 0)))
  specs = catalog["specs"].get(fold)
  if specs is None:
    raise config_lib.ConfigError(f"config.fold={fold} is not one of {sorted(catalog['specs'])} for "
                                 f"{config.dataset} ({path}).")
  train_spec, eval_specs = specs

  def rows(spec: str) -> prepared.Rows:
    return open_rows(root, [catalog["keys"][split] for split in spec.split("+")])

  splits = PreparedSplits(class_names=tuple(catalog["class_names"]), covid_class=catalog["covid_class"],
                          train=rows(train_spec), evals={name: rows(spec) for name, spec in eval_specs.items()},
                          removed={name: np.zeros(0, np.int64) for name in eval_specs})
  return Dataset(config, splits, **local_shard(**shard))


def local_shard(process_index: int | None = None, process_count: int | None = None,
                local_device_count: int | None = None) -> dict[str, int]:
  """Dataset's shard keywords: JAX's process and local devices, unless given (tests shard in one process)."""
  import jax  # pylint: disable=g-import-not-at-top  (only where no shard is given)
  return {"process_index": jax.process_index() if process_index is None else process_index,
          "process_count": jax.process_count() if process_count is None else process_count,
          "local_device_count": jax.local_device_count() if local_device_count is None else local_device_count}


class Dataset:
  """Train and eval iterators over one dataset, sharded for this process and its local devices."""

  def __init__(self, config: Any, splits: PreparedSplits, *, process_index: int, process_count: int,
               local_device_count: int):
    self._process_index = process_index
    self._process_count = process_count
    self._local_devices = local_device_count
    self._seed = int(config.get("seed", 0))
    self._image_size = int(config.image_size)
    self._batch_size = int(config.batch_size)
    self._eval_batch_size = int(config.get("eval_batch_size", config.batch_size))
    self._per_device = self._per_device_batch(self._batch_size, "batch_size")
    self._eval_per_device = self._per_device_batch(self._eval_batch_size, "eval_batch_size")

    self._train, self._eval = splits.train, dict(splits.evals)
    # Rows of each eval split that are evaluated, in storage order.
    self._eval_rows = {name: np.setdiff1d(np.arange(len(split)), splits.removed[name])
                       for name, split in self._eval.items()}
    class_names = splits.class_names
    self._kept = training_subset(
        self._train.labels, class_names, per_class=int(config.get("train_per_class", 0)),
        fraction=float(config.get("covid_fraction", 1.0)), seed=self._seed,
        minority=minority_class(config.get("minority_class", ""), class_names, splits.covid_class))
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
        duplicates_removed={name: len(rows) for name, rows in splits.removed.items()},
        meta_counts=(None if self._meta is None
                     else np.bincount(self._train.labels[self._meta], minlength=len(class_names))),
    )

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
