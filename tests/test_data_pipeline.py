"""Input pipeline on a small synthetic_ct: shapes, determinism, resume, sharding, eval, imbalance."""

import itertools
import json
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from dsn_saal_jax import losses, prepared
from dsn_saal_jax.data import builders, input_pipeline
from dsn_saal_jax.data.builders import synthetic_ct

tfds.disable_progress_bar()

SCALE = 0.02   # train 53 / 20 / 25, validation and test 23 / 8 / 11


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def make_config(data_dir, **overrides):
  c = ml_collections.ConfigDict(dict(
      dataset="synthetic_ct", data_dir=data_dir, manual_dir="", image_size=40, channels=1,
      covid_fraction=1.0, fold=0, seed=0, batch_size=8, eval_batch_size=16, lung_mask=True,
      synthetic_scale=SCALE, synthetic_image_size=32))
  c.update(overrides)
  return c


def create(data_dir, process_index=0, process_count=1, local_device_count=1, **overrides):
  return input_pipeline.create_dataset(
      make_config(data_dir, **overrides), process_index=process_index,
      process_count=process_count, local_device_count=local_device_count)


def take(it, n):
  return list(itertools.islice(it, n))


def test_shapes_dtypes_and_info(data_dir):
  ds = create(data_dir, local_device_count=2)
  info = ds.info
  assert info.class_names == ("normal", "bacterial_pneumonia", "covid19")
  np.testing.assert_array_equal(info.class_counts, synthetic_ct.split_counts(SCALE, "train"))
  assert info.class_counts.dtype == np.int64
  assert info.num_train == 98 and info.steps_per_epoch == 98 // 8
  assert info.num_eval == {"validation": 42, "test": 42}
  assert info.image_shape == (40, 40, 1)
  batch = next(ds.train_iter())
  assert batch["image"].shape == (2, 4, 40, 40, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2, 4) and batch["label"].dtype == np.int32
  # Normalization is invertible to the [0, 255] pixel range and reported for inference.
  norm = info.normalization
  pixels = (batch["image"] * norm["std"][0] + norm["mean"][0]) * norm["scale"]
  assert pixels.min() > -0.5 and pixels.max() < 255.5 and pixels.max() > 100


def test_three_channels_repeat_gray(data_dir):
  ds = create(data_dir, channels=3)
  image = next(ds.train_iter())["image"][0]
  assert image.shape[-1] == 3 and ds.info.image_shape == (40, 40, 3)
  norm = ds.info.normalization
  gray = [(image[..., c] * norm["std"][c] + norm["mean"][c]) for c in range(3)]
  np.testing.assert_allclose(gray[0], gray[1], atol=1e-5)
  np.testing.assert_allclose(gray[0], gray[2], atol=1e-5)


def test_preprocess_resizes_bilinear_and_normalizes():
  norm = input_pipeline.normalization_for(ml_collections.ConfigDict({"channels": 1}))
  flat = tf.fill((30, 50, 1), tf.constant(200, tf.uint8))
  out = input_pipeline.preprocess(flat, 24, norm).numpy()
  assert out.shape == (24, 24, 1)
  np.testing.assert_allclose(out, (200 / 255 - norm["mean"][0]) / norm["std"][0], rtol=1e-5)
  ramp = tf.cast(tf.tile(tf.range(0, 256, 4)[None, :, None], [64, 1, 1]), tf.uint8)  # 64x64
  up = input_pipeline.preprocess(ramp, 128, {**norm, "mean": [0.0], "std": [1.0]}).numpy()
  # Upsampling a linear ramp bilinearly stays linear (and monotone) in the interior.
  row = up[10, 2:-2, 0] * 255
  assert np.all(np.diff(row) > 0)
  np.testing.assert_allclose(np.diff(row), 2.0, atol=1e-3)


