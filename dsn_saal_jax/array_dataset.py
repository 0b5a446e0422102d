"""An in-memory dataset with the input-pipeline contract, for `train_and_evaluate(..., dataset=)`.

Notebooks and tests use it to train on NumPy arrays without TFDS. It follows
the same contract as `dsn_saal_jax.data.input_pipeline`: step s is batch
s % steps_per_epoch of a seeded per-epoch permutation (so `train_iter(s)`
resumes exactly), every process gets its contiguous slice of each global
batch, and eval passes pad with mask 0 so every example counts once. With a
meta set (`meta_fraction` > 0, for `config.meta.update_rule='meta'`) each training
batch also carries that step's `meta_image` and `meta_label`.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import jax
import numpy as np

from dsn_saal_jax import meta
from dsn_saal_jax.data_info import DataInfo


class ArrayDataset:
  """Train and eval splits held as (N, H, W, C) float32 images and (N,) int labels."""

  def __init__(self, train: tuple[np.ndarray, np.ndarray], evals: Mapping[str, tuple[np.ndarray, np.ndarray]],
               class_names: Sequence[str], batch_size: int, eval_batch_size: int, seed: int = 0,
               meta_fraction: float = 0.0, meta_balanced: bool = False):
    """`meta_fraction` > 0 holds out that share of `train` as the meta set (see `meta.meta_split`)."""
    images, labels = np.asarray(train[0], np.float32), np.asarray(train[1], np.int32)
    self.meta_images = self.meta_labels = None
    if meta_fraction:
      kept, held = meta.meta_split(labels, meta_fraction, meta_balanced, seed, class_names)
      self.meta_images, self.meta_labels = images[held], labels[held]
      images, labels = images[kept], labels[kept]
    self.images, self.labels = images, labels
    self.evals = {k: (np.asarray(x, np.float32), np.asarray(y, np.int32)) for k, (x, y) in evals.items()}
    self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
    if len(self.images) < batch_size:
      raise ValueError(f"{len(self.images)} training examples are fewer than one batch of {batch_size}.")
    self.info = DataInfo(
        class_names=tuple(class_names),
        class_counts=np.bincount(self.labels, minlength=len(class_names)),
        num_train=len(self.images), num_eval={k: len(v[1]) for k, v in self.evals.items()},
        image_shape=tuple(self.images.shape[1:]), steps_per_epoch=len(self.images) // batch_size,
        normalization={},
        meta_counts=None if self.meta_labels is None else np.bincount(self.meta_labels, minlength=len(class_names)))

  def _local(self, array: np.ndarray, global_batch: int) -> np.ndarray:
    """This process's slice of a global batch, shaped (local_devices, per_device, ...)."""
    per_process = global_batch // jax.process_count()
    start = jax.process_index() * per_process
    part = array[start:start + per_process]
    return part.reshape(jax.local_device_count(), -1, *part.shape[1:])

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    spe, step = self.info.steps_per_epoch, start_step
    while True:
      epoch, b = divmod(step, spe)
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
      idx = order[b * self.batch_size:(b + 1) * self.batch_size]
      batch = {"image": self._local(self.images[idx], self.batch_size),
               "label": self._local(self.labels[idx], self.batch_size)}
      if self.meta_labels is not None:
        m = meta.meta_batch_positions(len(self.meta_labels), self.batch_size, self.seed, step)
        batch.update(meta_image=self._local(self.meta_images[m], self.batch_size),
                     meta_label=self._local(self.meta_labels[m], self.batch_size))
      yield batch
      step += 1

  def eval_iter(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    images, labels = self.evals[split]
    n, b = len(labels), self.eval_batch_size
    for start in range(0, n, b):
      idx = np.arange(start, start + b)
      valid = idx < n
      idx = np.where(valid, idx, 0)
      yield {"image": self._local(images[idx], b), "label": self._local(labels[idx], b),
             "mask": self._local(valid.astype(np.float32), b), "index": self._local(idx, b)}
