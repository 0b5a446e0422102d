"""Learning the loss's own parameters: alpha's parametrization, the meta set and the bilevel (meta) step."""

import numpy as np
import pytest

from dsn_saal_jax import checkpointing, config_lib, meta, train
from dsn_saal_jax.array_dataset import ArrayDataset


def test_alpha_param_is_in_the_fingerprint_and_older_checkpoints_are_sigmoid():
  """A checkpoint's raw alpha means another alpha under the other parametrization, so resuming across is refused."""
  sigmoid, log10 = config_lib.base_config(), config_lib.base_config()
  log10.saal.alpha_param = "log10"
  old, new = train.model_fingerprint(sigmoid, 3), train.model_fingerprint(log10, 3)
  assert checkpointing.fingerprint_differences(old, new) == [
      "saal_alpha_param: checkpoint 'sigmoid' vs config 'log10'"]
  legacy = {k: v for k, v in old.items() if k != "saal_alpha_param"}  # written before alpha_param existed
  assert checkpointing.fingerprint_differences(legacy, old) == []
  log10.saal.alpha_param = "log"
  with pytest.raises(ValueError, match=r"config.saal.alpha_param='log' is not one of sigmoid, log10"):
    config_lib.validate_config(log10, 1)


# ----------------------------------------------------------------------------- the meta set

LABELS = np.array([0] * 200 + [1] * 30 + [2] * 9)
NAMES = ("normal", "pneumonia", "covid")


def test_meta_set_is_a_seeded_stratified_slice_held_out_of_training():
  train_pos, meta_pos = meta.meta_split(LABELS, 0.1, False, seed=0, class_names=NAMES)
  assert np.bincount(LABELS[meta_pos]).tolist() == [20, 3, 1]  # round(0.1 k_n): as imbalanced as training
  assert np.bincount(LABELS[train_pos]).tolist() == [180, 27, 8]
  assert not set(train_pos) & set(meta_pos) and len(train_pos) + len(meta_pos) == len(LABELS)
  np.testing.assert_array_equal(meta_pos, meta.meta_split(LABELS, 0.1, False, 0, NAMES)[1])
  assert not np.array_equal(meta_pos, meta.meta_split(LABELS, 0.1, False, 1, NAMES)[1])
  _, balanced = meta.meta_split(LABELS, 0.1, True, seed=0, class_names=NAMES)
  assert np.bincount(LABELS[balanced]).tolist() == [8, 8, 8]  # round(0.1 * 239 / 3) of every class


@pytest.mark.parametrize("fraction, balanced, message", [
    (0.0, False, r"meta_fraction=0.0 must be in \(0, 0.5\]"),
    (0.6, False, r"meta_fraction=0.6 must be in \(0, 0.5\]"),
    (0.05, False, r"leaves no meta example of class covid \(9 training examples\)"),
    (0.2, True, r"meta_balanced: round\(0.2 \* 239 / 3\) = 16 of every class\) leaves no training example "
                r"of class covid \(9 examples, 16 for meta\); lower meta_fraction or set meta_balanced=False"),
])
def test_meta_set_that_would_empty_a_class_is_refused_naming_it(fraction, balanced, message):
  with pytest.raises(ValueError, match=message):
    meta.meta_split(LABELS, fraction, balanced, 0, NAMES)


def test_meta_batches_are_a_function_of_the_step_and_cover_the_meta_set():
  """A meta set smaller than a batch repeats in it; every pass is a seeded permutation (resume sees the same)."""
  positions = np.concatenate([meta.meta_batch_positions(7, 4, seed=0, step=s) for s in range(7)])
  for start in range(0, 28, 7):
    assert sorted(positions[start:start + 7]) == list(range(7))
  np.testing.assert_array_equal(meta.meta_batch_positions(7, 4, 0, 5), positions[20:24])
  assert sorted(meta.meta_batch_positions(3, 8, 0, 0)[:3]) == [0, 1, 2]


def test_array_dataset_trains_without_the_meta_set_and_feeds_it_per_step():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(len(LABELS), 4, 4, 1)).astype(np.float32)
  images[:, 0, 0, 0] = np.arange(len(LABELS))  # the example's index, to follow it
  ds = ArrayDataset((images, LABELS), {}, NAMES, 16, 16, seed=0, meta_fraction=0.1)
  assert ds.info.class_counts.tolist() == [180, 27, 8] and ds.info.meta_counts.tolist() == [20, 3, 1]
  meta_ids = set(ds.meta_images[:, 0, 0, 0].astype(int))
  batches = [next(ds.train_iter(s)) for s in range(ds.info.steps_per_epoch)]
  seen = {int(i) for b in batches for i in b["image"][..., 0, 0, 0].ravel()}
  assert not seen & meta_ids
  assert {int(i) for b in batches for i in b["meta_image"][..., 0, 0, 0].ravel()} == meta_ids
  b = batches[3]
  assert b["meta_image"].shape == b["image"].shape and b["meta_label"].shape == b["label"].shape
  np.testing.assert_array_equal(next(ds.train_iter(3))["meta_label"], b["meta_label"])
  assert ArrayDataset((images, LABELS), {}, NAMES, 16, 16).info.meta_counts is None
