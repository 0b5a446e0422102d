"""duplicates.json: identical slices planted across splits are found, warned about, removed from eval by
config.dedup, kept in one sars_cov2_ct fold; the file is written atomically and added to older builds."""

import json
import logging
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dsn_saal_jax import config_lib
from dsn_saal_jax.data import builders, input_pipeline
from dsn_saal_jax.data.builders import duplicates, sars_cov2_ct, synthetic_ct
from test_data_builders import (_build, _examples, _fold_of, _slice, _write_image, make_covid19_ct, make_diag,
                                make_sars)

tfds.disable_progress_bar()

# covid19_ct's fake data (test_data_builders) with copies planted: (split, id) groups of identical slices.
IMAGES = "Images-processed"
PLANTED = {  # copy -> original, both as (folder, name) under Images-processed
    ("CT_COVID", "c2.png"): ("CT_COVID", "c0.png"),        # within train
    ("CT_COVID", "c4.png"): ("CT_COVID", "c0.png"),        # train -> test
    ("CT_COVID", "c3.png"): ("CT_COVID", "c1.png"),        # train -> validation
    ("CT_NonCOVID", "6.jpg"): ("CT_NonCOVID", "1.jpg"),    # train -> test
    ("CT_NonCOVID", "5.jpg"): ("CT_NonCOVID", "4.jpg"),    # validation -> test
    ("CT_COVID", "c5.png"): ("CT_NonCOVID", "n3.png"),     # train -> test, labelled otherwise
}
EXPECTED_GROUPS = {
    frozenset({("train", "CT_COVID/c0.png"), ("train", "CT_COVID/c2.png"), ("test", "CT_COVID/c4.png")}),
    frozenset({("train", "CT_COVID/c1.png"), ("validation", "CT_COVID/c3.png")}),
    frozenset({("train", "CT_NonCOVID/1.jpg"), ("test", "CT_NonCOVID/6.jpg")}),
    frozenset({("validation", "CT_NonCOVID/4.jpg"), ("test", "CT_NonCOVID/5.jpg")}),
    frozenset({("train", "CT_NonCOVID/n3.png"), ("test", "CT_COVID/c5.png")}),
}
# test keeps c6 (a brightened c0: near, not exact) and c7 (unique).
REMOVED = {"validation": ["CT_COVID/c3.png"],
           "test": ["CT_COVID/c4.png", "CT_COVID/c5.png", "CT_NonCOVID/5.jpg", "CT_NonCOVID/6.jpg"]}


def make_covid19_ct_with_copies(root):
  make_covid19_ct(root)
  images = root / IMAGES
  for (folder, name), (src_folder, src_name) in PLANTED.items():
    shutil.copy(images / src_folder / src_name, images / folder / name)
  brighter = np.clip(_slice(1).astype(int) + 2, 0, 255).astype(np.uint8)  # c0's pixels, re-windowed
  Image.fromarray(brighter).save(images / "CT_COVID" / "c6.png")
  Image.fromarray(_slice(99)).save(images / "CT_COVID" / "c7.png")
  lst = root / "Data-split" / "COVID" / "testCT_COVID.txt"
  lst.write_text(lst.read_text() + "\nc6.png\nc7.png")
  return root


@pytest.fixture(scope="module")
def covid(tmp_path_factory):
  """(builder, manual dir, data_dir) of covid19_ct with the planted copies, built once."""
  tmp = tmp_path_factory.mktemp("covid")
  manual = make_covid19_ct_with_copies(tmp / "manual")
  return _build(builders.Covid19Ct, tmp / "tfds", manual), manual, tmp / "tfds"


def _report(builder):
  return json.loads(duplicates.report_path(builder).read_text())


def _group_sets(part):
  return {frozenset((m["split"], m["id"]) for m in g["members"]) for g in part["groups"]}


