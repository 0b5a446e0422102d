"""`launch/evaluate.py --data=FOLDER`: a checkpoint measured on a labeled folder from its spec alone.

A tiny synthetic_ct run is trained once in this process; a folder of its
kinds of slices (PNG, one DICOM, and unreadable files) is planted under other
folder names, mapped with --class_map. Its report must hold predict.py's
probabilities and scikit-learn's metrics of them. On the real COVID19-CT
(when present) a tiny run's --data report on its own official test split must
equal its training report.
"""

import csv
import json
import os
import shutil
from concurrent import futures

import numpy as np
import pytest
from etils import epath
from PIL import Image
from sklearn import metrics as skm

import launch_batch
from test_predict import CT_SMALL, write_dicom

from dsn_saal_jax import config_lib, folder_eval, metrics, predict, train
from dsn_saal_jax.data import ct, phantom
from dsn_saal_jax.data.builders import covid19_ct
from dsn_saal_jax.data.builders.common import DatasetError

CLASSES = phantom.CLASS_NAMES  # normal, bacterial_pneumonia, covid19
FOLDERS = ("Healthy", "Bacterial", "Covid")  # another hospital's names for them
CLASS_MAP = ",".join(f"{f}:{c}" for f, c in zip(FOLDERS, CLASSES))
# Synthetic run's config: CPU size, trained until its outputs differ by slice (a VGG shape of its own:
# vgg16_bn_tiny's outputs still differ by < 1e-3 after these 24 steps).
TINY = {"image_size": 32, "model.widths": (8, 8, 16, 16, 16), "model.hidden": 32, "batch_size": 8,
        "eval_batch_size": 8, "num_train_steps": 24, "log_every_steps": 24, "learning_rate": 0.05,
        "gradcam_per_class": 1, "synthetic_scale": 0.01, "synthetic_image_size": 32}
UNREADABLE = {"Covid/broken.png": "neither a readable image", "Healthy/deep.png": "more than 8 bits per pixel"}


def configure(config, overrides):
  """`config` with `overrides` set; a dotted key ('model.widths') sets a nested field."""
  for k, v in overrides.items():
    *parents, leaf = k.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = v
  return config


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def strict(constant):
  raise ValueError(f"{constant} is not JSON")


def probs_of(row):
  return [float(row[f"prob_{c}"]) for c in CLASSES]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("synthetic")
  config = configure(config_lib.base_config(), {**TINY, "data_dir": str(tmp / "tfds")})
  train.train_and_evaluate(config, str(tmp / "work"))
  return tmp / "work"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 PNG slices per class folder, one DICOM, and files that cannot be evaluated."""
  if CT_SMALL is None:
    pytest.skip("pydicom's test files are not installed (CT_small.dcm is the planted DICOM's header)")
  root = tmp_path_factory.mktemp("hospital") / "hospital_b"
  for label, name in enumerate(FOLDERS):
    for k in range(3):
      (root / name / f"case{k}").mkdir(parents=True)
      hu = phantom.chest_slice(np.random.default_rng(10 * label + k), 40, label)[0]
      Image.fromarray(ct.window(hu)).save(root / name / f"case{k}" / "slice.png")
  write_dicom(root / "Covid" / "scan.dcm", phantom.chest_slice(np.random.default_rng(99), 40, phantom.COVID)[0])
  (root / "Covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  Image.fromarray(np.full((40, 40), 300, np.uint16)).save(root / "Healthy" / "deep.png")
  (root / "Healthy" / "notes.txt").write_text("not a slice")
  return root


def run_launches(workdir, folder, tmp):
  """The launches of the tests below, one after another in one process (JAX imported once): {name: result}.

  report: evaluate.py on the planted folder, its report in the default place; report_again: the same rerun,
  which replaces its own report; predict: predict.py on the same folder; bad_class_map: evaluate.py with a class
  map that does not fit the run; absent_class: evaluate.py on a folder without one class.
  """
  for name in ("Healthy", "Covid"):
    shutil.copytree(folder / name, tmp / "two_classes" / name)
  report = ["evaluate.py", f"--workdir={workdir}", f"--data={folder}", f"--class_map={CLASS_MAP}", "--batch_size=4",
            "--gradcam_per_class=2"]
  invocations = {
      "report": report,
      "report_again": report,
      "predict": ["predict.py", f"--workdir={workdir}", f"--output={tmp / 'predict.csv'}", str(folder)],
      "bad_class_map": ["evaluate.py", f"--workdir={workdir}", f"--data={folder}",
                        "--class_map=Healthy:normal,Covid:covid"],
      "absent_class": ["evaluate.py", f"--workdir={workdir}", f"--data={tmp / 'two_classes'}",
                       f"--out={tmp / 'two_classes_report'}", "--class_map=Healthy:normal,Covid:covid19",
                       "--gradcam_per_class=1"]}
  results = dict(zip(invocations, launch_batch.run(list(invocations.values()), tmp)))
  results["predict"].output = tmp / "predict.csv"
  results["absent_class"].output = tmp / "two_classes_report"
  return results


@pytest.fixture(scope="module")
def launched_started(workdir, folder, tmp_path_factory):
  """run_launches' future: the launch process runs in a background thread, alongside the in-process tests
  placed first (the official-split run, the split folders), as both are mostly single-threaded on 2 cores."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(run_launches, workdir, folder, tmp_path_factory.mktemp("launch"))


