"""The image_folder builder on tiny folders made here, its training-set protocols, and its errors."""

import importlib.util
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pydicom.data import get_testdata_file

from dsn_saal_jax import config_lib, train
from dsn_saal_jax.data import builders, ct, folders, input_pipeline
from dsn_saal_jax.data.builders import image_folder
from dsn_saal_jax.data.builders.common import DatasetError
from test_data_builders import _assert_failed_build_left_nothing, _examples, _ids, _slice, _write_image
from helpers import tiny_config

tfds.disable_progress_bar()

SIZE = (16, 16)
DICOM = get_testdata_file("CT_small.dcm")
ROOT = Path(__file__).resolve().parents[1]


def make_flat(root, counts: dict[str, int], ext: str = ".png"):
  """<root>/<class>/<i><ext>: every slice its own case."""
  for c, (name, n) in enumerate(counts.items()):
    for i in range(n):
      _write_image(root / name / f"{i:02d}{ext}", 100 * c + i, size=SIZE)
  return root


def make_cases(root, cases: dict[str, list[int]]):
  """<root>/<class>/p<j>/...: case j holds that many slices, PNG, JPEG, BMP, TIFF and DICOM mixed."""
  exts = (".png", ".jpg", ".bmp", ".tif", ".dcm")
  k = 0
  for name, sizes in cases.items():
    for j, n in enumerate(sizes):
      for i in range(n):
        k += 1
        path = root / name / f"p{j:02d}" / f"s{i}{exts[k % len(exts)]}"
        if path.suffix == ".dcm":
          path.parent.mkdir(parents=True, exist_ok=True)
          shutil.copy(DICOM, path)
        else:
          _write_image(path, k, size=SIZE)
  return root


def build(data_dir, manual_dir, **fields):
  config = config_lib.base_config()
  config.update(dict(dataset="image_folder", data_dir=str(data_dir), manual_dir=str(manual_dir),
                     lung_mask=False, **fields))
  builder = builders.make_builder(config)
  builders.prepare(builder, config.manual_dir)
  return builder


def split_ids(builder):
  return {split: set(_ids(builder, split)) for split in builder.info.splits}


def per_class_split(builder):
  """{split: Counter(label)} of a built dataset."""
  return {split: Counter(int(ex["label"]) for ex in _examples(builder, split)) for split in builder.info.splits}


# ---------------------------------------------------------------- splits


def test_flat_folders_split_per_class_by_the_fractions(tmp_path):
  manual = make_flat(tmp_path / "manual", {"covid": 10, "normal": 20})
  builder = build(tmp_path / "tfds", manual)
  assert builder.info.features["label"].names == ["covid", "normal"]
  assert set(builder.info.splits) == {"train", "validation", "test"}   # input_pipeline's names
  assert per_class_split(builder) == {"train": {0: 7, 1: 14}, "validation": {0: 1, 1: 2},
                                      "test": {0: 2, 1: 4}}
  seen = [key for split in builder.info.splits for key in _ids(builder, split)]
  assert sorted(seen) == sorted(p.relative_to(manual).as_posix() for p in manual.rglob("*.png"))
  ex = _ids(builder, "train")
  for key, e in ex.items():
    assert e["label"] == (0 if key.startswith("covid/") else 1) and e["case"].decode() == key
    assert e["image"].shape == (16, 16, 1) and e["image"].dtype == np.uint8
  key = next(k for k in ex if k.startswith("covid/"))   # covid/<i>.png was made with seed i
  np.testing.assert_array_equal(ex[key]["image"][:, :, 0], _slice(int(key[6:8]), SIZE))
  # Another split seed moves slices; the same one does not (fresh data_dir, same assignment).
  other = build(tmp_path / "tfds", manual, split_seed=1)
  assert set(_ids(other, "test")) != set(_ids(builder, "test"))
  again = build(tmp_path / "again", manual)
  assert split_ids(again) == split_ids(builder)


def test_split_depends_only_on_the_ids_and_the_seed(tmp_path):
  folder = folders.scan(make_flat(tmp_path / "manual", {"a": 9, "b": 6}))
  shuffled = folders.LabeledFolder(folder.root, folder.class_names, folder.slices[::-1], (), False, False)
  split = image_folder.split_slices(folder, (0.6, 0.2, 0.2), seed=3)
  assert split == image_folder.split_slices(shuffled, (0.6, 0.2, 0.2), seed=3)
  # Largest remainders, and one case in each split with a positive share.
  assert image_folder.case_counts(10, (0.7, 0.1, 0.2), "x") == (7, 1, 2)
  assert image_folder.case_counts(5, (0.7, 0.1, 0.2), "x") == (3, 1, 1)
  assert image_folder.case_counts(3, (0.7, 0.1, 0.2), "x") == (1, 1, 1)
  assert image_folder.case_counts(2, (0.8, 0.0, 0.2), "x") == (1, 0, 1)
  with pytest.raises(DatasetError, match=r"Class x has 2 case\(s\), fewer than the 3 splits .*split_fractions"):
    image_folder.case_counts(2, (0.7, 0.1, 0.2), "x")