def test_training_order_is_seeded_and_epochs_are_permutations(data_dir):
  a, b = create(data_dir), create(data_dir)
  c = create(data_dir, seed=1)
  first_a = take(a.train_iter(), 3)
  first_b = take(b.train_iter(), 3)
  for x, y in zip(first_a, first_b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(first_a[0]["image"], take(c.train_iter(), 1)[0]["image"])
  steps = a.info.steps_per_epoch
  for epoch in range(2):
    order = a.epoch_order(epoch)
    np.testing.assert_array_equal(np.sort(order), np.arange(a.info.num_train))
  assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
  # Labels of the batches are those of the epoch order (the epoch's remainder dropped).
  labels = np.concatenate([x["label"].ravel() for x in take(a.train_iter(), 2 * steps)])
  train_labels = a._train.labels
  expected = np.concatenate([train_labels[a.epoch_order(e)[: steps * 8]] for e in range(2)])
  np.testing.assert_array_equal(labels, expected)


def test_resume_sees_the_same_batches(data_dir):
  ds = create(data_dir)
  steps = ds.info.steps_per_epoch
  full = take(ds.train_iter(), 2 * steps + 3)
  for start in (1, steps - 1, steps, 2 * steps + 1):  # mid-epoch and across epoch boundaries
    resumed = take(ds.train_iter(start_step=start), 2)
    for offset, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch["image"], full[start + offset]["image"])
      np.testing.assert_array_equal(batch["label"], full[start + offset]["label"])


def test_processes_split_every_global_batch(data_dir):
  single = create(data_dir, local_device_count=4)
  shards = [create(data_dir, process_index=p, process_count=2, local_device_count=2)
            for p in range(2)]
  for step in (0, single.info.steps_per_epoch + 2):
    whole = next(single.train_iter(step))
    parts = [next(s.train_iter(step)) for s in shards]
    for key in ("image", "label"):
      glued = np.concatenate([p[key].reshape((-1,) + p[key].shape[2:]) for p in parts])
      np.testing.assert_array_equal(glued, whole[key].reshape((-1,) + whole[key].shape[2:]))
      assert parts[0][key].shape[:2] == (2, 2)


@pytest.mark.parametrize("process_count,local_devices", [(1, 1), (1, 2), (2, 2), (3, 1)])
def test_eval_counts_every_example_once(data_dir, process_count, local_devices):
  ids, labels, batches = [], [], 0
  for p in range(process_count):
    ds = create(data_dir, process_index=p, process_count=process_count,
                local_device_count=local_devices, batch_size=6 * process_count * local_devices,
                eval_batch_size=6 * process_count * local_devices)
    for batch in ds.eval_iter("test"):
      assert batch["image"].shape[:2] == batch["mask"].shape == (local_devices, 6)
      real = batch["mask"] > 0
      assert np.all((batch["index"] >= 0) == real)
      ids.extend(batch["index"][real].tolist())
      labels.extend(batch["label"][real].tolist())
      batches += 1
  assert sorted(ids) == list(range(42))
  ordered = np.asarray(labels)[np.argsort(ids)]
  np.testing.assert_array_equal(ordered, ds._split("test").labels)
  assert batches == process_count * -(-42 // (6 * process_count * local_devices))


def test_eval_is_deterministic_and_matches_example_ids(data_dir):
  ds = create(data_dir)
  one, two = list(ds.eval_iter("validation")), list(ds.eval_iter("validation"))
  for x, y in zip(one, two):
    np.testing.assert_array_equal(x["image"], y["image"])
  ids = ds.example_ids("validation")
  assert len(ids) == 42 and len(set(ids)) == 42 and all(i.startswith("validation/") for i in ids)
  with pytest.raises(ValueError, match="Unknown eval split 'val'"):
    ds.eval_iter("val")


@pytest.mark.parametrize("fraction", [0.25, 0.1, 0.05])
def test_imbalance_protocol(data_dir, fraction):
  ds = create(data_dir, covid_fraction=fraction, batch_size=4)
  n_covid = synthetic_ct.split_counts(SCALE, "train")[2]
  kept = round(fraction * n_covid)
  counts = ds.info.class_counts
  assert counts[2] == kept and tuple(counts[:2]) == synthetic_ct.split_counts(SCALE, "train")[:2]
  assert ds.info.num_train == counts.sum()
  # The loss gets exactly these k_n, and they are what an epoch contains.
  np.testing.assert_array_equal(losses.check_class_counts(counts, ds.info.class_names), counts)
  epoch = ds._train.labels[ds.epoch_order(0)]
  np.testing.assert_array_equal(np.bincount(epoch, minlength=3), counts)
  same = create(data_dir, covid_fraction=fraction, batch_size=4)
  np.testing.assert_array_equal(same._kept, ds._kept)
  # Validation and test are untouched.
  assert ds.info.num_eval == {"validation": 42, "test": 42}


def test_meta_set_is_held_out_of_the_kept_training_examples(data_dir):
  """update_rule=meta: a stratified slice of what covid_fraction kept, gone from training, fed per step; k_n follow."""
  meta_config = dict(update_rule="meta", fraction=0.25, balanced=False)
  plain = create(data_dir, covid_fraction=0.5, batch_size=4)
  ds = create(data_dir, covid_fraction=0.5, batch_size=4, meta=meta_config)
  kept = plain.info.class_counts
  assert ds.info.meta_counts.tolist() == [round(0.25 * k) for k in kept]
  np.testing.assert_array_equal(ds.info.class_counts + ds.info.meta_counts, kept)
  train_ids, meta_ids = set(ds.example_ids("train")), set(ds.example_ids("meta"))
  assert train_ids | meta_ids == set(plain.example_ids("train")) and not train_ids & meta_ids
  assert all(i.startswith("train/") for i in meta_ids)  # never validation or test
  batches = take(ds.train_iter(), 3)
  assert batches[2]["meta_image"].shape == batches[2]["image"].shape == (1, 4, 40, 40, 1)
  resumed = next(ds.train_iter(start_step=2))
  np.testing.assert_array_equal(resumed["meta_image"], batches[2]["meta_image"])
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])


