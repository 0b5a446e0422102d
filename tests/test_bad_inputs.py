"""Bad or unusual inputs to evaluate --data, predict and train (issue 27, items 3, 4, 6, 7): clear answers.

Every launch runs in one process (launch_batch.py) against one untrained
tiny checkpoint (the answers do not depend on its weights) and its own folder;
each asserts the exit status, the message, and that every file that existed
under the data folder and the workdir before is byte-identical after (links
included, as links).
"""

import csv
import hashlib
import json
import os
import shutil
from concurrent import futures
from types import SimpleNamespace

import jax
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import launch_batch
from conftest import init_variables
from dsn_saal_jax import checkpointing, config_lib, convert, models, predict
from dsn_saal_jax.data import ct, folders, input_pipeline
from dsn_saal_jax.data.builders.common import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT_SMALL = get_testdata_file("CT_small.dcm")
pytestmark = pytest.mark.skipif(CT_SMALL is None, reason="pydicom's test files are not installed")
CLASSES = ("covid19", "normal")
TINY = dict(image_size=32, backbone="vgg16_bn_tiny", batch_size=8, eval_batch_size=8)


def png(path, seed=0, shape=(40, 40)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, np.uint8)).save(path)


def dicom(path, **tags):
  """CT_small.dcm with `tags` set (None deletes one)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  ds = pydicom.dcmread(CT_SMALL)
  for key, value in tags.items():
    if value is None:
      delattr(ds, key)
    else:
      setattr(ds, key, value)
  ds.save_as(path)


def labeled(root, per_class=3):
  """<root>/<class>/s<k>.png, `per_class` slices each."""
  for c, name in enumerate(CLASSES):
    for k in range(per_class):
      png(root / name / f"s{k}.png", seed=10 * c + k)
  return root


def snapshot(*roots):
  """{path: sha256 of a file, or '-> target' of a link} of everything under `roots`, links not followed."""
  found = {}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      for name in dirnames + filenames:
        path = os.path.join(dirpath, name)
        if os.path.islink(path):
          found[path] = "-> " + os.readlink(path)
        elif os.path.isfile(path):
          with open(path, "rb") as f:
            found[path] = hashlib.sha256(f.read()).hexdigest()
  return found


def assert_untouched(before, *roots):
  after = snapshot(*roots)
  changed = [p for p, digest in before.items() if after.get(p) != digest]
  assert not changed, changed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """An untrained tiny checkpoint as an image_folder run on 1-channel 32 px slices saves one (latest only)."""
  workdir = tmp_path_factory.mktemp("run") / "work"
  config = config_lib.base_config()
  config.dataset, config.lung_mask, config.model.dsn, config.loss = "image_folder", False, False, "ce"
  for k, v in TINY.items():
    config[k] = v
  info = SimpleNamespace(class_names=CLASSES, image_shape=(32, 32, 1),
                         normalization=input_pipeline.normalization_for(config))
  variables = init_variables(models.create_model(config, len(CLASSES)), (1, 32, 32, 1), train=False)
  ckpt = checkpointing.Checkpoints(str(workdir), checkpointing.model_fingerprint(config, len(CLASSES)),
                                   inference=checkpointing.inference_spec(config, info))
  ckpt.save(1, jax.device_get(dict(variables)))
  ckpt.wait()
  ckpt.close()
  return workdir


# ----------------------------------------------------------------------------- the launches
# Folders: `fine` holds what must be counted right and evaluate with exit status 0, `refused` what each tool
# must refuse by name, per row; training folders hold one fault each.


def make_fine(root):
  """Issue rows 3 and 7: a link to the parent folder, a stray README, a 32x96 image; 7 slices to evaluate."""
  labeled(root)
  os.symlink("..", root / "covid19" / "up")
  (root / "normal" / "README").write_text("Slices exported 2024-01-02.\n")
  png(root / "covid19" / "wide.png", shape=(32, 96))


def make_refused(root):
  """Issue rows 4 and 7: an MR slice, a CT without rescale (extension-less), an empty file, an 8x8 image."""
  labeled(root)
  dicom(root / "covid19" / "mr.dcm", Modality="MR")
  dicom(root / "normal" / "IM0001", RescaleSlope=None, RescaleIntercept=None)
  (root / "normal" / "empty.png").write_bytes(b"")
  png(root / "covid19" / "thumb.png", shape=(8, 8))


def make_mr(root):
  labeled(root)
  dicom(root / "covid19" / "mr.dcm", Modality="MR")


def make_tiny(root):
  labeled(root)
  png(root / "covid19" / "thumb.png", shape=(8, 8))


def make_one_class(root):
  labeled(root)
  shutil.rmtree(root / "normal")


def train_args(root, tmp, **overrides):
  fields = {**TINY, "manual_dir": root, "data_dir": tmp / "tfds", "num_train_steps": 1, **overrides}
  flag = lambda v: f"({', '.join(map(str, v))})" if isinstance(v, tuple) else v
  return ["--config=" + os.path.join(REPO, "configs", "image_folder.py"), f"--workdir={tmp / 'work'}",
          "--config.channels=1", *[f"--config.{k}={flag(v)}" for k, v in fields.items()]]


def foreign_backbone(path):
  """What launch/pretrain.py writes for a ResNet-50 (its record; the arrays are never reached)."""
  path.mkdir(parents=True)
  (path / convert.PRETRAIN_META).write_text(json.dumps({"backbone": "resnet50", "in_channels": 1}))
  return path


# name: (script, folder maker, train overrides; a callable value is given the data folder)
LAUNCHES = {
    "evaluate_fine": ("evaluate", make_fine, None), "predict_fine": ("predict", make_fine, None),
    "evaluate_refused": ("evaluate", make_refused, None), "predict_refused": ("predict", make_refused, None),
    "evaluate_one_class": ("evaluate", make_one_class, None),
    "train_batch_too_large": ("train", labeled, {"batch_size": 64}),
    "train_too_few_cases": ("train", lambda root: labeled(root, per_class=2), {}),
    "train_fractions": ("train", labeled, {"split_fractions": (0.5, 0.1, 0.1)}),
    "train_mr": ("train", make_mr, {}), "train_tiny": ("train", make_tiny, {}),
    "train_foreign_init": ("train", labeled,
                           {"batch_size": 2, "init_checkpoint": lambda root: foreign_backbone(root.parent / "ssl")}),
}
FINE = ["covid19/up: a link to the folder", "not followed, so no slice is counted twice",
        "wide.png: a 32x96 image is resized to a square input"]
# Issue 27's rows: (launch, exit status, what its output says, {file: what its CSV row's error says}).
ROWS = {
    "3_parent_link_evaluate": ("evaluate_fine", 0, ["7 evaluated, 0 unreadable, 1 skipped", FINE[0], FINE[1]], {}),
    "3_parent_link_predict": ("predict_fine", 0, ["7 predicted, 0 failed", FINE[0], FINE[1]], {}),
    "4_mr_evaluate": ("evaluate_refused", 1, ["6 evaluated, 4 unreadable"], {"mr.dcm": "Modality MR, not CT"}),
    "4_mr_predict": ("predict_refused", 1, ["6 predicted, 4 failed"], {"mr.dcm": "Modality MR, not CT"}),
    "4_mr_train": ("train_mr", 2, ["Error: ", "mr.dcm: Modality MR, not CT"], {}),
    "4_no_rescale_evaluate": ("evaluate_refused", 1, [], {"IM0001": "CT slice without a usable rescale"}),
    "4_no_rescale_predict": ("predict_refused", 1, [], {"IM0001": "CT slice without a usable rescale"}),
    "6_batch_too_large": ("train_batch_too_large", 2, ["Error: batch_size 64 exceeds the 2 training examples; "
                                                       "lower config.batch_size"], {}),
    "6_too_few_cases": ("train_too_few_cases", 2, ["Error: Class covid19 has 2 case(s), fewer than the 3 splits",
                                                   "--config.split_fractions='(0.8, 0, 0.2)'"], {}),
    "6_fractions": ("train_fractions", 2, ["Error: config.split_fractions=(0.5, 0.1, 0.1) must be", "sum to 0.7"],
                    {}),
    "7_one_class": ("evaluate_one_class", 2, ["has no folder for the classes ['normal']. Add them, or evaluate on "
                                              "the classes present with a class map (evaluate.py "
                                              "--class_map=covid19:covid19)"], {}),
    "7_empty_evaluate": ("evaluate_refused", 1, [], {"empty.png": "empty file (0 bytes)"}),
    "7_empty_predict": ("predict_refused", 1, [], {"empty.png": "empty file (0 bytes)"}),
    "7_readme_evaluate": ("evaluate_fine", 0, ["1 skipped (not images)"], {"README": "not an image or DICOM file"}),
    "7_readme_predict": ("predict_fine", 0, ["Skipping 1 files", "README"], {}),
    "7_tiny_evaluate": ("evaluate_refused", 1, [], {"thumb.png": "a 8x8 image, smaller than 16 px on a side"}),
    "7_tiny_predict": ("predict_refused", 1, [], {"thumb.png": "a 8x8 image, smaller than 16 px on a side"}),
    "7_tiny_train": ("train_tiny", 2, ["Error: ", "thumb.png: a 8x8 image, smaller than 16 px on a side"], {}),
    "7_wide_evaluate": ("evaluate_fine", 0, [FINE[2]], {}),
    "7_wide_predict": ("predict_fine", 0, [FINE[2]], {}),
    "init_foreign_backbone": ("train_foreign_init", 2, ["ssl holds a backbone pretrained for another model "
                                                        "(backbone: checkpoint 'resnet50' vs config 'vgg16_bn_tiny')"], {}),
    "7_quiet_build": ("train_batch_too_large", 2, ["Using custom data configuration: image_folder/original_"], {}),
}


def launch_all(workdir, tmp):
  """Every launch's folder, then all launches in one process: {name: (result, data folder, output, snapshot)}."""
  invocations, made = [], {}
  for name, (script, make, overrides) in LAUNCHES.items():
    root, out = tmp / name / "data", tmp / name / ("out.csv" if script == "predict" else "out")
    make(root)
    if script == "evaluate":
      args = ["evaluate.py", f"--workdir={workdir}", "--checkpoint=latest", f"--data={root}", f"--out={out}"]
    elif script == "predict":
      args = ["predict.py", f"--workdir={workdir}", "--checkpoint=latest", f"--output={out}", root]
    else:
      overrides = {k: v(root) if callable(v) else v for k, v in overrides.items()}
      args = ["train.py", *train_args(root, tmp / name, **overrides)]
    invocations.append(args)
    made[name] = root, out
  before = snapshot(tmp, workdir)
  results = launch_batch.run(invocations, tmp)
  return {name: (result, *made[name], before) for name, result in zip(LAUNCHES, results)}


