"""Inference: predictions equal the run's evaluation, DICOM/PNG/JPEG inputs, bad inputs and checkpoints.

One tiny covid19_diag run (DICOM, extension-less DICOM, PNG gray/RGBA and
JPEG slices, lung mask on, eval_head=mean) is trained once in a subprocess
with launch/train.py; the tests then predict its source files.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from concurrent import futures

import jax
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import launch_batch
from dsn_saal_jax import checkpointing, config_lib, models, optim, runtime, steps as steps_lib, train
from dsn_saal_jax import predict as predict_lib
from dsn_saal_jax.data import ct, phantom

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT_SMALL = get_testdata_file("CT_small.dcm")
RTPLAN = get_testdata_file("rtplan.dcm")  # DICOM without pixel data.
pytestmark = pytest.mark.skipif(CT_SMALL is None or RTPLAN is None, reason="pydicom's test files are not installed")

# The run: covid19_diag's paper config shrunk to CPU size, trained until its outputs differ by slice.
OVERRIDES = {"image_size": 32, "model.widths": (8, 8, 16, 16, 16), "model.hidden": 32, "batch_size": 8,
             "eval_batch_size": 8, "num_train_steps": 24, "log_every_steps": 4, "learning_rate": 0.05,
             "loss_kwargs.saal.normalize_weights": True,
             "gradcam_per_class": 1, "eval_head": "mean"}
CLASS_FOLDERS = ("Normal", "Bacterial", "COVID-19")
SIZE = 48


def hu_slice(seed: int, label: int) -> np.ndarray:
  return phantom.chest_slice(np.random.default_rng(seed), SIZE, label)[0]


def write_dicom(path, hu: np.ndarray) -> None:
  """CT_small.dcm's header with the phantom's HU as pixel data (slope 1, intercept -1024)."""
  ds = pydicom.dcmread(CT_SMALL)
  ds.Rows, ds.Columns = hu.shape
  ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
  ds.save_as(path)


def write_image(path, hu: np.ndarray, mode: str) -> None:
  Image.fromarray(ct.window(hu)).convert(mode).save(path)


def make_manual_dir(root) -> None:
  """3 classes x 5 cases, each case one slice per format: DICOM, extension-less DICOM, PNG, JPEG."""
  for label, folder in enumerate(CLASS_FOLDERS):
    for case in range(5):
      case_dir = root / folder / f"case{case}"
      case_dir.mkdir(parents=True)
      hu = [hu_slice(100 * label + 10 * case + k, label) for k in range(4)]
      write_dicom(case_dir / "s0.dcm", hu[0])
      write_dicom(case_dir / "IM0001", hu[1])  # extension-less, as scanners export
      write_image(case_dir / "s2.png", hu[2], "RGBA" if case % 2 else "L")
      write_image(case_dir / "s3.jpg", hu[3], "RGB")


def run_script(script, args, tmp_path, timeout=1200):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))


def flag(value) -> str:
  return f"({', '.join(map(str, value))})" if isinstance(value, tuple) else str(value)


# ----------------------------------------------------------------------------- checkpoints of other kinds
# In-process and independent of the run: they come first, and run while it trains.


def tiny_config(widths=(8, 8, 8, 8, 8), **overrides):
  """A VGG16-BN 8 channels wide (`widths`: another shape, for a checkpoint of another model)."""
  c = config_lib.base_config()
  c.image_size, c.batch_size, c.eval_batch_size = 32, 8, 8
  c.model.widths, c.model.hidden = widths, 16
  for k, v in overrides.items():
    c[k] = v
  return c


def save_tiny(workdir, config, inference):
  """A checkpoint as train.py writes one (`inference` None: as written before specs existed)."""
  model = models.create_model(config, 3)
  optimizer = optim.make_optimizer(config, 1)
  state = steps_lib.create_train_state(config, model, (32, 32, 1), optimizer, jax.random.PRNGKey(0))
  ckpt = checkpointing.Checkpoints(str(workdir), checkpointing.model_fingerprint(config, 3), inference=inference)
  ckpt.save(1, jax.device_get(state))
  ckpt.wait()
  ckpt.close()
  return state


def test_checkpoint_without_spec_needs_the_config(run_started, tmp_path):
  del run_started  # requested only to start the run's training: it runs alongside these tests
  config = tiny_config(data_dir=str(tmp_path / "tfds"))
  state = save_tiny(tmp_path / "old", config, inference=None)
  with pytest.raises(predict_lib.CheckpointError, match="saved before checkpoints carried an inference spec.*"
                     "Retrain with this version, or pass the run's training config: --config="):
    predict_lib.Predictor.from_workdir(str(tmp_path / "old"), "latest")
  p = predict_lib.Predictor.from_workdir(str(tmp_path / "old"), "latest", config=config)
  assert p.class_names == ("normal", "bacterial_pneumonia", "covid19")
  np.testing.assert_array_equal(p.variables["params"]["fc8"]["kernel"], state.params["fc8"]["kernel"])
  x = p.preprocess(ct.window(hu_slice(0, 0))[:, :, None])
  assert x.shape == (32, 32, 1)
  with pytest.raises(predict_lib.CheckpointError, match=r"holds a different model than the config \(widths: "
                     r"checkpoint \[8, 8, 8, 8, 8\] vs config \[8, 8, 8, 8, 16\]\)"):
    predict_lib.Predictor.from_workdir(str(tmp_path / "old"), "latest", config=tiny_config(widths=(8, 8, 8, 8, 16)))


@pytest.mark.parametrize("dataset", ["synthetic_ct", "covid19_diag", "image_folder"])
def test_builders_that_mask_dicom_always_say_so_in_the_spec(run_started, dataset):
  """Their DICOM slices are lung-masked whatever config.lung_mask says; prediction must mask them too."""
  del run_started  # as above
  config = tiny_config()
  config.dataset, config.lung_mask = dataset, False
  info = type("Info", (), {"class_names": ("a", "b"), "image_shape": (32, 32, 1), "normalization": {}})
  assert checkpointing.inference_spec(config, info)["lung_mask"]["dicom"]


def test_checkpoint_of_another_model_or_kind_is_refused(run_started, tmp_path):
  del run_started  # as above
  config = tiny_config()
  info = type("Info", (), {"class_names": ("a", "b", "c"), "image_shape": (32, 32, 1), "normalization": {}})
  spec = checkpointing.inference_spec(config, info)
  # The spec describes another model than the weights (e.g. files copied between runs).
  save_tiny(tmp_path / "mixed", config, inference={**spec, "model": {**spec["model"], "model": "baseline"}})
  with pytest.raises(predict_lib.CheckpointError, match=r"/mixed/checkpoints/1: its weights do not fit the model "
                     r"it describes .*unexpected params/side1.*It is a checkpoint of another model"):
    predict_lib.Predictor.from_checkpoint(str(tmp_path / "mixed" / "checkpoints"))
  # launch/convert_torchvision.py's output is not a classifier.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "imagenet"), {"params": {"w": np.zeros(3)}})
  with pytest.raises(predict_lib.CheckpointError, match="imagenet is not a dsn_saal_jax training checkpoint"):
    predict_lib.Predictor.from_checkpoint(str(tmp_path / "imagenet"))
  with pytest.raises(predict_lib.CheckpointError, match="is a training workdir, not a checkpoint: pass --workdir="):
    predict_lib.Predictor.from_checkpoint(str(tmp_path / "mixed"))
  # A run on in-memory arrays (no normalization recorded) predicts model inputs, not files.
  save_tiny(tmp_path / "arrays", config, inference=spec)
  p = predict_lib.Predictor.from_workdir(str(tmp_path / "arrays"), "latest", batch_size=3)
  probs = p.predict_inputs(np.random.default_rng(0).normal(size=(5, 32, 32, 1)))
  assert probs.shape == (5, 3)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  with pytest.raises(predict_lib.CheckpointError, match="trained on in-memory arrays"):
    p.load(CT_SMALL)


# ----------------------------------------------------------------------------- the run


def train_run(tmp):
  """launch/train.py on the manual dir: (its result, workdir, manual dir, config overrides)."""
  manual, workdir = tmp / "manual", tmp / "work"
  make_manual_dir(manual)
  overrides = {**OVERRIDES, "manual_dir": str(manual), "data_dir": str(tmp / "tfds")}
  proc = run_script("train.py", ["--config=" + os.path.join(REPO, "configs", "covid19_diag.py"),
                                 f"--workdir={workdir}", *[f"--config.{k}={flag(v)}" for k, v in overrides.items()]],
                    tmp)
  return proc, workdir, manual, overrides


@pytest.fixture(scope="module")
def run_started(tmp_path_factory):
  """train_run's future: the training process runs in a background thread, alongside the in-process tests of
  checkpoints of other kinds, which come first and request it (both mostly single-threaded, 2 cores)."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(train_run, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def run(run_started):
  """(workdir, manual dir, config) of the trained run."""
  proc, workdir, manual, overrides = run_started.result()
  assert proc.returncode == 0, proc.stderr[-4000:]
  config = config_lib.paper_config("covid19_diag", channels=1, lung_mask=True, arg=None)
  for key, v in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = v
  return workdir, manual, config