def test_planted_copies_are_grouped_with_their_splits_and_labels(covid):
  builder, _, _ = covid
  report = _report(builder)
  assert report["splits"] == {"train": 6, "validation": 2, "test": 6}
  exact = report["exact"]
  assert _group_sets(exact) == EXPECTED_GROUPS
  assert exact["cross_split"] == {
      "train/validation": {"groups": 1, "examples": {"train": 1, "validation": 1}},
      "train/test": {"groups": 3, "examples": {"train": 4, "test": 3}},
      "validation/test": {"groups": 1, "examples": {"validation": 1, "test": 1}},
  }
  assert exact["within_split"] == {"train": {"groups": 1, "examples": 2}}
  assert all(g["cross_split"] for g in exact["groups"])
  conflicts = [g for g in exact["groups"] if g["label_conflict"]]
  assert exact["label_conflicts"] == 1 and len(conflicts) == 1
  assert {(m["id"], m["label"]) for m in conflicts[0]["members"]} == {
      ("CT_NonCOVID/n3.png", "non_covid"), ("CT_COVID/c5.png", "covid")}
  # `index` is the position in the stored split, which the input pipeline reads by.
  stored = {s: [ex["id"].decode() for ex in _examples(builder, s)] for s in report["splits"]}
  for g in exact["groups"]:
    for m in g["members"]:
      assert stored[m["split"]][m["index"]] == m["id"]
  # Near: the brightened c0 joins c0's exact copies, in a group of its own kind.
  assert _group_sets(report["near"]) == {
      frozenset({("train", "CT_COVID/c0.png"), ("train", "CT_COVID/c2.png"), ("test", "CT_COVID/c4.png"),
                 ("test", "CT_COVID/c6.png")})}


def test_cross_split_copies_are_warned_per_pair_of_splits(covid, caplog):
  builder, manual, _ = covid
  with caplog.at_level(logging.INFO):
    builders.prepare(builder, str(manual))  # already built: loads the report and warns again
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  train_test = [w for w in warnings if "cross train and test" in w]
  assert len(train_test) == 1
  assert "3 group(s) of identical slices" in train_test[0] and "4 in train, 3 in test" in train_test[0]
  assert "train:CT_COVID/c0.png = train:CT_COVID/c2.png = test:CT_COVID/c4.png" in train_test[0]
  assert str(duplicates.report_path(builder)) in train_test[0]
  assert any("cross validation and test" in w and "validation:CT_NonCOVID/4.jpg = test:CT_NonCOVID/5.jpg" in w
             for w in warnings)
  assert any("cross train and validation" in w for w in warnings)
  assert any("1 group(s) of identical slices carry different labels" in w and "CT_COVID/c5.png (covid)" in w
             for w in warnings)
  assert not any("near-identical" in w for w in warnings)  # near groups are information, not warnings
  near = [r.getMessage() for r in caplog.records if "near-identical" in r.getMessage()]
  assert len(near) == 1 and "1 group(s) of near-identical slices cross splits (1 train-test;" in near[0]
  assert "e.g. train:CT_COVID/c0.png = test:CT_COVID/c4.png (+2)." in near[0]  # a pair of each group, no more


def _config(data_dir, manual, **overrides):
  c = ml_collections.ConfigDict(dict(
      dataset="covid19_ct", data_dir=str(data_dir), manual_dir=str(manual), image_size=16, channels=1,
      covid_fraction=1.0, fold=0, seed=0, batch_size=2, eval_batch_size=4, lung_mask=False, dedup=False))
  c.update(overrides)
  return c


def _evaluated_ids(ds, split):
  ids = ds.example_ids(split)
  seen = []
  for batch in ds.eval_iter(split):
    seen.extend(ids[i] for i in batch["index"].reshape(-1) if i >= 0)
  return seen


def test_dedup_removes_copies_from_validation_and_test_only(covid, caplog):
  _, manual, data_dir = covid
  plain = input_pipeline.create_dataset(_config(data_dir, manual), process_index=0, process_count=1,
                                        local_device_count=1)
  with caplog.at_level(logging.WARNING):
    dedup = input_pipeline.create_dataset(_config(data_dir, manual, dedup=True), process_index=0,
                                          process_count=1, local_device_count=1)
  # Training is untouched.
  assert dedup.example_ids("train") == plain.example_ids("train")
  assert dedup.info.num_train == plain.info.num_train == 6
  np.testing.assert_array_equal(dedup.info.class_counts, plain.info.class_counts)
  # Eval splits lose exactly the copies, and count (and yield) what they evaluate.
  assert plain.info.num_eval == {"validation": 2, "test": 6} and plain.info.duplicates_removed == {
      "validation": 0, "test": 0}
  assert dedup.info.duplicates_removed == {"validation": 1, "test": 4}
  assert dedup.info.num_eval == {"validation": 1, "test": 2}
  for split, removed in REMOVED.items():
    kept = dedup.example_ids(split)
    assert sorted(set(plain.example_ids(split)) - set(kept)) == removed
    assert sorted(_evaluated_ids(dedup, split)) == sorted(kept)
    assert len(kept) == dedup.info.num_eval[split]
  assert set(dedup.example_ids("test")) == {"CT_COVID/c6.png", "CT_COVID/c7.png"}  # near copies stay
  logged = " ".join(r.getMessage() for r in caplog.records if "config.dedup" in r.getMessage())
  assert "test (test) evaluates 2 of 6 examples; 4 are copies" in logged and "CT_COVID/c4.png" in logged
  assert "validation (validation) evaluates 1 of 2 examples" in logged