def test_subsample_class_exact_seeded_and_errors():
  labels = np.array([0, 1, 2] * 100 + [2] * 57)
  kept = input_pipeline.subsample_class(labels, 2, 0.1, seed=3)
  assert (labels[kept] == 2).sum() == round(0.1 * 157)
  assert (labels[kept] != 2).sum() == 200
  np.testing.assert_array_equal(kept, input_pipeline.subsample_class(labels, 2, 0.1, seed=3))
  assert not np.array_equal(kept, input_pipeline.subsample_class(labels, 2, 0.1, seed=4))
  np.testing.assert_array_equal(input_pipeline.subsample_class(labels, 2, 1.0, 0),
                                np.arange(len(labels)))
  with pytest.raises(ValueError, match=r"covid_fraction=0.001 keeps .* = 0 examples of class covid"):
    input_pipeline.subsample_class(labels, 2, 0.001, 0, "covid")
  with pytest.raises(ValueError, match=r"covid_fraction must be in \(0, 1\]"):
    input_pipeline.subsample_class(labels, 2, 1.5, 0)


def test_batch_sizes_must_divide_over_devices(data_dir):
  with pytest.raises(ValueError, match=r"config.batch_size=6 must be a positive multiple of .* = 4"):
    create(data_dir, batch_size=6, process_count=2, local_device_count=2)
  with pytest.raises(ValueError, match=r"config.eval_batch_size=10 .* = 4"):
    create(data_dir, batch_size=8, eval_batch_size=10, local_device_count=4)
  with pytest.raises(ValueError, match="batch_size 128 exceeds the 98 training examples"):
    create(data_dir, batch_size=128)


def test_sars_fold_selection_end_to_end(tmp_path):
  manual = tmp_path / "manual"
  for folder, n in (("COVID", 9), ("non-COVID", 8)):
    (manual / folder).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((20, 24), 10 * i, np.uint8)).save(manual / folder / f"{i}.png")
  seen_test = []
  for fold in range(5):
    ds = create(str(tmp_path / "tfds"), dataset="sars_cov2_ct", manual_dir=str(manual), fold=fold,
                batch_size=2, eval_batch_size=2, image_size=32)
    test, train = set(ds.example_ids("test")), set(ds.example_ids("train"))
    assert not test & train and len(test | train) == 17
    assert ds.info.num_eval == {"test": len(test)} and ds.info.num_train == len(train)
    assert tuple(ds.info.class_counts) == (8 - sum(t.startswith("non-COVID/") for t in test),
                                           9 - sum(t.startswith("COVID/") for t in test))
    seen_test.extend(test)
  assert sorted(seen_test) == sorted(set(seen_test)) and len(seen_test) == 17