@pytest.fixture(scope="module")
def evaluation(run):
  """The run's own test-split evaluation from its latest checkpoint: files, probabilities, model inputs."""
  workdir, manual, config = run
  r = train._Run(config, str(workdir), None)  # pylint: disable=protected-access
  state, _ = r.checkpoints.restore(jax.device_get(r.state), which="latest")
  pred = train.predict_split(r.p_eval_step, runtime.replicate(state), r.dataset, "test")
  ids = r.dataset.example_ids("test")
  inputs = {}
  for batch in r.dataset.eval_iter("test"):
    for x, i, m in zip(batch["image"].reshape(-1, *batch["image"].shape[2:]), batch["index"].reshape(-1),
                       batch["mask"].reshape(-1)):
      if m > 0:
        inputs[int(i)] = x
  r.checkpoints.close()
  files = [str(manual / i) for i in ids]
  return files, pred["probs"], np.stack([inputs[i] for i in range(len(ids))])


@pytest.fixture(scope="module")
def predictor(run):
  return predict_lib.Predictor.from_workdir(str(run[0]), "latest", batch_size=4)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_every_checkpoint_carries_the_inference_spec(run):
  folder = run[0] / "checkpoints"  # covid19_diag has no validation split, so no best/
  metas = [json.loads((folder / step / "meta" / "metadata").read_text())
           for step in os.listdir(folder) if step.isdigit()]
  assert len(metas) == 2  # keep_checkpoints=2
  for meta in metas:
    spec = meta["inference"]
    assert spec["class_names"] == ["normal", "bacterial_pneumonia", "covid19"]
    assert (spec["dataset"], spec["image_size"], spec["channels"], spec["eval_head"]) == ("covid19_diag", 32, 1, "mean")
    assert spec["lung_mask"] == {"dicom": True, "images": True}
    assert spec["normalization"]["mean"] == [pytest.approx(0.449)] and spec["normalization"]["scale"] == 255.0
    assert spec["model"] == {"backbone": "vgg16_bn", "model": "dsn", "widths": [8, 8, 16, 16, 16],
                             "stages": [2, 2, 3, 3, 3], "hidden": 32, "dropout_rate": 0.5, "fuse_channels": 1,
                             "loss": "saal", "compute_dtype": "float32"}
    assert meta["fingerprint"]["widths"] == [8, 8, 16, 16, 16]  # the fingerprint is still there