@pytest.mark.skipif(DICOM is None, reason="pydicom's bundled CT_small.dcm is not installed")
def test_case_folders_never_straddle_splits(tmp_path):
  cases = {"covid": [1, 2, 3, 1, 2, 2, 1, 3, 2, 1], "normal": [2, 1, 1, 3, 2]}
  manual = make_cases(tmp_path / "manual", cases)
  builder = build(tmp_path / "tfds", manual)
  by_split = {split: _examples(builder, split) for split in builder.info.splits}
  case_split = {}
  for split, examples in by_split.items():
    for ex in examples:
      case = ex["case"].decode()
      assert case_split.setdefault(case, split) == split, f"{case} is in {case_split[case]} and {split}"
      assert ex["id"].decode().startswith(case + "/")
  assert sum(len(e) for e in by_split.values()) == sum(map(sum, cases.values()))
  for label, (name, sizes) in enumerate(cases.items()):
    got = Counter(split for case, split in case_split.items() if case.startswith(name + "/"))
    assert tuple(got[s] for s in ("train", "validation", "test")) == image_folder.case_counts(
        len(sizes), (0.7, 0.1, 0.2), name)
  dicoms = [ex for e in by_split.values() for ex in e if ex["id"].decode().endswith(".dcm")]
  assert dicoms   # DICOM: HU -> window -> lung mask, whatever config.lung_mask says
  np.testing.assert_array_equal(dicoms[0]["image"][:, :, 0], ct.preprocess_dicom(DICOM))


def test_explicit_split_folders_are_used_as_they_are(tmp_path):
  manual = tmp_path / "manual"
  layout = {"train": {"a": 3, "b": 2}, "valid": {"a": 1, "b": 1}, "test": {"a": 2, "b": 1}}
  for split, counts in layout.items():
    make_flat(manual / split, counts)
  builder = build(tmp_path / "tfds", manual, split_fractions=(0.5, 0.25, 0.25))  # ignored
  for split, tfds_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
    assert set(_ids(builder, tfds_split)) == {p.relative_to(manual).as_posix()
                                              for p in (manual / split).rglob("*.png")}
  # Without a val/ folder there is no validation split, which the trainer then skips.
  shutil.rmtree(manual / "valid")
  builder = build(tmp_path / "tfds", manual)
  assert set(builder.info.splits) == {"train", "test"}


@pytest.mark.parametrize("counts", [{"normal": 4, "pneumonia": 3, "covid": 5},
                                    {"normal": 3, "bacterial": 4, "viral": 3, "covid": 4}])
def test_three_and_four_classes_in_either_order(tmp_path, counts):
  manual = make_flat(tmp_path / "manual", counts)
  builder = build(tmp_path / "tfds", manual)
  assert builder.info.features["label"].names == sorted(counts)            # default: sorted folders
  order = tuple(counts)
  ordered = build(tmp_path / "tfds", manual, class_names=order)
  assert ordered.info.features["label"].names == list(order)
  assert ordered.data_path != builder.data_path                            # never a stale build
  for split in ordered.info.splits:
    for key, ex in _ids(ordered, split).items():
      assert order[ex["label"]] == key.split("/")[0]
  with pytest.raises(DatasetError, match=r"not among the classes \['normal', 'covid'\]"):
    build(tmp_path / "tfds", manual, class_names=("normal", "covid"))


def test_config_name_changes_with_everything_that_shapes_the_data(tmp_path):
  manual = make_flat(tmp_path / "manual", {"a": 3, "b": 3})
  base = dict(manual_dir=str(manual), class_names=(), split_fractions=(0.7, 0.1, 0.2), split_seed=0,
              lung_mask=False)
  name = image_folder.make_config(**base).name
  assert image_folder.make_config(**base).name == name
  for change in (dict(class_names=("b", "a")), dict(split_fractions=(0.6, 0.2, 0.2)), dict(split_seed=1),
                 dict(lung_mask=True)):
    assert image_folder.make_config(**{**base, **change}).name != name, change
  _write_image(manual / "a" / "new.png", 0, size=SIZE)
  assert image_folder.make_config(**base).name != name
  shutil.copytree(manual, tmp_path / "elsewhere")
  assert image_folder.make_config(**{**base, "manual_dir": str(tmp_path / "elsewhere")}).name != name


# ---------------------------------------------------------------- bad input