@pytest.fixture(scope="module")
def launched(launched_started):
  return launched_started.result()


# ----------------------------------------------------------------------------- the real COVID19-CT
# In-process tests come first: they run while the launches do.


def test_data_report_on_the_official_test_split_equals_the_training_report(covid19_ct_dir, covid19_ct_tfds,
                                                                           launched_started, tmp_path):
  del launched_started  # requested only to start the launches first: they run alongside this run
  # The official test files as <class>/<file> symlinks (only under tmp_path).
  lists = covid19_ct.read_split_lists(epath.Path(covid19_ct_dir))
  for label, name in lists["test"]:
    target = tmp_path / "test_split" / covid19_ct.CLASS_NAMES[label] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(os.path.join(covid19_ct_dir, "Images-processed", covid19_ct.IMAGE_DIRS[label], name))
  config = config_lib.paper_config("covid19_ct", channels=3, lung_mask=False, arg="baseline,ce")
  configure(config, dict(TINY, data_dir=covid19_ct_tfds, manual_dir=covid19_ct_dir, batch_size=16,
                         eval_batch_size=32, num_train_steps=6, learning_rate=0.01))
  train.train_and_evaluate(config, str(tmp_path / "work"))
  trained = json.loads((tmp_path / "work" / "report" / "test" / "metrics.json").read_text())

  predictor = predict.Predictor.from_workdir(str(tmp_path / "work"), trained["checkpoint"], batch_size=32)
  result = folder_eval.evaluate_folder(predictor, str(tmp_path / "test_split"), str(tmp_path / "report"),
                                       gradcam_per_class=1)
  data = json.loads((tmp_path / "report" / "metrics.json").read_text())
  assert data == json.loads(json.dumps(result))  # what it returns is what it wrote
  assert (data["num_examples"], data["num_unreadable"]) == (len(lists["test"]), 0)
  assert data["checkpoint_dir"].endswith(f"/{trained['checkpoint']}/{trained['checkpoint_step']}")
  for key in ("num_examples", "confusion_matrix", "class_names", "backbone", "model", "num_params"):
    assert data[key] == trained[key], key
  for key in ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "g_mean", "auc"):
    assert data[key] == pytest.approx(trained[key], abs=1e-9), key
  for name, values in trained["per_class"].items():
    assert data["per_class"][name] == pytest.approx(values, abs=1e-9), name


