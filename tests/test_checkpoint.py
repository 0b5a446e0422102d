"""What an uninterrupted run writes, evaluation from its checkpoints, and the different-model guard.

The reference run is a subprocess (tests/train_worker.py, conftest.py) on a tiny
in-memory problem; evaluating it and refusing to resume it with another model
run here, in the test process, with the same config and data as the worker's.
Faults (signals, damage, NaN) are in test_faults.py.
"""

import json
import os

import numpy as np
import pytest

from conftest import STEPS, latest_steps
from helpers import CLASSES, blobs, tiny_config, tiny_dataset

from dsn_saal_jax import runtime
from dsn_saal_jax import train as train_lib


def test_uninterrupted_run_writes_checkpoints_logs_and_report(reference):
  final, workdir = reference
  assert int(final["step"]) == STEPS
  assert latest_steps(workdir) == [8, 12]  # keep_checkpoints=2, saved every 4 steps
  assert os.listdir(workdir / "best")
  assert not (workdir / "tensorboard").exists()  # tiny_config: tensorboard=False; history.jsonl only
  history = runtime.read_history(str(workdir))
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
  c = tiny_config()  # the reference run's, as train_worker.py's evaluate mode would take it; in this process
  train_lib.evaluate(c, str(workdir), "test", "best", dataset=tiny_dataset(c))
  again = json.loads((workdir / "report" / "test_best" / "metrics.json").read_text())
  first = json.loads((workdir / "report" / "test" / "metrics.json").read_text())
  assert first["checkpoint"] == "best" and again["checkpoint_step"] == first["checkpoint_step"]
  assert again["confusion_matrix"] == first["confusion_matrix"]
  assert again["auc"] == first["auc"]
  for name in ("confusion_matrix.png", "roc.png", "gradcam.png"):
    assert (workdir / "report" / "test_best" / name).exists()
  with pytest.raises(FileNotFoundError, match="No latest checkpoint in"):
    train_lib.evaluate(c, str(tmp_path / "empty"), "test", "latest", dataset=tiny_dataset(c))


def test_workdir_of_a_different_model_is_refused(reference):
  _, workdir = reference
  before = latest_steps(workdir)
  c = tiny_config(**{"model.dsn": False}, num_train_steps=16)
  with pytest.raises(ValueError, match="holds a latest checkpoint of a different model") as refused:
    train_lib.train_and_evaluate(c, str(workdir), dataset=tiny_dataset(c))
  assert "model: checkpoint 'dsn' vs config 'baseline'" in str(refused.value)
  assert "new --workdir" in str(refused.value)
  assert latest_steps(workdir) == before