def test_predictions_equal_the_runs_evaluation(evaluation, launched_started, predictor):
  del launched_started  # requested only to start the launches: they run alongside this and the next tests
  files, probs, inputs = evaluation
  kinds = {os.path.splitext(f)[1] for f in files}
  assert kinds == {".dcm", "", ".png", ".jpg"}, kinds  # every format is among the test files
  assert predictor.eval_head == "mean"  # the run's head, from the spec
  # Decode + window + lung mask + resize + normalize as the TFDS pipeline fed the model...
  np.testing.assert_allclose(np.stack([predictor.load(f) for f in files]), inputs, atol=1e-6)
  # ... and the probabilities its evaluation computed.
  results = predictor.predict_files(files)
  assert [r.error for r in results] == [None] * len(files)
  np.testing.assert_allclose(np.stack([r.probs for r in results]), probs, atol=1e-5)
  # The model tells the slices apart by several times the 1e-5 compared to above: the test is not vacuous.
  # (This 24-step run's spread is ~1e-4: 7.7e-5 since the inputs are the uint8-rounded resize.)
  assert np.ptp(probs, axis=0).max() > 5e-5


def test_ct_small_and_a_mixed_folder(predictor, tmp_path):
  folder = tmp_path / "mixed"
  (folder / "sub").mkdir(parents=True)
  shutil.copy(CT_SMALL, folder / "ct_small.dcm")
  shutil.copy(CT_SMALL, folder / "sub" / "IM0001")  # extension-less DICOM is found by content
  write_image(folder / "a.png", hu_slice(1, phantom.COVID), "L")
  write_image(folder / "sub" / "b.jpg", hu_slice(2, phantom.NORMAL), "RGB")
  (folder / "notes.txt").write_text("not a slice")
  (folder / ".hidden.png").write_bytes(b"")
  files, problems = predict_lib.find_inputs([str(folder)])
  assert [os.path.relpath(f, folder) for f in files] == ["a.png", "ct_small.dcm", "sub/IM0001", "sub/b.jpg"]
  assert not problems
  results = predictor.predict_files(files)
  for r in results:
    assert r.error is None and r.label in predictor.class_names
    np.testing.assert_allclose(r.probs.sum(), 1.0, rtol=1e-5)
  # CT_small: HU -> window -> lung mask (the run's spec), then the pipeline; either way to the file is the same.
  expected = predictor.predict_inputs(predictor.preprocess(ct.preprocess_dicom(CT_SMALL, mask=True)[:, :, None])[None])
  np.testing.assert_allclose(results[1].probs, expected[0], atol=1e-6)
  np.testing.assert_allclose(results[2].probs, results[1].probs, atol=1e-6)
  unmasked = predictor.preprocess(ct.preprocess_dicom(CT_SMALL, mask=False)[:, :, None])
  assert not np.allclose(predictor.load(files[1]), unmasked)  # the mask was applied