@pytest.fixture(scope="module")
def launched_started(workdir, tmp_path_factory):
  """launch_all's future: the launch process runs in a background thread while the in-process tests run."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(launch_all, workdir, tmp_path_factory.mktemp("launches"))


@pytest.fixture(scope="module")
def launched(launched_started):
  return launched_started.result()


# ----------------------------------------------------------------------------- in process, while the launches run


def test_one_rule_counts_each_file_once_under_its_own_class(launched_started, tmp_path):
  del launched_started  # requested only to start the launches first
  root = labeled(tmp_path / "data")
  outside = labeled(tmp_path / "elsewhere")
  os.symlink("..", root / "covid19" / "up")                          # back into the tree: not followed
  os.symlink(root / "normal" / "s0.png", root / "covid19" / "n0.png")  # a file of another class: counted there
  os.symlink(outside / "normal", root / "normal" / "more")           # a case folder on another disk: followed
  os.symlink(outside / "normal", root / "normal" / "again")          # the same folder again: not followed
  os.symlink(outside / "covid19" / "s0.png", root / "covid19" / "x.png")  # a file on another disk: counted
  os.symlink(outside / "covid19" / "s0.png", root / "covid19" / "y.png")  # the same file again: not counted
  scanned = folders.scan(root)
  assert sorted((s.id, CLASSES[s.label]) for s in scanned.slices) == sorted(
      [(f"covid19/s{k}.png", "covid19") for k in range(3)] + [("covid19/x.png", "covid19")]
      + [(f"normal/s{k}.png", "normal") for k in range(3)] + [(f"normal/again/s{k}.png", "normal") for k in range(3)])
  assert len({s.case for s in scanned.slices}) == 8  # again/ is one case; each loose slice its own
  files, problems = predict.find_inputs([str(root)])
  assert sorted(os.path.relpath(f, root) for f in files) == sorted(s.id for s in scanned.slices)
  assert not problems
  # The same outside files under two classes: which label is right is not guessed.
  os.symlink(outside / "normal", root / "covid19" / "also")
  with pytest.raises(DatasetError, match=r"data/normal/again and .*data/covid19 lead to the same files \(.*elsewhere/"
                                         r"normal\) from two class or split folders"):
    folders.scan(root)
  os.unlink(root / "covid19" / "also")
  os.symlink(outside / "covid19" / "s0.png", root / "normal" / "z.png")
  with pytest.raises(DatasetError, match=r"normal/z.png and .*covid19/x.png lead to the same files"):
    folders.scan(root)


def test_dicom_that_is_not_ct_or_has_no_rescale_is_refused(launched_started, tmp_path):
  del launched_started  # as above
  cases = {"mr.dcm": (dict(Modality="MR"), "Modality MR, not CT"),
           "nomod.dcm": (dict(Modality=None), "no Modality tag, not CT"),
           "slope.dcm": (dict(RescaleSlope=0), "without a usable rescale"),
           "type.dcm": (dict(RescaleType="OD"), "RescaleType OD"),
           "noslope.dcm": (dict(RescaleSlope=None), "without a usable rescale")}
  for name, (tags, message) in cases.items():
    dicom(tmp_path / name, **tags)
    with pytest.raises(ct.CTReadError, match=message):
      ct.read_dicom_hu(tmp_path / name)
  (tmp_path / "zero.dcm").write_bytes(b"")
  with pytest.raises(ct.CTReadError, match=r"zero.dcm: empty file \(0 bytes\)"):
    ct.read_dicom_hu(tmp_path / "zero.dcm")


# ----------------------------------------------------------------------------- the launcher rows


@pytest.mark.parametrize("row", ROWS)
def test_issue_27_row(row, launched, workdir):
  launch, status, messages, csv_errors = ROWS[row]
  proc, root, out, before = launched[launch]
  output = proc.stdout + proc.stderr
  assert proc.returncode == status, output[-4000:]
  assert "Traceback" not in output, output[-4000:]
  for message in messages:
    assert message in output, (message, output[-4000:])
  if status == 2:
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: "), proc.stderr[-2000:]
  if csv_errors:
    with open(out / "predictions.csv" if out.is_dir() else out, newline="") as f:
      errors = {os.path.basename(r["path"]): r["error"] for r in csv.DictReader(f)}
    for name, message in csv_errors.items():
      assert errors[name].startswith(str(root)) and message in errors[name], errors
  if row == "7_quiet_build":  # one short line (TFDS logs the config it is given), nothing of TFDS on stdout
    assert not proc.stdout.strip() and max(len(line) for line in proc.stderr.splitlines()) < 400, proc.stderr
  assert_untouched({p: d for p, d in before.items() if p.startswith((str(root), str(workdir)))}, root, workdir)