def test_dedup_that_empties_a_split_names_it(tmp_path):
  manual = make_covid19_ct(tmp_path / "manual")
  images = manual / IMAGES
  shutil.copy(images / "CT_COVID" / "c0.png", images / "CT_COVID" / "c3.png")   # all of validation
  shutil.copy(images / "CT_NonCOVID" / "1.jpg", images / "CT_NonCOVID" / "4.jpg")
  with pytest.raises(ValueError, match=r"dedup removes all 2 examples of validation .*duplicates\.json"):
    input_pipeline.create_dataset(_config(tmp_path / "tfds", manual, dedup=True), process_index=0,
                                  process_count=1, local_device_count=1)


def test_copies_to_remove_never_touches_training_and_keeps_the_earlier_eval_split():
  group = lambda *members: {"splits": sorted({s for s, _ in members}), "members": [
      {"split": s, "index": i, "id": f"{s}{i}"} for s, i in members]}
  report = {"exact": {"groups": [group(("train", 0), ("train", 1), ("test", 3)),
                                 group(("validation", 0), ("test", 1), ("test", 0)),
                                 group(("test", 2), ("test", 5))]}}
  removed = duplicates.copies_to_remove(report, ["train"], ["validation", "test"])
  assert {s: [m["index"] for m in ms] for s, ms in removed.items()} == {"validation": [], "test": [0, 1, 3]}
  # A fold held out as test, the others training.
  report = {"exact": {"groups": [group(("fold0", 0), ("fold3", 2), ("fold3", 4))]}}
  removed = duplicates.copies_to_remove(report, ["fold0", "fold1", "fold2", "fold4"], ["fold3"])
  assert [m["index"] for m in removed["fold3"]] == [2, 4]