def test_gray_rgb_and_rgba_files_and_arrays_are_converted_alike(predictor, tmp_path):
  gray = ct.window(hu_slice(7, phantom.BACTERIAL))
  rng = np.random.default_rng(0)
  Image.fromarray(gray).save(tmp_path / "gray.png")
  Image.fromarray(np.repeat(gray[:, :, None], 3, -1)).save(tmp_path / "rgb.png")
  rgba = np.concatenate([np.repeat(gray[:, :, None], 3, -1), rng.integers(0, 256, gray.shape + (1,), np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "rgba.png")  # alpha is dropped, not composited
  Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
  results = predictor.predict_files([str(tmp_path / n) for n in ("gray.png", "rgb.png", "rgba.png", "la.png")])
  probs = np.stack([r.probs for r in results])
  np.testing.assert_array_equal(probs, np.repeat(probs[:1], 4, 0))
  np.testing.assert_array_equal(predictor.predict_arrays([gray, gray[:, :, None], rgba]), probs[:3])
  # A coloured image becomes its ITU-R 601-2 luma, as the dataset builders store slices.
  colour = rng.integers(0, 256, gray.shape + (3,), np.uint8)
  Image.fromarray(colour).save(tmp_path / "colour.png")
  luma = np.asarray(Image.fromarray(colour).convert("L"))
  np.testing.assert_array_equal(predictor.predict_files([str(tmp_path / "colour.png")])[0].probs,
                                predictor.predict_arrays([luma])[0])
  Image.fromarray(gray.astype(np.uint16) * 200).save(tmp_path / "deep.png")  # 16-bit: refused, as in the builders
  assert "more than 8 bits" in predictor.predict_files([str(tmp_path / "deep.png")])[0].error
  with pytest.raises(predict_lib.InputError, match="image 0: dtype float32"):
    predictor.predict_arrays([gray.astype(np.float32)])


def launch_predictions(workdir, files, tmp):
  """launch/predict.py on the inputs of the launcher tests below (`files`: the run's test files): {name: (tmp
  dir, result)}. All in one process (launch_batch.py), so JAX and TensorFlow are imported once, not once a launch.
  """
  invocations = {}
  csv_dir = tmp / "csv"
  csv_dir.mkdir()
  invocations["csv"] = csv_dir, [f"--workdir={workdir}", "--checkpoint=latest", f"--output={csv_dir / 'preds.csv'}",
                                 f"--cam={csv_dir / 'cams'}", "--batch_size=4", *files]
  # A rerun replaces the CSV and overlays it wrote (only those: test_bad_outputs.py has what it refuses).
  invocations["csv_again"] = csv_dir, [f"--workdir={workdir}", "--checkpoint=latest",
                                       f"--output={csv_dir / 'preds.csv'}", f"--cam={csv_dir / 'cams'}",
                                       "--batch_size=4", *files]
  invocations["bad_inputs"] = tmp / "bad_inputs", bad_inputs_args(workdir, tmp / "bad_inputs")
  usage = tmp / "usage"
  (usage / "empty").mkdir(parents=True)
  write_image(usage / "a.png", hu_slice(1, phantom.NORMAL), "L")
  invocations["no_inputs"] = usage, [f"--workdir={workdir}", str(usage / "empty")]
  invocations["no_best"] = usage, [f"--workdir={workdir}", "--checkpoint=best", str(usage / "a.png")]
  results = launch_batch.run([["predict.py", *args] for _, args in invocations.values()], tmp)
  return {name: (folder, result) for (name, (folder, _)), result in zip(invocations.items(), results)}


@pytest.fixture(scope="module")
def launched_started(run, evaluation, tmp_path_factory):
  """launch_predictions' future: the launch process runs in a background thread, alongside the in-process
  prediction tests, which come first and request it."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(launch_predictions, run[0], evaluation[0], tmp_path_factory.mktemp("launched"))


@pytest.fixture(scope="module")
def launched(launched_started):
  return launched_started.result()


def test_launcher_csv_equals_the_runs_evaluation_and_writes_cams(run, evaluation, launched):
  files, probs, _ = evaluation
  folder, proc = launched["csv"]
  out, cams = folder / "preds.csv", folder / "cams"
  assert proc.returncode == 0, proc.stderr[-4000:]
  rerun = launched["csv_again"][1]
  assert rerun.returncode == 0 and f"CSV: {out}" in rerun.stdout, rerun.stderr[-4000:]
  assert sorted(os.listdir(folder)) == ["cams", "preds.csv"]  # the rerun's CSV, renamed into place: no leftovers
  rows = read_csv(out)
  assert list(rows[0]) == ["path", "prediction", "prob_normal", "prob_bacterial_pneumonia", "prob_covid19", "error"]
  assert [r["path"] for r in rows] == files
  got = np.array([[float(r[f"prob_{n}"]) for n in ("normal", "bacterial_pneumonia", "covid19")] for r in rows])
  np.testing.assert_allclose(got, probs, atol=1e-5)
  assert [r["prediction"] for r in rows] == [("normal", "bacterial_pneumonia", "covid19")[i] for i in probs.argmax(1)]
  assert all(r["error"] == "" for r in rows)
  manual = run[1]
  for f in files:
    png = cams / (os.path.relpath(f, manual) + ".png")
    assert png.stat().st_size > 0, png


def bad_inputs_args(workdir, tmp_path):
  """Good slices, a broken PNG, a DICOM without pixels, a text file, a missing file and an empty folder."""
  folder = tmp_path / "in"
  (folder / "empty_sub").mkdir(parents=True)
  write_image(folder / "good.png", hu_slice(3, phantom.COVID), "L")
  write_dicom(folder / "good.dcm", hu_slice(4, phantom.NORMAL))
  write_image(folder / "good.jpg", hu_slice(5, phantom.BACTERIAL), "RGB")
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  shutil.copy(RTPLAN, folder / "plan.dcm")
  (folder / "notes.txt").write_text("skipped inside a folder")
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("given by name: tried, and refused")
  return [f"--workdir={workdir}", "--checkpoint=latest", f"--output={tmp_path / 'preds.csv'}", str(folder),
          str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"), str(tmp_path / "empty")]


def test_bad_inputs_are_reported_by_name_and_the_rest_predicted(launched):
  tmp_path, proc = launched["bad_inputs"]
  out = tmp_path / "preds.csv"
  assert proc.returncode == 1, proc.stderr[-4000:]
  rows = {os.path.basename(r["path"]): r for r in read_csv(out)}
  assert set(rows) == {"good.png", "good.dcm", "good.jpg", "broken.png", "plan.dcm", "notes.txt", "missing.png", "empty"}
  for name in ("good.png", "good.dcm", "good.jpg"):
    assert rows[name]["error"] == "" and rows[name]["prediction"] in ("normal", "bacterial_pneumonia", "covid19")
    assert sum(float(rows[name][f"prob_{n}"]) for n in ("normal", "bacterial_pneumonia", "covid19")) == pytest.approx(1)
  expected = {"broken.png": "neither a readable image", "plan.dcm": "DICOM file without pixel data (RT Plan Storage)",
              "notes.txt": "neither a readable image", "missing.png": "no such file or folder",
              "empty": "folder holds no PNG, JPEG or DICOM files"}
  for name, message in expected.items():
    assert rows[name]["prediction"] == "" and rows[name]["prob_covid19"] == ""
    assert rows[name]["error"].startswith(rows[name]["path"]) and message in rows[name]["error"], rows[name]
    assert rows[name]["path"] in proc.stderr  # and logged
  assert "3 predicted, 5 failed" in proc.stdout


def test_launcher_usage_errors_exit_2(run, launched):
  tmp_path, proc = launched["no_inputs"]
  assert proc.returncode == 2 and "No PNG, JPEG or DICOM files in the inputs" in proc.stderr
  assert str(tmp_path / "empty") in proc.stderr
  _, proc = launched["no_best"]
  assert proc.returncode == 2  # covid19_diag has no validation split, hence no best checkpoint
  assert f"No best checkpoint in {run[0]}" in proc.stderr and "--checkpoint=latest" in proc.stderr
  assert not (tmp_path.parent / "predictions.csv").exists()  # the default --output, in the launches' cwd