def test_sars_fold_selection():
  train, evals = input_pipeline.split_specs("sars_cov2_ct", [f"fold{k}" for k in range(5)], 2)
  assert train == "fold0+fold1+fold3+fold4" and evals == {"test": "fold2"}
  assert input_pipeline.split_specs("covid19_diag", ["train", "test"], 0) == ("train", {"test": "test"})
  with pytest.raises(ValueError, match="config.fold must be in 0..4"):
    input_pipeline.split_specs("sars_cov2_ct", [], 5)


@pytest.mark.parametrize("image_size", [40, 24])  # 32-px slices enlarged (plain bilinear) and shrunk (antialiased)
def test_batches_are_the_per_epoch_preprocessing_rounded_to_uint8(data_dir, image_size):
  """The prepared bytes are the old per-epoch decode + resize, rounded half to even to uint8.

  So a batch equals the old normalize() of the rounded resize bit for bit, and the
  unrounded one within half a gray level (0.5 / 255 / std).
  """
  ds = create(data_dir, image_size=image_size, channels=3)
  builder = builders.make_builder(make_config(data_dir))
  norm = ds.info.normalization
  rounded_somewhere = False
  for split, batch, rows in (("train", next(ds.train_iter()), ds.epoch_order(0)[:8]),
                             ("validation", next(ds.eval_iter("validation")), np.arange(16))):
    source = builder.as_data_source(split)
    for k, row in enumerate(rows):
      resized = input_pipeline.resize(source[int(row)]["image"], image_size)
      got = batch["image"].reshape((-1, image_size, image_size, 3))[k]
      np.testing.assert_array_equal(got, input_pipeline.normalize(tf.round(resized), norm).numpy())
      old = input_pipeline.normalize(resized, norm).numpy()
      assert np.abs(got - old).max() <= 0.5 / 255 / min(norm["std"]) + 1e-6
      rounded_somewhere |= bool((resized.numpy() != np.round(resized.numpy())).any())
  assert rounded_somewhere  # the resize's fractions are real, so the rounding above is exercised


def test_a_variant_is_only_read_for_its_key(data_dir, tmp_path):
  small = create(data_dir, image_size=24)
  assert next(small.train_iter())["image"].shape == (1, 8, 24, 24, 1)
  assert next(create(data_dir).train_iter())["image"].shape == (1, 8, 40, 40, 1)
  builder = builders.make_builder(make_config(data_dir))
  key40, key24 = (input_pipeline.variant_key(builder, "test", size) for size in (40, 24))
  assert prepared.variant_name(key40) != prepared.variant_name(key24)
  # The 40-px variant's files under the 24-px variant's name: an error naming both keys, never read.
  impostor = tmp_path / prepared.variant_name(key24)
  shutil.copytree(f"{input_pipeline.variants_root(builder)}/{prepared.variant_name(key40)}", impostor)
  with pytest.raises(prepared.VariantError, match=r'prepared for .*"image_size": 40.* needs .*"image_size": 24'):
    prepared.open_variant(tmp_path, key24)
  (impostor / prepared.MANIFEST).unlink()
  with pytest.raises(prepared.VariantError, match="not a complete prepared variant"):
    prepared.open_variant(tmp_path, key24)
  # A variant being written (no commit yet) is invisible: the next run prepares it again.
  writer, racer = prepared.Writer(tmp_path / "other", key24, 3), prepared.Writer(tmp_path / "other", key24, 3)
  writer.images[:] = 7
  assert prepared.open_variant(tmp_path / "other", key24) is None
  writer.commit(np.zeros(3), ["a", "b", "c"])
  racer.commit(np.zeros(3), ["a", "b", "c"])  # a second run finishing the same variant later keeps the first
  assert prepared.open_variant(tmp_path / "other", key24).images.sum() == 7 * 3 * 24 * 24
  assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [prepared.variant_name(key24)]


def test_a_failing_batch_is_an_error_not_a_hang(data_dir):
  ds = create(data_dir)
  gather, calls = ds._train.gather, []

  def failing(rows):
    calls.append(rows)
    if len(calls) == 3:
      raise OSError("disk gone")
    return gather(rows)

  ds._train.gather = failing
  it = ds.train_iter()
  with pytest.raises(OSError, match="disk gone"):
    for _ in range(10):
      next(it)