def test_build_without_report_gets_one_and_stale_or_partial_files_are_replaced(tmp_path, monkeypatch):
  config = synthetic_ct.make_config(scale=0.01, image_size=32)
  builder = synthetic_ct.SyntheticCt(data_dir=str(tmp_path), config=config)
  builders.prepare(builder, None)
  path = duplicates.report_path(builder)
  first = path.read_text()
  report = json.loads(first)
  assert report["splits"] == {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")}
  assert report["dataset"] == builder.info.full_name
  # A complete build from before this check (no duplicates.json) gets it on first use.
  path.unlink()
  again = synthetic_ct.SyntheticCt(data_dir=str(tmp_path), config=config)
  assert again.is_prepared()
  builders.prepare(again, None)
  assert path.read_text() == first
  # A truncated file (a non-atomic writer killed) or one of another build is recomputed.
  for stale in (first[: len(first) // 2], json.dumps({**report, "splits": {"train": 1}})):
    path.write_text(stale)
    builders.prepare(again, None)
    assert path.read_text() == first
  # Killed between writing and renaming: no duplicates.json at all, never a partial one, no litter.
  path.unlink()
  monkeypatch.setattr(type(path), "replace", lambda self, target: (_ for _ in ()).throw(KeyboardInterrupt))
  with pytest.raises(KeyboardInterrupt):
    builders.prepare(again, None)
  assert not path.exists() and not list(path.parent.glob("duplicates.json*"))
  monkeypatch.undo()
  builders.prepare(again, None)
  assert path.read_text() == first


def test_covid19_diag_dicom_copies_cross_cases_classes_and_splits(tmp_path):
  """make_diag copies one DICOM file into every odd case of every class: one group, all flags."""
  manual, _ = make_diag(tmp_path / "manual")
  builder = _build(builders.Covid19Diag, tmp_path / "tfds", manual)
  groups = _report(builder)["exact"]["groups"]
  dicom = [g for g in groups if any(m["id"].endswith("IM0001") for m in g["members"])]
  assert len(dicom) == 1
  ids = {m["id"] for m in dicom[0]["members"]}
  assert ids == {ex["id"].decode() for s in ("train", "test") for ex in _examples(builder, s)
                 if ex["id"].decode().endswith(("IM0001", "IM0002.dcm"))}
  assert dicom[0]["cross_split"] and dicom[0]["label_conflict"] and dicom[0]["splits"] == ["train", "test"]


def test_image_folder_copies_are_found_and_removed_like_any_builder(tmp_path, caplog):
  """Users' own folders (explicit split folders here) get the same check, warning and config.dedup."""
  manual = tmp_path / "manual"
  for k, (split, n) in enumerate((("train", 4), ("val", 2), ("test", 2))):
    for c, name in enumerate(("covid", "normal")):
      for i in range(n):
        _write_image(manual / split / name / f"{i:02d}.png", 100 * k + 10 * c + i, size=(16, 16))
  shutil.copy(manual / "train" / "covid" / "00.png", manual / "test" / "normal" / "leak.png")
  shutil.copy(manual / "train" / "normal" / "01.png", manual / "val" / "normal" / "again.png")
  config = config_lib.base_config()
  config.update(dict(dataset="image_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                     lung_mask=False, image_size=16, batch_size=2, eval_batch_size=2, dedup=True))
  with caplog.at_level(logging.WARNING):
    ds = input_pipeline.create_dataset(config, process_index=0, process_count=1, local_device_count=1)
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert "cross train and test" in logged and "test:test/normal/leak.png" in logged
  assert "carry different labels" in logged
  assert ds.info.duplicates_removed == {"validation": 1, "test": 1}
  assert ds.info.num_eval == {"validation": 4, "test": 4} and ds.info.num_train == 8
  assert "test/normal/leak.png" not in ds.example_ids("test")
  assert "val/normal/again.png" not in ds.example_ids("validation")


# ---------------------------------------------------------------- sars_cov2_ct folds

def test_sars_identical_slices_share_a_fold(tmp_path):
  manual = make_sars(tmp_path / "manual")
  covid, non = manual / "COVID", manual / "non-COVID"
  for i in range(4):   # a slice published five times
    shutil.copy(covid / "Covid (0).png", covid / f"copy {i}.png")
  (covid / "sub").mkdir()
  shutil.copy(covid / "Covid (5).png", covid / "sub" / "again.png")   # in a sub-folder
  shutil.copy(non / "Non-Covid (3).png", covid / "relabelled.png")   # a labelling conflict
  builder = _build(builders.SarsCov2Ct, tmp_path / "tfds", manual)
  assert str(builder.version) == "1.1.0"
  fold = _fold_of(builder)
  assert len(fold) == 12 + 11 + 4 + 1 + 1
  assert len({fold[f"COVID/copy {i}.png"] for i in range(4)} | {fold["COVID/Covid (0).png"]}) == 1
  assert fold["COVID/sub/again.png"] == fold["COVID/Covid (5).png"]
  assert fold["COVID/relabelled.png"] == fold["non-COVID/Non-Covid (3).png"]
  assert _report(builder)["exact"]["cross_split"] == {}       # no copy in two folds
  assert len(_report(builder)["exact"]["groups"]) == 3
  for prefix, n in (("COVID/", 18), ("non-COVID/", 11)):     # still stratified, up to the largest group
    sizes = np.bincount([k for key, k in fold.items() if key.startswith(prefix)], minlength=5)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 5, sizes
  # The lung-masked config deals the same folds (hashes are taken before the mask).
  masked = _build(builders.SarsCov2Ct, tmp_path / "tfds", manual, config="lung_mask")
  assert _fold_of(masked) == fold


def test_assign_folds_groups_are_units_stratified_and_order_free():
  names = [[f"c{i}" for i in range(23)], [f"n{i}" for i in range(17)]]
  hashes = {f"c{i}": f"h{i % 9}" for i in range(23)} | {"n0": "h3", "n1": "x", "n2": "x"}
  folds = sars_cov2_ct.assign_folds(names, hashes)
  fold_of = {n: f for per_class in folds for n, f in per_class.items()}
  assert sorted(fold_of) == sorted(names[0] + names[1])
  for h in set(hashes.values()):
    assert len({fold_of[n] for n, g in hashes.items() if g == h}) == 1, h
  for label, per_class in enumerate(folds):
    sizes = np.bincount(list(per_class.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 3, (label, sizes)   # the largest group has 3 of a class
  shuffled = [n[::-1] for n in names]
  assert sars_cov2_ct.assign_folds(shuffled, dict(reversed(hashes.items()))) == folds
  # Without duplicates, version 1.0.0's round-robin deal: rank r of the seeded permutation -> fold r % 5.
  plain = sars_cov2_ct.assign_folds(names)
  for label, per_class in enumerate(plain):
    order = np.random.default_rng([sars_cov2_ct.FOLD_SEED, label]).permutation(len(names[label]))
    ordered = sorted(names[label])
    assert per_class == {ordered[i]: rank % 5 for rank, i in enumerate(order)}
  assert sars_cov2_ct.assign_folds(names, {}) == plain


def _blob(shape, centre, radii, value):
  """A black slice with one bright ellipse: what the lung mask left of some COVID19-CT slices (a vertebra)."""
  y, x = np.mgrid[: shape[0], : shape[1]]
  inside = ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1
  return np.where(inside, value, 0).astype(np.uint8)


def test_near_groups_hold_copies_and_no_two_different_slices():
  """Generated slices group only with their JPEG, resized, brightened or re-windowed copies, found whatever their
  difference hash (format 2 kept ~1 in 4 JPEG copies of these); the nearly empty slices a failed lung mask leaves
  (one blob each, 3 false groups of COVID19-CT's lung_mask build in format 2) are no copies of one another."""
  import io  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from dsn_saal_jax.data import ct, phantom  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  def jpeg(image):
    data = io.BytesIO()
    Image.fromarray(image).save(data, "JPEG", quality=75)
    return np.asarray(Image.open(data))

  members = [(f"s{i}", str(i % 3), ct.preprocess_hu(phantom.chest_slice(np.random.default_rng([0, 0, i]), 64,
                                                                         i % 3)[0])) for i in range(300)]
  original = members[0][2]
  copies = [("brighter", "0", np.clip(original.astype(int) + 2, 0, 255)), ("rewindowed", "0", original * 0.8 + 10),
            ("resized", "0", np.asarray(Image.fromarray(original).resize((48, 48)).resize((64, 64)))),
            *[(f"jpeg{i}", label, jpeg(image)) for i, (_, label, image) in enumerate(members[:12])]]
  members += [(name, label, image.astype(np.uint8)) for name, label, image in copies]
  blobs = [_blob((96, 128), (80 + dy, 64 + dx), (5 + k % 3, 7 - k % 2), 150 + 20 * k)
           for k, (dy, dx) in enumerate([(0, 0), (2, -3), (-3, 2), (1, 4), (-2, -2)])]
  members += [(f"blob{k}", "0", image) for k, image in enumerate(blobs)]
  records = [{"split": "train" if k % 2 else "test", "index": k, "id": name, "label": label,
              "exact": duplicates.slice_hash(image[:, :, None]),
              "thumbnail": duplicates.thumbnail(image[:, :, None])}
             for k, (name, label, image) in enumerate(members)]
  report = duplicates._group_report(records, "near", ["train", "test"])  # pylint: disable=protected-access
  expected = {frozenset({"s0", "jpeg0", "brighter", "rewindowed", "resized"})} | {
      frozenset({f"s{i}", f"jpeg{i}"}) for i in range(1, 12)}
  assert {frozenset(m["id"] for m in g["members"]) for g in report["groups"]} == expected
  assert report["label_conflicts"] == 0
  # near_pairs finds every pair within the limit that comparing all pairs finds.
  thumbs = np.stack([r["thumbnail"] for r in records]).reshape(len(records), -1)
  distance = np.abs(thumbs[:, None] - thumbs[None]).mean(-1)
  close = {(i, j) for i, j in zip(*np.nonzero(distance <= duplicates.NEAR_MAX_DIFFERENCE)) if i < j}
  pairs, found = duplicates.near_pairs(thumbs.reshape(-1, duplicates.THUMBNAIL, duplicates.THUMBNAIL))
  assert len(close) >= 15 and {tuple(p) for p in pairs.tolist()} == close
  np.testing.assert_allclose(found, distance[pairs[:, 0], pairs[:, 1]], rtol=1e-5)
