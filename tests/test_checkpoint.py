"""Resume after SIGTERM / SIGKILL, the different-model guard and the NaN stop.

Each run is a subprocess (tests/train_worker.py) on a tiny in-memory problem,
so signals never reach pytest; all runs share a JAX compilation cache.
"""

import json
import os

import numpy as np
import pytest

from test_train_pmap import run_worker
from train_worker import CLASSES, blobs

from dsn_saal_jax import train as train_lib

STEPS = 12


def train(tmp_path, workdir, out=None, devices=1, **kwargs):
  args = ["train", f"--workdir={workdir}"] + ([f"--out={out}"] if out else [])
  args += [f"--{k}={v}" for k, v in kwargs.items()]
  return run_worker(args, devices, tmp_path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: final parameters and its workdir."""
  tmp = tmp_path_factory.mktemp("reference")
  proc = train(tmp, tmp / "work", out=tmp / "final.npz")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return np.load(tmp / "final.npz"), tmp / "work"


def assert_same_state(a, b):
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


def latest_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def test_uninterrupted_run_writes_checkpoints_logs_and_report(reference):
  final, workdir = reference
  assert int(final["step"]) == STEPS
  assert latest_steps(workdir) == [8, 12]  # keep_checkpoints=2, saved every 4 steps
  assert os.listdir(workdir / "best")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  history = train_lib.read_history(str(workdir))
  np.testing.assert_array_equal(history["train/alpha"][0], [4, 8, 12])  # log_every_steps=4
  assert np.all((history["train/alpha"][1] > 0) & (history["train/alpha"][1] < 1))
  assert set(history) >= {f"train/beta_{i}" for i in range(1, 7)} | {"validation/macro_f1", "test/macro_f1"}
  # The SAAL weights in use: Eq. 7 at the logged alpha with the training set's k_n, normalized to sum to C.
  alpha = history["train/alpha"][1].astype(np.float64)[:, None]
  w = (1 - alpha) / (1 - alpha ** np.bincount(blobs(64, 0)[1], minlength=3))
  for n, name in enumerate(CLASSES):
    np.testing.assert_allclose(history[f"train/saal_weight_{name}"][1], 3 * w[:, n] / w.sum(1), rtol=1e-4)
  report = workdir / "report" / "test"
  for name in ("metrics.json", "confusion_matrix.png", "roc.png", "gradcam.png"):
    assert (report / name).stat().st_size > 0, name
  metrics = json.loads((report / "metrics.json").read_text())
  assert metrics["num_examples"] == 29  # every test example counted once despite padding
  assert np.sum(metrics["confusion_matrix"]) == 29


def test_evaluate_restores_the_best_checkpoint_and_reproduces_the_report(reference, tmp_path):
  _, workdir = reference
  proc = run_worker(["evaluate", f"--workdir={workdir}", "--checkpoint=best"], 1, tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.loads((workdir / "report" / "test_best" / "metrics.json").read_text())
  first = json.loads((workdir / "report" / "test" / "metrics.json").read_text())
  assert first["checkpoint"] == "best" and again["checkpoint_step"] == first["checkpoint_step"]
  assert again["confusion_matrix"] == first["confusion_matrix"]
  assert again["auc"] == first["auc"]
  for name in ("confusion_matrix.png", "roc.png", "gradcam.png"):
    assert (workdir / "report" / "test_best" / name).exists()
  proc = run_worker(["evaluate", f"--workdir={tmp_path / 'empty'}", "--checkpoint=latest"], 1, tmp_path)
  assert proc.returncode != 0 and "No latest checkpoint in" in proc.stderr


def test_sigterm_saves_and_resume_matches_uninterrupted(reference, tmp_path):
  workdir = tmp_path / "work"
  proc = train(tmp_path, workdir, kill_at=6, signal="SIGTERM")
  assert proc.returncode == 3, proc.stderr[-4000:]
  assert "PREEMPTED" in proc.stdout
  saved = latest_steps(workdir)
  assert saved and 4 < saved[-1] < STEPS  # saved at a step boundary after the signal, not at the end
  proc = train(tmp_path, workdir, out=tmp_path / "final.npz")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Resumed from" in proc.stderr
  assert_same_state(np.load(tmp_path / "final.npz"), reference[0])
  resumed, uninterrupted = train_lib.read_history(str(workdir)), train_lib.read_history(str(reference[1]))
  for key in ("train/alpha", "validation/macro_f1"):  # steps logged twice keep the resumed run's value
    np.testing.assert_array_equal(resumed[key][0], uninterrupted[key][0])
    np.testing.assert_allclose(resumed[key][1], uninterrupted[key][1], rtol=1e-5, err_msg=key)


def test_sigkill_after_checkpoint_resumes_to_the_same_result(reference, tmp_path):
  workdir = tmp_path / "work"
  # Killed while the step-8 checkpoint may still be being written: it must be complete or invisible.
  proc = train(tmp_path, workdir, kill_at=9, signal="SIGKILL", wait_for="4")
  assert proc.returncode == -9
  assert latest_steps(workdir)[-1] in (4, 8)
  proc = train(tmp_path, workdir, out=tmp_path / "final.npz")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Resumed from" in proc.stderr
  assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
  assert_same_state(np.load(tmp_path / "final.npz"), reference[0])


def test_workdir_of_a_different_model_is_refused(reference, tmp_path):
  _, workdir = reference
  before = latest_steps(workdir)
  proc = train(tmp_path, workdir, overrides=json.dumps({"model": "baseline", "num_train_steps": 16}))
  assert proc.returncode != 0
  assert "holds a latest checkpoint of a different model" in proc.stderr
  assert "model: checkpoint 'dsn' vs config 'baseline'" in proc.stderr
  assert "new --workdir" in proc.stderr
  assert latest_steps(workdir) == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "work"
  proc = train(tmp_path, workdir, overrides=json.dumps({"num_train_steps": 4}))
  assert proc.returncode == 0, proc.stderr[-4000:]
  proc = train(tmp_path, workdir, overrides=json.dumps({"num_train_steps": 12, "learning_rate": 1e30}))
  assert proc.returncode != 0
  assert "FloatingPointError" in proc.stderr and "The training loss became nan" in proc.stderr
  assert "last good checkpoint (step 4)" in proc.stderr
  assert latest_steps(workdir) == [4]
  # The surviving checkpoint is intact: a normal run resumes from it and finishes.
  proc = train(tmp_path, workdir, overrides=json.dumps({"num_train_steps": 8}))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Resumed from" in proc.stderr and latest_steps(workdir) == [4, 8]
