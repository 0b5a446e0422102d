"""Prepared variants: each split's slices, resized once to the training size, as a uint8 NumPy array.

Decoding a PNG and resizing it costs ~4 ms of a core; an epoch that redoes that
for every slice feeds ~250 images/s per core, far below an accelerator's
appetite. So the work that depends only on the stored slice and the config
(decode, the builder's window and lung mask, resize to `image_size`) runs once
into a variant directory:

  <name>/images.npy     uint8 (N, S, S, 1), memory-mapped when read
  <name>/labels.npy     int64 (N,)
  <name>/ids.json       the N example ids, in storage order
  <name>/manifest.json  the key the variant was made for, written last

A variant is written into a temporary directory and renamed into place after
its manifest, so a half-written one is never read as complete, and it is only
read for the key in its manifest: another image size, resize or source build
is an error naming both keys. Per epoch a batch is then one fancy-indexed read
and a 256-entry lookup table for the normalization. This module needs NumPy
alone (no TensorFlow), so a machine without TensorFlow reads prepared data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"
# How the resized float pixels become the stored bytes: round half to even, as np.rint and tf.round.
ROUNDING = "rint_uint8"

T = TypeVar("T")
R = TypeVar("R")


class VariantError(ValueError):
  """A prepared variant that cannot be used; the message names its directory and the fix."""


def variant_name(key: dict[str, Any]) -> str:
  """Directory name of a key: readable split and size, then a digest of the whole key."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  return f"{key['split']}_px{key['image_size']}_{digest}"


class Writer:
  """Writes one variant: fill `images` (a memory-mapped array), then `commit(labels, ids)`."""

  def __init__(self, root: str | os.PathLike, key: dict[str, Any], num_examples: int):
    self.root, self.key = os.fspath(root), dict(key)
    os.makedirs(self.root, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=f".{variant_name(key)}.tmp-", dir=self.root)
    size = int(key["image_size"])
    self.images = np.lib.format.open_memmap(os.path.join(self._tmp, "images.npy"), mode="w+",
                                            dtype=np.uint8, shape=(num_examples, size, size, 1))

  def commit(self, labels: np.ndarray, ids: Sequence[str]) -> str:
    """Writes labels, ids and the manifest (last), then renames the variant into place."""
    if len(labels) != len(self.images) or len(ids) != len(self.images):
      raise ValueError(f"{len(self.images)} images, {len(labels)} labels and {len(ids)} ids differ.")
    self.images.flush()
    del self.images
    np.save(os.path.join(self._tmp, "labels.npy"), np.asarray(labels, np.int64))
    with open(os.path.join(self._tmp, "ids.json"), "w") as f:
      json.dump(list(ids), f)
    with open(os.path.join(self._tmp, MANIFEST), "w") as f:
      json.dump({"key": self.key, "num_examples": len(labels)}, f, indent=1, sort_keys=True)
    final = os.path.join(self.root, variant_name(self.key))
    try:
      os.rename(self._tmp, final)
    except OSError:
      if not os.path.isfile(os.path.join(final, MANIFEST)):
        raise
      self.abort()  # Another run sharing the data_dir finished the same variant first; it is read instead.
    return final

  def abort(self) -> None:
    shutil.rmtree(self._tmp, ignore_errors=True)


class Variant:
  """One prepared split, read-only: `images` (memory-mapped uint8), `labels`, `ids`."""

  def __init__(self, path: str | os.PathLike, key: dict[str, Any]):
    self.path = os.fspath(path)
    manifest = os.path.join(self.path, MANIFEST)
    if not os.path.isfile(manifest):
      raise VariantError(f"{self.path} is not a complete prepared variant (no {MANIFEST}). Delete "
                         "the directory; the next run prepares it again.")
    with open(manifest) as f:
      found = json.load(f)
    if found.get("key") != key:
      raise VariantError(
          f"{self.path} was prepared for {json.dumps(found.get('key'), sort_keys=True)}, but this run "
          f"needs {json.dumps(key, sort_keys=True)}. Delete the directory; the next run prepares it "
          "for this key.")
    self.images = np.load(os.path.join(self.path, "images.npy"), mmap_mode="r")
    self.labels = np.load(os.path.join(self.path, "labels.npy"))
    with open(os.path.join(self.path, "ids.json")) as f:
      self.ids: list[str] = json.load(f)
    size = int(key["image_size"])
    n = found["num_examples"]
    if self.images.shape != (n, size, size, 1) or self.images.dtype != np.uint8 or len(self.labels) != n \
        or len(self.ids) != n:
      raise VariantError(f"{self.path}: images {self.images.shape} {self.images.dtype}, {len(self.labels)} "
                         f"labels and {len(self.ids)} ids do not match its manifest ({n} examples at "
                         f"{size} px). Delete the directory; the next run prepares it again.")

  def __len__(self) -> int:
    return len(self.labels)


def open_variant(root: str | os.PathLike, key: dict[str, Any]) -> Variant | None:
  """The variant of `key` under `root`, None when it was never prepared."""
  path = os.path.join(os.fspath(root), variant_name(key))
  return Variant(path, key) if os.path.exists(path) else None


class Rows:
  """Random access by row to splits laid end to end (a composite split such as 4 of 5 folds)."""

  def __init__(self, parts: Sequence[Variant]):
    self.parts = list(parts)
    self.labels = np.concatenate([p.labels for p in self.parts])
    self.ids = [i for p in self.parts for i in p.ids]
    self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return len(self.labels)

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), S, S, 1): the stored slices of `rows`, in that order."""
    if len(self.parts) == 1:
      return self.parts[0].images[rows]
    part = np.searchsorted(self._offsets, rows, side="right") - 1
    out = np.empty((len(rows),) + self.parts[0].images.shape[1:], np.uint8)
    for p in np.unique(part):
      chosen = part == p
      out[chosen] = self.parts[p].images[rows[chosen] - self._offsets[p]]
    return out


def lookup_table(normalization: dict[str, Any]) -> np.ndarray:
  """float32 (256, C): pixel value -> model input per channel, (v / scale - mean) / std in float32.

  The same float32 operations in the same order as the TensorFlow `normalize`,
  so a table lookup gives its values bit for bit.
  """
  pixels = np.repeat(np.arange(256, dtype=np.float32)[:, None], normalization["channels"], axis=1)
  x = pixels / np.float32(normalization["scale"])
  return (x - np.asarray(normalization["mean"], np.float32)) / np.asarray(normalization["std"], np.float32)


def normalize(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
  """uint8 (..., 1) -> float32 (..., C) through `lookup_table`: gray repeated, scaled, standardized."""
  return np.take(table, pixels[..., 0], axis=0)


def default_workers() -> int:
  """Threads for batch assembly: the cores this process may run on, at most 4."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, min(cores, 4))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                ahead: int | None = None) -> Iterator[R]:
  """fn(item) for each item, in order, computed up to `ahead` items early by `workers` threads.

  NumPy's gathers and lookups release the GIL, so threads use every core. An
  exception in a worker is raised here at that item: a failed batch is an
  error, never a hang.
  """
  workers = workers or default_workers()
  ahead = ahead or workers + 1
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dsn_saal_jax_data")
  pending: collections.deque[concurrent.futures.Future] = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