def test_missing_manual_dir_says_how_to_pass_it(tmp_path):
  config = config_lib.base_config()
  config.dataset, config.data_dir = "image_folder", str(tmp_path)
  with pytest.raises(DatasetError, match=r"--config\.manual_dir=/path/to/folder"):
    builders.make_builder(config)


@pytest.mark.parametrize("damage,message", [
    ("empty_class", r"Class folder \S*manual/b holds no slices"),
    ("single_class", r"\S*manual holds a single class folder \(a\)"),
    ("empty_case", r"Case folder \S*manual/a/p1 holds no slices"),
    ("no_manual_dir", r"\S*nowhere is not a folder"),
])
def test_bad_layouts_name_the_folder(tmp_path, damage, message):
  manual = make_flat(tmp_path / "manual", {"a": 3, "b": 3})
  if damage == "empty_class":
    for p in (manual / "b").iterdir():
      p.unlink()
  elif damage == "single_class":
    shutil.rmtree(manual / "b")
  elif damage == "empty_case":
    (manual / "a" / "p1").mkdir()
  elif damage == "no_manual_dir":
    manual = tmp_path / "nowhere"
  with pytest.raises(DatasetError, match=message):
    build(tmp_path / "tfds", manual)


def test_evaluation_folders_may_hold_only_test_but_training_needs_train(tmp_path):
  make_flat(tmp_path / "held_out" / "test", {"a": 2, "b": 3})
  with pytest.raises(DatasetError, match=r"held_out has split folders \['test'\] but no train/ folder"):
    folders.scan(tmp_path / "held_out")
  folder = folders.scan(tmp_path / "held_out", require_train=False)
  assert folder.explicit_splits and {s.split for s in folder.slices} == {"test"}
  assert folder.counts("test") == [2, 3]


