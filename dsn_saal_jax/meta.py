"""Meta-learning the loss's own parameters on a held-out slice of the training split.

The meta set is a seeded, class-stratified slice of the training examples a
run keeps (after `train_per_class` and `covid_fraction`), taken out of what the
network trains on; never validation (which selects checkpoints) nor test.
Batches of it are drawn by global step, so a resumed run sees the same ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Random streams of config.seed: input_pipeline uses 0-2 (subsampling, shuffling, per class).
_META_SPLIT_STREAM = 3
_META_SHUFFLE_STREAM = 4


def check_meta_fraction(fraction: float) -> None:
  if not 0.0 < fraction <= 0.5:
    raise ValueError(f"config.saal.meta_fraction={fraction!r} must be in (0, 0.5]: the share of each class's "
                     "training examples held out as the meta set.")


def meta_split(labels: np.ndarray, fraction: float, balanced: bool, seed: int,
               class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(train positions, meta positions) into `labels`, each sorted; a seeded draw within each class.

  Stratified (default): round(fraction * k_n) meta examples of class n, so the
  meta set is as imbalanced as the training data. `balanced`: round(fraction *
  N / C) of every class, the same total split evenly, which takes a larger
  share of the minority. A class left with no meta or no training example is
  an error naming it.
  """
  check_meta_fraction(fraction)
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=len(class_names))
  if balanced:
    meta_counts = np.full(len(counts), round(fraction * len(labels) / len(counts)))
  else:
    meta_counts = np.array([round(fraction * k) for k in counts])
  how = (f"meta_balanced: round({fraction} * {len(labels)} / {len(counts)}) = {meta_counts[0]} of every class"
         if balanced else "round(meta_fraction * k_n) of each class")
  no_meta = [f"{name} ({k} training examples)" for name, k, m in zip(class_names, counts, meta_counts) if m < 1]
  if no_meta:
    raise ValueError(f"config.saal.meta_fraction={fraction} ({how}) leaves no meta example of class "
                     f"{', '.join(no_meta)}; raise meta_fraction or keep more examples of that class.")
  no_train = [f"{name} ({k} examples, {m} for meta)" for name, k, m in zip(class_names, counts, meta_counts)
              if m >= k]
  if no_train:
    raise ValueError(f"config.saal.meta_fraction={fraction} ({how}) leaves no training example of class "
                     f"{', '.join(no_train)}; lower meta_fraction" + (" or set meta_balanced=False." if balanced else "."))
  rng = np.random.default_rng([seed, _META_SPLIT_STREAM])
  meta = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == n), size=m, replace=False)
                                 for n, m in enumerate(meta_counts)]))
  return np.setdiff1d(np.arange(len(labels)), meta), meta


def meta_batch_positions(num_meta: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Positions in the meta set of global step `step`'s meta batch.

  Steps read consecutive stretches of one stream of seeded permutations of
  the meta set, so a meta set smaller than a batch simply repeats within it.
  """
  flat = step * batch_size + np.arange(batch_size)
  epochs, within = np.divmod(flat, num_meta)
  orders = {e: np.random.default_rng([seed, _META_SHUFFLE_STREAM, e]).permutation(num_meta)
            for e in np.unique(epochs)}
  return np.array([orders[e][i] for e, i in zip(epochs, within)], np.int64)