def test_split_picks_one_split_folder(folder, launched_started, predictor, tmp_path):
  """{train,test}/<class>/... : every slice by default, only test/'s with split='test'."""
  del launched_started  # as above
  root = tmp_path / "hospital_c"
  for path in folder.glob("*/case*/slice.png"):
    case = path.parent
    split = "test" if case.name == "case0" else "train"
    (root / split / case.parent.name / case.name).mkdir(parents=True)
    (root / split / case.parent.name / case.name / path.name).symlink_to(path)
  (root / "train" / "Covid" / "notes.txt").write_text("skipped, but in train/")
  out = folder_eval.default_out_dir(str(tmp_path / "work"), str(root), "best", "test")
  assert out == str(tmp_path / "work" / "report" / "data_hospital_c_test_best")
  result = folder_eval.evaluate_folder(predictor, str(root), out, class_map=folder_eval.parse_class_map(CLASS_MAP),
                                       split="test", gradcam_per_class=1)
  assert (result["num_examples"], result["split"], result["num_skipped"]) == (3, "test", 0)
  ids = [r["id"] for r in read_csv(os.path.join(out, "predictions.csv"))]
  assert ids == ["test/Bacterial/case0/slice.png", "test/Covid/case0/slice.png", "test/Healthy/case0/slice.png"]
  with pytest.raises(DatasetError, match=r"hospital_c has no val split folder \(it has \['test', 'train'\]\)"):
    folder_eval.evaluate_folder(predictor, str(root), out, class_map=folder_eval.parse_class_map(CLASS_MAP),
                                split="val")


# ----------------------------------------------------------------------------- what the launches wrote


@pytest.fixture(scope="module")
def report(workdir, launched):
  """The launcher's report on the planted folder, in its default place."""
  for name in ("report", "report_again"):  # the rerun replaces the report the first run wrote
    proc = launched[name]
    assert proc.returncode == 1, proc.stderr[-4000:]  # as predict.py: some files could not be read
    assert "Traceback" not in proc.stderr and "10 evaluated, 2 unreadable, 1 skipped" in proc.stdout
    summary = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1], parse_constant=strict)
    assert set(summary) == set(metrics.SUMMARY_KEYS)
  return workdir / "report" / "data_hospital_b_best"


def test_report_holds_predicts_probabilities_and_sklearns_metrics(workdir, folder, report, launched):
  assert sorted(os.listdir(report)) == ["confusion_matrix.png", "gradcam.png", "manifest.json", "metrics.json",
                                        "predictions.csv", "roc.png"]
  assert sorted(os.listdir(workdir / "report")) == ["data_hospital_b_best", "test"]  # no temporary folder left
  rows = {r["id"]: r for r in read_csv(report / "predictions.csv")}
  assert list(next(iter(rows.values()))) == ["id", "true_class", "path", "prediction", *[f"prob_{c}" for c in CLASSES],
                                             "error"]
  good = {i: r for i, r in rows.items() if not r["error"]}
  assert len(good) == 10 and good["Covid/scan.dcm"]["prediction"]

  proc = launched["predict"]
  out = proc.output
  assert proc.returncode == 1, proc.stderr[-4000:]
  predicted = {r["path"]: r for r in read_csv(out)}
  for r in good.values():
    np.testing.assert_allclose(probs_of(r), probs_of(predicted[r["path"]]), atol=1e-6)
    assert r["prediction"] == predicted[r["path"]]["prediction"]
    assert r["true_class"] == CLASSES[FOLDERS.index(r["id"].split("/")[0])]

  y = np.array([CLASSES.index(r["true_class"]) for r in good.values()])
  p = np.array([probs_of(predicted[r["path"]]) for r in good.values()])
  assert np.ptp(p, axis=0).max() > 1e-3  # the slices get different outputs: the comparisons are not vacuous
  m = json.loads((report / "metrics.json").read_text())
  assert m["num_examples"] == len(good) and m["class_names"] == list(CLASSES)
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)), abs=1e-9)
  assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro", zero_division=0), abs=1e-9)
  assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-6)
  assert m["confusion_matrix"] == skm.confusion_matrix(y, p.argmax(1), labels=[0, 1, 2]).tolist()
  assert (m["checkpoint"], m["split"], m["class_map"]) == ("best", "all", dict(zip(FOLDERS, CLASSES)))
  assert m["checkpoint_dir"] == str(workdir / "best" / str(m["checkpoint_step"]))