@pytest.mark.parametrize("damage,message", [
    ("not_an_image", r"(?s)1 file\(s\) under the class folders are not slices:.*manual/b/notes\.txt: not an"),
    ("16bit", r"(?s)manual/b/01\.png: I;16 image with more than 8 bits per pixel.*convert it"),
    ("garbage", r"manual/b/01\.png: cannot decode image"),
])
def test_bad_files_name_the_file_and_leave_no_build(tmp_path, damage, message):
  manual = make_flat(tmp_path / "manual", {"a": 3, "b": 3})
  if damage == "not_an_image":
    (manual / "b" / "notes.txt").write_text("scanner notes")
  elif damage == "16bit":
    Image.fromarray((np.arange(256, dtype=np.uint16) * 200).reshape(16, 16)).save(manual / "b" / "01.png")
  else:
    (manual / "b" / "01.png").write_bytes(b"not a png")
  config = config_lib.base_config()
  config.update(dict(dataset="image_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)))
  builder = builders.make_builder(config)
  with pytest.raises(DatasetError, match=message):
    builders.prepare(builder, str(manual))
  _assert_failed_build_left_nothing(builder, tmp_path / "tfds")


@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.1), (0.7, 0.3), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_split_fractions_must_be_three_shares_summing_to_one(tmp_path, fractions):
  config = tiny_config(split_fractions=fractions)
  pattern = rf"config\.split_fractions={re.escape(str(fractions))} must be three train/val/test shares"
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate_config(config, num_devices=1)
  with pytest.raises(ValueError, match=pattern):
    image_folder.make_config(str(make_flat(tmp_path / "manual", {"a": 1, "b": 1})), split_fractions=fractions)
  config_lib.validate_config(tiny_config(split_fractions=(0.7, 0.2, 0.1 + 1e-7)), num_devices=1)


def test_config_file_and_its_variants():
  spec = importlib.util.spec_from_file_location("image_folder_config", ROOT / "configs" / "image_folder.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("train_per_class=1000,split_fractions=0.8x0.1x0.1,class_names=normal+covid,"
                        "minority_class=covid")
  assert (c.dataset, c.manual_dir, c.train_per_class) == ("image_folder", "", 1000)
  assert c.split_fractions == (0.8, 0.1, 0.1) and c.class_names == ("normal", "covid")
  config_lib.validate_config(c, num_devices=1)
  with pytest.raises(ValueError, match=r"split_fractions='0\.8xa': expected floats joined by x"):
    module.get_config("split_fractions=0.8xa")
  for change, message in ((dict(minority_class="sick"), r"minority_class='sick' is not one of config\.class_"),
                          (dict(class_names=("a", "a")), r"class_names \('a', 'a'\) names a class twice"),
                          (dict(train_per_class=-1), r"train_per_class must be >= 0")):
    bad = module.get_config("class_names=normal+covid")
    bad.update(change)
    with pytest.raises(ValueError, match=message):
      config_lib.validate_config(bad, num_devices=1)


# ---------------------------------------------------------------- training-set protocols


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
  """A 3-class folder (train 14 / 14 / 21), built once: (data_dir, manual_dir)."""
  tmp = tmp_path_factory.mktemp("protocols")
  manual = make_flat(tmp / "manual", {"healthy": 20, "pneumonia": 20, "COVID-19": 30})
  build(tmp / "tfds", manual)
  return str(tmp / "tfds"), str(manual)


def pipeline(folder_data, **fields):
  data_dir, manual = folder_data
  config = config_lib.base_config()
  config.update(dict(dataset="image_folder", data_dir=data_dir, manual_dir=manual, lung_mask=False,
                     image_size=16, batch_size=4, eval_batch_size=4, **fields))
  return input_pipeline.create_dataset(config, process_index=0, process_count=1, local_device_count=1)


def test_imbalance_protocol_thins_the_named_minority_class(folder_data):
  names = ("COVID-19", "healthy", "pneumonia")
  full = pipeline(folder_data)
  assert full.info.class_names == names
  np.testing.assert_array_equal(full.info.class_counts, [21, 14, 14])
  # Default: the class named covid (case and punctuation ignored).
  np.testing.assert_array_equal(pipeline(folder_data, covid_fraction=0.5).info.class_counts, [10, 14, 14])
  thinned = pipeline(folder_data, covid_fraction=0.5, minority_class="pneumonia")
  np.testing.assert_array_equal(thinned.info.class_counts, [21, 14, 7])
  assert thinned.info.num_train == 42 and thinned.info.num_eval == full.info.num_eval
  with pytest.raises(ValueError, match=r"config\.minority_class='sick' is not one of the classes \['COVID-19', "):
    pipeline(folder_data, covid_fraction=0.5, minority_class="sick")


def test_no_covid_class_needs_a_minority_class():
  with pytest.raises(ValueError, match=r"covid_fraction=0.5 .* none of the classes \['a', 'b'\] is named covid; "
                                       r"set --config\.minority_class"):
    input_pipeline.training_subset(np.array([0, 1, 1, 0]), ("a", "b"), per_class=0, fraction=0.5,
                                   minority=input_pipeline.minority_class("", ("a", "b"), None), seed=0)
  # Existing builders keep their COVID class; the full set needs no minority class at all.
  assert input_pipeline.minority_class("", ("normal", "pneumonia", "covid19"), 2) == 2
  np.testing.assert_array_equal(input_pipeline.training_subset(
      np.array([0, 1, 1, 0]), ("a", "b"), per_class=0, fraction=1.0, minority=None, seed=0), np.arange(4))


def test_train_per_class_keeps_a_seeded_subset_of_each_class(folder_data):
  kept = pipeline(folder_data, train_per_class=5)
  np.testing.assert_array_equal(kept.info.class_counts, [5, 5, 5])        # k_n follow the kept set
  assert kept.info.num_train == 15 and kept.info.steps_per_epoch == 3
  assert kept.info.num_eval == pipeline(folder_data).info.num_eval        # validation, test unchanged
  ids = kept.example_ids("train")
  assert ids == pipeline(folder_data, train_per_class=5).example_ids("train")
  assert set(ids) != set(pipeline(folder_data, train_per_class=5, seed=1).example_ids("train"))
  assert set(ids) < set(pipeline(folder_data).example_ids("train"))
  # First per class, then the minority class thinned: 5, 5 and round(0.4 * 5) COVID.
  both = pipeline(folder_data, train_per_class=5, covid_fraction=0.4)
  np.testing.assert_array_equal(both.info.class_counts, [2, 5, 5])
  assert set(both.example_ids("train")) < set(ids)
  with pytest.raises(ValueError, match=r"train_per_class=15 exceeds the training examples of class "
                                       r"healthy \(14\), pneumonia \(14\); lower it to at most 14"):
    pipeline(folder_data, train_per_class=15)


# ---------------------------------------------------------------- end to end


def test_trains_and_reports_on_a_folder(tmp_path):
  manual = make_flat(tmp_path / "manual", {"covid": 12, "normal": 16}, ext=".jpg")
  c = tiny_config(dataset="image_folder", manual_dir=str(manual), data_dir=str(tmp_path / "tfds"),
                  lung_mask=False, batch_size=8, eval_batch_size=8, num_train_steps=2,
                  checkpoint_every_steps=2, gradcam_per_class=1, **{"model.dsn": False})
  train.train_and_evaluate(c, str(tmp_path / "work"))
  metrics = json.loads((tmp_path / "work" / "report" / "test" / "metrics.json").read_text())
  assert metrics["num_examples"] == 6   # round(0.2 * 12) + round(0.2 * 16) test slices