def test_prepared_variants_read_without_tensorflow(data_dir):
  builder = builders.make_builder(make_config(data_dir))
  key = input_pipeline.variant_key(builder, "validation", 40)
  code = ("import json, sys; sys.modules['tensorflow'] = None; from dsn_saal_jax import prepared; "
          "v = prepared.open_variant(sys.argv[1], json.loads(sys.argv[2])); print(v.images.shape, len(v.ids))")
  out = subprocess.run([sys.executable, "-c", code, input_pipeline.variants_root(builder), json.dumps(key)],
                       check=True, capture_output=True, text=True).stdout
  assert out.split() == ["(42,", "40,", "40,", "1)", "42"]


def test_a_copied_prepared_directory_trains_without_tensorflow(data_dir, tmp_path):
  """What an accelerator without TensorFlow reads: the same batches, ids and info as the TFDS side's."""
  overrides = dict(covid_fraction=0.5, meta=dict(update_rule="meta", fraction=0.2, balanced=False))
  ds = create(data_dir, local_device_count=2, **overrides)
  copy = tmp_path / "prepared"
  shutil.copytree(input_pipeline.variants_root(builders.make_builder(make_config(data_dir))), copy)
  code = """if True:
    import json, sys, itertools
    sys.modules['tensorflow'] = None
    import ml_collections, numpy as np
    from dsn_saal_jax import prepared_dataset
    config = ml_collections.ConfigDict(json.loads(sys.argv[2]))
    ds = prepared_dataset.open_prepared(config, sys.argv[1], process_index=0, process_count=1, local_device_count=2)
    train = list(itertools.islice(ds.train_iter(start_step=11), 3))
    test = list(ds.eval_iter('test'))
    np.savez(sys.argv[3], **{f'train{i}_{k}': v for i, b in enumerate(train) for k, v in b.items()},
             **{f'test{i}_{k}': v for i, b in enumerate(test) for k, v in b.items()},
             counts=ds.info.class_counts, meta=ds.info.meta_counts)
    print(json.dumps(ds.example_ids('meta')))
  """
  out = tmp_path / "batches.npz"
  meta_ids = subprocess.run([sys.executable, "-c", code, str(copy), make_config(data_dir, **overrides).to_json(),
                             str(out)], check=True, capture_output=True, text=True).stdout
  assert json.loads(meta_ids) == ds.example_ids("meta")
  got = np.load(out)
  np.testing.assert_array_equal(got["counts"], ds.info.class_counts)
  np.testing.assert_array_equal(got["meta"], ds.info.meta_counts)
  for i, batch in enumerate(take(ds.train_iter(start_step=11), 3)):
    assert set(batch) == {"image", "label", "meta_image", "meta_label"}
    for k, v in batch.items():
      np.testing.assert_array_equal(got[f"train{i}_{k}"], v)
  for i, batch in enumerate(ds.eval_iter("test")):
    for k, v in batch.items():
      np.testing.assert_array_equal(got[f"test{i}_{k}"], v)


def test_a_prepared_directory_is_only_read_for_its_size_and_preprocessing(data_dir, tmp_path):
  from dsn_saal_jax import prepared_dataset  # pylint: disable=g-import-not-at-top
  create(data_dir)
  root = input_pipeline.variants_root(builders.make_builder(make_config(data_dir)))
  with pytest.raises(FileNotFoundError, match=r"catalog_px56.json does not exist.*holds no data prepared at 56 px"):
    prepared_dataset.open_prepared(make_config(data_dir, image_size=56), root, process_index=0, process_count=1,
                                   local_device_count=1)
  copy = tmp_path / "prepared"
  shutil.copytree(root, copy)
  catalog = json.loads((copy / "catalog_px40.json").read_text())
  catalog["keys"]["test"]["resize"] = "nearest"
  (copy / "catalog_px40.json").write_text(json.dumps(catalog))
  with pytest.raises(prepared.VariantError, match=r"\['resize'\] preprocessing.*resize bilinear_antialias"):
    prepared_dataset.open_prepared(make_config(data_dir), copy, process_index=0, process_count=1,
                                   local_device_count=1)
  with pytest.raises(prepared.VariantError, match=r"'dataset': 'synthetic_ct'.* needs .*'dataset': 'covid19_ct'"):
    prepared_dataset.open_prepared(make_config(data_dir, dataset="covid19_ct"), root, process_index=0,
                                   process_count=1, local_device_count=1)
