"""Every TFDS builder on small fake data made here, and the errors for bad manual data."""

import shutil
import zipfile
from collections import Counter

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pydicom.data import get_testdata_file

from dsn_saal_jax.data import builders, ct, phantom
from dsn_saal_jax.data.builders import covid19_diag, sars_cov2_ct, synthetic_ct
from dsn_saal_jax.data.builders.common import DatasetError

tfds.disable_progress_bar()


def _slice(seed: int, size=(40, 48), label: int = phantom.NORMAL) -> np.ndarray:
  """A windowed phantom slice (uint8, H x W), so that the lung mask has lungs to find."""
  hu, _ = phantom.chest_slice(np.random.default_rng(seed), max(size), label)
  return ct.window(hu)[: size[0], : size[1]]


def _write_image(path, seed: int, mode: str = "L", size=(40, 48)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(_slice(seed, size)).convert(mode).save(path)


def _build(cls, data_dir, manual_dir, config="original"):
  builder = cls(data_dir=str(data_dir), config=config)
  builders.prepare(builder, str(manual_dir))
  return builder


def _examples(builder, split):
  return list(builder.as_data_source(split))


def _ids(builder, split):
  return {ex["id"].decode(): ex for ex in _examples(builder, split)}


# ---------------------------------------------------------------- covid19_ct

COVID19_CT_SPLITS = {  # split -> (COVID names, NonCOVID names); as upstream, jpg + png
    "train": (["c0.png", "c1.png", "c2.png"], ["1.jpg", "2.jpg", "n3.png"]),
    "val": (["c3.png"], ["4.jpg"]),
    "test": (["c4.png", "c5.png"], ["5.jpg", "6.jpg"]),
}


def make_covid19_ct(root, zipped=False):
  """The upstream layout; NonCOVID lists with CRLF and no final newline, like the real ones."""
  images = root / "Images-processed"
  seed = 0
  for split, (covid, non_covid) in COVID19_CT_SPLITS.items():
    for folder, names, list_dir in (("CT_COVID", covid, "COVID"), ("CT_NonCOVID", non_covid, "NonCOVID")):
      for name in names:
        seed += 1
        mode = "RGB" if name.endswith(".jpg") else ("RGBA" if seed % 2 else "L")
        _write_image(images / folder / name, seed, mode=mode)
      sep = "\r\n" if list_dir == "NonCOVID" else "\n"
      lst = root / "Data-split" / list_dir / f"{split}CT_{list_dir}.txt"
      lst.parent.mkdir(parents=True, exist_ok=True)
      lst.write_text(sep.join(names))
  if zipped:  # The repository ships the two image folders as zips.
    for folder in ("CT_COVID", "CT_NonCOVID"):
      with zipfile.ZipFile(images / f"{folder}.zip", "w") as zf:
        for f in sorted((images / folder).iterdir()):
          zf.write(f, f"{folder}/{f.name}")
      shutil.rmtree(images / folder)
  return root


@pytest.mark.parametrize("zipped", [False, True])
def test_covid19_ct_splits_labels_and_pixels(tmp_path, zipped):
  manual = make_covid19_ct(tmp_path / "manual", zipped)
  builder = _build(builders.Covid19Ct, tmp_path / "tfds", manual)
  assert builder.info.features["label"].names == ["non_covid", "covid"]
  for split, (covid, non_covid) in COVID19_CT_SPLITS.items():
    tfds_split = {"val": "validation"}.get(split, split)
    got = _ids(builder, tfds_split)
    assert set(got) == {f"CT_COVID/{n}" for n in covid} | {f"CT_NonCOVID/{n}" for n in non_covid}
    for key, ex in got.items():
      assert ex["label"] == (1 if key.startswith("CT_COVID/") else 0), key
      assert ex["image"].shape == (40, 48, 1) and ex["image"].dtype == np.uint8
  # RGB(A) screenshots are stored as their (identical-channel) grayscale, losslessly for PNG.
  ex = _ids(builder, "train")["CT_COVID/c0.png"]
  np.testing.assert_array_equal(ex["image"][:, :, 0], _slice(1))


def test_covid19_ct_lung_mask_config(tmp_path):
  manual = make_covid19_ct(tmp_path / "manual")
  builder = _build(builders.Covid19Ct, tmp_path / "tfds", manual, config="lung_mask")
  image = _ids(builder, "train")["CT_COVID/c0.png"]["image"][:, :, 0]
  np.testing.assert_array_equal(image, ct.apply_lung_mask(_slice(1)))
  assert (image == 0).mean() > 0.3


def _assert_failed_build_left_nothing(builder, data_dir):
  assert not builder.is_prepared()
  assert not list(data_dir.rglob("dataset_info.json"))
  assert not list(data_dir.rglob("*.array_record*"))   # no data files, complete or partial
  assert not builder.data_path.exists()
  # A fresh builder (a later run) does not see a finished dataset either.
  assert not type(builder)(data_dir=str(data_dir), config=builder.builder_config).is_prepared()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_manual_dir(tmp_path, kind):
  manual = tmp_path / "manual"
  if kind == "empty":
    manual.mkdir()
  builder = builders.Covid19Ct(data_dir=str(tmp_path / "tfds"), config="original")
  state = "is empty" if kind == "empty" else "does not exist"
  with pytest.raises(DatasetError, match=rf"(?s)directory \S*manual {state}.*config.manual_dir"
                                         r".*Images-processed/CT_COVID"):
    builders.prepare(builder, str(manual))
  _assert_failed_build_left_nothing(builder, tmp_path / "tfds")


def test_listed_file_absent_names_file_and_fix(tmp_path):
  manual = make_covid19_ct(tmp_path / "manual")
  (manual / "Images-processed" / "CT_NonCOVID" / "4.jpg").unlink()
  builder = builders.Covid19Ct(data_dir=str(tmp_path / "tfds"), config="original")
  with pytest.raises(DatasetError, match=r"(?s)CT_NonCOVID/4\.jpg \(listed for validation\).*delete their lines"):
    builders.prepare(builder, str(manual))
  _assert_failed_build_left_nothing(builder, tmp_path / "tfds")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_fails_atomically_then_rebuilds(tmp_path, damage):
  manual = make_covid19_ct(tmp_path / "manual")
  victim = manual / "Images-processed" / "CT_COVID" / "c5.png"  # in the last split written
  good = victim.read_bytes()
  victim.write_bytes(b"not an image" if damage == "garbage" else good[: len(good) // 2])
  data_dir = tmp_path / "tfds"
  builder = builders.Covid19Ct(data_dir=str(data_dir), config="original")
  with pytest.raises(DatasetError, match=r"c5\.png: cannot decode image.*re-download or re-extract"):
    builders.prepare(builder, str(manual))
  _assert_failed_build_left_nothing(builder, data_dir)
  victim.write_bytes(good)
  rebuilt = _build(builders.Covid19Ct, data_dir, manual)
  assert rebuilt.info.splits["test"].num_examples == 4


def test_covid19_ct_unknown_class_folder(tmp_path):
  manual = make_covid19_ct(tmp_path / "manual")
  _write_image(manual / "Images-processed" / "CT_Pneumonia" / "p.png", 0)
  with pytest.raises(DatasetError, match=r"Unknown class folder .*CT_Pneumonia.*CT_COVID, CT_NonCOVID"):
    builders.prepare(builders.Covid19Ct(data_dir=str(tmp_path / "tfds")), str(manual))


def test_covid19_ct_corrupt_zip(tmp_path):
  manual = make_covid19_ct(tmp_path / "manual", zipped=True)
  archive = manual / "Images-processed" / "CT_COVID.zip"
  archive.write_bytes(archive.read_bytes()[:100])
  with pytest.raises(DatasetError, match=r"CT_COVID\.zip: not a valid zip"):
    builders.prepare(builders.Covid19Ct(data_dir=str(tmp_path / "tfds")), str(manual))


# ---------------------------------------------------------------- sars_cov2_ct

def make_sars(root, n_covid=12, n_non=11):
  for i in range(n_covid):
    _write_image(root / "COVID" / f"Covid ({i}).png", i)
  for i in range(n_non):
    _write_image(root / "non-COVID" / f"Non-Covid ({i}).png", 100 + i)
  return root


def _fold_of(builder):
  return {key: k for k in range(5) for key in _ids(builder, f"fold{k}")}


def test_sars_cov2_ct_folds_partition_and_are_stable(tmp_path):
  manual = make_sars(tmp_path / "manual")
  builder = _build(builders.SarsCov2Ct, tmp_path / "a", manual)
  all_files = {p.relative_to(manual).as_posix() for p in manual.rglob("*.png")}
  per_fold = [list(_ids(builder, f"fold{k}")) for k in range(5)]
  assert sum(len(f) for f in per_fold) == len(all_files)        # nobody twice
  assert set().union(*per_fold) == all_files                     # nobody missing
  for label, prefix in ((1, "COVID/"), (0, "non-COVID/")):     # stratified
    sizes = [sum(k.startswith(prefix) for k in f) for f in per_fold]
    assert max(sizes) - min(sizes) <= 1, sizes
    for k in range(5):
      assert all(ex["label"] == label for key, ex in _ids(builder, f"fold{k}").items()
                 if key.startswith(prefix))
  # Another run (fresh data_dir) assigns every file to the same fold, whatever the listing order.
  again = _build(builders.SarsCov2Ct, tmp_path / "b", manual)
  assert _fold_of(again) == _fold_of(builder)
  names = [sorted(all_files)[:12], sorted(all_files)[12:]]
  assert sars_cov2_ct.assign_folds(names) == sars_cov2_ct.assign_folds([n[::-1] for n in names])


def test_sars_cov2_ct_unknown_class_folder(tmp_path):
  manual = make_sars(tmp_path / "manual", 3, 3)
  _write_image(manual / "pneumonia" / "x.png", 0)
  with pytest.raises(DatasetError, match=r"Unknown class folder .*pneumonia.*COVID, non-COVID"):
    builders.prepare(builders.SarsCov2Ct(data_dir=str(tmp_path / "tfds")), str(manual))


# ---------------------------------------------------------------- covidx_ct

COVIDX = {  # split -> [(filename, class, box)]
    "train": [("a.png", 0, (2, 3, 30, 35)), ("b.png", 2, (0, 0, 48, 40)), ("c.png", 1, (5, 5, 20, 25))],
    "val": [("d.png", 2, (1, 1, 40, 30))],
    "test": [("e.png", 0, (10, 4, 44, 39)), ("f.png", 1, (3, 2, 33, 22))],
}


def make_covidx(root):
  for i, (split, items) in enumerate(COVIDX.items()):
    lines = []
    for j, (name, label, box) in enumerate(items):
      _write_image(root / "2A_images" / name, 10 * i + j)
      lines.append(f"{name} {label} {' '.join(map(str, box))}")
    (root / f"{split}_COVIDx_CT-2A.txt").write_text("\n".join(lines) + "\n")
  return root


def test_covidx_ct_labels_and_crops(tmp_path):
  manual = make_covidx(tmp_path / "manual")
  builder = _build(builders.CovidxCt, tmp_path / "tfds", manual)
  assert builder.info.features["label"].names == ["normal", "pneumonia", "covid19"]
  for split, items in COVIDX.items():
    got = _ids(builder, {"val": "validation"}.get(split, split))
    assert set(got) == {name for name, _, _ in items}
    for name, label, (x0, y0, x1, y1) in items:
      assert got[name]["label"] == label
      assert got[name]["image"].shape == (y1 - y0, x1 - x0, 1)
  seed = 0  # a.png: train item 0
  np.testing.assert_array_equal(_ids(builder, "train")["a.png"]["image"][:, :, 0],
                                _slice(seed)[3:35, 2:30])


def test_covidx_ct_bad_class_names_file_and_line(tmp_path):
  manual = make_covidx(tmp_path / "manual")
  (manual / "val_COVIDx_CT-2A.txt").write_text("d.png 2 1 1 40 30\nd.png 7 1 1 40 30\n")
  with pytest.raises(DatasetError, match=r"val_COVIDx_CT-2A\.txt:2: unknown class 7"):
    builders.prepare(builders.CovidxCt(data_dir=str(tmp_path / "tfds")), str(manual))


def test_covidx_ct_missing_image(tmp_path):
  manual = make_covidx(tmp_path / "manual")
  (manual / "2A_images" / "e.png").unlink()
  with pytest.raises(DatasetError, match=r"test_COVIDx_CT-2A\.txt are absent .*e\.png"):
    builders.prepare(builders.CovidxCt(data_dir=str(tmp_path / "tfds")), str(manual))


# ---------------------------------------------------------------- covid19_diag

def make_diag(root):
  """Alias class-folder names; DICOM cases (from pydicom's CT_small) and PNG cases."""
  dicom = get_testdata_file("CT_small.dcm")
  cases = {"Normal": 6, "Bacterial": 4, "COVID-19": 5}
  for c, (folder, n) in enumerate(cases.items()):
    for i in range(n):
      case = root / folder / f"patient{c}{i:02d}"
      case.mkdir(parents=True)
      if i % 2:
        shutil.copy(dicom, case / "IM0001")        # extension-less DICOM, as scanners export
        shutil.copy(dicom, case / "IM0002.dcm")
      else:
        _write_image(case / "s1.png", 10 * c + i)
        _write_image(case / "s2.png", 10 * c + i + 5)
  return root, cases


def test_covid19_diag_case_level_split(tmp_path):
  if get_testdata_file("CT_small.dcm") is None:
    pytest.skip("pydicom's bundled CT_small.dcm is not installed")
  manual, cases = make_diag(tmp_path / "manual")
  builder = _build(builders.Covid19Diag, tmp_path / "tfds", manual)
  assert builder.info.features["label"].names == ["normal", "bacterial_pneumonia", "covid19"]
  train, test = _examples(builder, "train"), _examples(builder, "test")
  train_cases = {ex["case"].decode() for ex in train}
  test_cases = {ex["case"].decode() for ex in test}
  assert not train_cases & test_cases                      # no case on both sides
  assert len(train) + len(test) == 2 * sum(cases.values())
  per_case = Counter(ex["case"].decode() for ex in train + test)
  assert set(per_case.values()) == {2}                     # each case whole, on one side
  for label, n in enumerate(cases.values()):
    in_test = {c for c in test_cases if c.startswith(covid19_diag.CLASS_NAMES[label] + "/")}
    assert len(in_test) == round(0.3 * n)
  expected_dicom = ct.preprocess_dicom(get_testdata_file("CT_small.dcm"))
  dicoms = [ex for ex in train + test if ex["id"].decode().endswith(("IM0001", ".dcm"))]
  assert dicoms
  for ex in dicoms:   # DICOM: HU -> window -> lung mask
    np.testing.assert_array_equal(ex["image"][:, :, 0], expected_dicom)
  # The split is a function of the case ids and the seed only.
  train_ids, test_ids = covid19_diag.split_cases([f"c{i}" for i in range(10)], seed=0, label=2)
  assert (train_ids, test_ids) == covid19_diag.split_cases([f"c{i}" for i in range(9, -1, -1)], 0, 2)
  assert len(test_ids) == 3 and not train_ids & test_ids


def test_covid19_diag_unknown_class_and_loose_file(tmp_path):
  manual = tmp_path / "manual"
  _write_image(manual / "normal" / "case1" / "a.png", 0)
  _write_image(manual / "viral_pneumonia" / "case2" / "a.png", 1)
  with pytest.raises(DatasetError, match=r"Unknown class folder .*viral_pneumonia.*bacterial_pneumonia, covid19, normal"):
    builders.prepare(builders.Covid19Diag(data_dir=str(tmp_path / "tfds")), str(manual))
  shutil.rmtree(manual / "viral_pneumonia")
  _write_image(manual / "covid19" / "loose.png", 2)
  with pytest.raises(DatasetError, match=r"loose\.png sits directly in a class folder"):
    builders.prepare(builders.Covid19Diag(data_dir=str(tmp_path / "tfds")), str(manual))


# ---------------------------------------------------------------- synthetic_ct

def test_synthetic_ct_counts_and_determinism(tmp_path):
  config = synthetic_ct.make_config(scale=0.01, image_size=32)
  builder = synthetic_ct.SyntheticCt(data_dir=str(tmp_path / "a"), config=config)
  builders.prepare(builder, None)
  assert builder.info.features["label"].names == ["normal", "bacterial_pneumonia", "covid19"]
  for split in ("train", "validation", "test"):
    labels = Counter(ex["label"] for ex in _examples(builder, split))
    assert tuple(labels[k] for k in range(3)) == synthetic_ct.split_counts(0.01, split)
  # 2674 : 980 : 1256 scaled, and 3/7 of it for each eval split.
  assert synthetic_ct.split_counts(0.01, "train") == (27, 10, 13)
  assert synthetic_ct.split_counts(0.1, "test") == (115, 42, 54)
  again = synthetic_ct.SyntheticCt(data_dir=str(tmp_path / "b"), config=config)
  builders.prepare(again, None)
  first, second = _ids(builder, "train"), _ids(again, "train")
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key]["image"], second[key]["image"])
  # Stored slices went through the lung mask: zero outside the lungs.
  image = first["train/000000"]["image"]
  assert image.shape == (32, 32, 1) and (image == 0).mean() > 0.4


@pytest.mark.parametrize("scale,size", [(0.1, 64), (0.03, 48)])
def test_make_builder_selects_synthetic_variant(tmp_path, scale, size):
  # (0.1, 64) is also the registered default config; custom ones get their own directory.
  config = ml_collections.ConfigDict(dict(dataset="synthetic_ct", data_dir=str(tmp_path),
                                          synthetic_scale=scale, synthetic_image_size=size))
  builder = builders.make_builder(config)
  assert builder.builder_config.scale == scale and builder.builder_config.image_size == size
  assert f"scale{scale:g}_px{size}_seed0" in str(builder.data_path)
  with pytest.raises(ValueError, match="Unknown dataset 'covid'"):
    builders.make_builder(ml_collections.ConfigDict(dict(dataset="covid")))