def test_unreadable_files_are_rows_with_their_reason_and_counted(folder, report):
  rows = {r["id"]: r for r in read_csv(report / "predictions.csv")}
  m = json.loads((report / "metrics.json").read_text())
  assert (m["num_unreadable"], m["num_skipped"]) == (2, 1)
  assert set(m["unreadable"]) == set(UNREADABLE)
  for file, reason in UNREADABLE.items():
    row = rows[file]
    assert row["prediction"] == "" and row["prob_covid19"] == "" and row["true_class"] == CLASSES[
        FOLDERS.index(file.split("/")[0])]
    assert row["error"].startswith(str(folder / file)) and reason in row["error"], row
    assert m["unreadable"][file] == row["error"]
  notes = rows["Healthy/notes.txt"]
  assert notes["prediction"] == "" and "not an image or DICOM file" in notes["error"]


@pytest.fixture(scope="module")
def predictor(workdir):
  return predict.Predictor.from_workdir(str(workdir), "best")


def test_class_maps_that_do_not_fit_the_run_are_refused_by_name(workdir, folder, predictor, launched, tmp_path):
  proc = launched["bad_class_map"]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("Error: Class map") and str(folder) in error
  assert "folders ['Bacterial'] are not mapped" in error
  assert "classes ['covid'] are not among the run's classes ['normal', 'bacterial_pneumonia', 'covid19']" in error
  assert not [n for n in os.listdir(workdir / "report") if n.startswith(".")]  # no temporary folder left

  with pytest.raises(DatasetError, match=r"Class folders \['Bacterial', 'Covid', 'Healthy'\] in .*hospital_b are "
                                         r"not among the classes \['normal', 'bacterial_pneumonia', 'covid19'\]"):
    folder_eval.evaluate_folder(predictor, str(folder), str(tmp_path / "out"))  # no map: names must match
  with pytest.raises(ValueError, match="Class map entry 'Covid' is not FOLDER:CLASS"):
    folder_eval.parse_class_map("Healthy:normal,Covid")
  with pytest.raises(DatasetError, match=r"--split=test needs split folders .* Drop --split"):
    folder_eval.evaluate_folder(predictor, str(folder), str(tmp_path / "out"),
                                class_map=folder_eval.parse_class_map(CLASS_MAP), split="test")
  assert not (tmp_path / "out").exists()


def test_a_class_absent_from_the_folder_is_named_and_left_out_of_the_macro_values(launched):
  proc = launched["absent_class"]
  assert proc.returncode == 1, proc.stderr[-4000:]  # Healthy/deep.png and Covid/broken.png are unreadable
  summary = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1], parse_constant=strict)  # no NaN: valid JSON
  text = (proc.output / "metrics.json").read_text()
  m = json.loads(text, parse_constant=strict)
  assert m["absent_classes"] == ["bacterial_pneumonia"] and "No examples of bacterial_pneumonia" in proc.stderr
  rows = [r for r in read_csv(proc.output / "predictions.csv") if r["prediction"]]
  y = np.array([CLASSES.index(r["true_class"]) for r in rows])
  pred = np.array([CLASSES.index(r["prediction"]) for r in rows])
  assert set(y) == {0, 2}
  assert m["macro_sensitivity"] == pytest.approx(skm.recall_score(y, pred, labels=[0, 2], average="macro"))
  assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=[0, 2], average="macro", zero_division=0))
  assert summary["macro_sensitivity"] == pytest.approx(m["macro_sensitivity"])
  assert m["per_class"]["bacterial_pneumonia"]["sensitivity"] is None
