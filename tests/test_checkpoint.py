"""What an uninterrupted run writes, evaluation from its checkpoints, and the different-model and state-tree guards.

The reference run is a subprocess (tests/train_worker.py, conftest.py) on a tiny
in-memory problem; evaluating it and refusing to resume it with another model
run here, in the test process, with the same config and data as the worker's.
Faults (signals, damage, NaN) are in test_faults.py.
"""

import glob
import json
import os
import shutil

import numpy as np
import optax
import pytest

from conftest import STEPS, latest_steps
from helpers import CLASSES, blobs, tiny_config, tiny_dataset

from dsn_saal_jax import checkpointing, runtime
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


def tree_bytes(directory):
  """{relative path: bytes} of every file under `directory`: what 'left in place, byte for byte' compares."""
  paths = glob.glob(os.path.join(directory, "**"), recursive=True)
  return {os.path.relpath(p, directory): open(p, "rb").read() for p in paths if os.path.isfile(p)}


def test_an_intact_checkpoint_of_another_optimizer_is_refused_by_the_trainer_and_left_in_place(
    reference, tmp_path, monkeypatch):
  """The same model trained with another optimizer (here Adam: what a code change would do): the resume, and with
  no latest the best/ check at the start, refuse it naming the differences, and never call it damaged nor move it."""
  workdir = tmp_path / "work"
  shutil.copytree(reference[1], workdir)
  before = tree_bytes(workdir)
  monkeypatch.setattr(train_lib, "make_optimizer", lambda config, steps_per_epoch: optax.adam(1e-3))
  c = tiny_config()
  with pytest.raises(checkpointing.CheckpointMismatchError) as refused:
    train_lib.train_and_evaluate(c, str(workdir), dataset=tiny_dataset(c))
  message = str(refused.value)
  assert f"holds a latest checkpoint ({workdir / 'checkpoints' / '12'}) of another state tree" in message
  assert "opt_state/0/mu/" in message and "missing in checkpoint" in message and "only in checkpoint" in message
  assert "another optimizer" in message and "new --workdir" in message and "damaged" not in message
  # No latest: the best/ checkpoint is checked before training, not at the test report, and stays where it is.
  shutil.rmtree(workdir / "checkpoints")
  best = glob.glob(str(workdir / "best" / "[0-9]*"))
  with pytest.raises(checkpointing.CheckpointMismatchError, match=rf"holds a best checkpoint \({best[0]}\) of another"):
    train_lib.train_and_evaluate(c, str(workdir), dataset=tiny_dataset(c))
  assert tree_bytes(workdir) == {k: v for k, v in before.items() if not k.startswith("checkpoints")}
  assert not (workdir / "damaged").exists()


def test_a_checkpoint_of_another_tree_is_refused_from_its_metadata_and_real_damage_is_still_set_aside(tmp_path):
  """Checkpoints alone on a toy state: a tree or shape that differs is refused before any array is read, the
  step left whole in best/ and checkpoints/; a truncated array file is damage, moved to damaged/best/."""
  params = {"w": np.ones((3, 3), np.float32)}
  sgd_state = {"step": np.array(4, np.int32), "params": params, "opt_state": optax.sgd(0.1, momentum=0.9).init(params)}
  ckpt = checkpointing.Checkpoints(str(tmp_path), {"model": "toy"})
  ckpt.save(4, sgd_state, which="best", best_value=0.5)
  ckpt.save(4, sgd_state)
  ckpt.wait()
  before = tree_bytes(tmp_path)
  adam_state = {**sgd_state, "opt_state": optax.adam(0.1).init(params)}
  for which, folder in (("best", "best"), ("latest", "checkpoints")):
    with pytest.raises(checkpointing.CheckpointMismatchError, match=rf"holds a {which} checkpoint \({tmp_path / folder / '4'}\)"
                       r" of another state tree than this config's \(4 entries differ, e.g. opt_state/0/count: "
                       r"missing in checkpoint; opt_state/0/mu/w: missing in checkpoint; opt_state/0/trace/w: only"):
      ckpt.restore(adam_state, which)
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"params/w: checkpoint float32\(3, 3\) vs config "
                     r"float32\(5, 5\)"):
    ckpt.meta("best", {**sgd_state, "params": {"w": np.ones((5, 5), np.float32)}})
  assert tree_bytes(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["best", "checkpoints"]
  np.testing.assert_array_equal(ckpt.restore(sgd_state, "best")[0]["opt_state"][0].trace["w"], 0)
  # Real damage: a truncated array file (here it holds the arrays' zarr metadata too).
  array_file = max(glob.glob(str(tmp_path / "best" / "4" / "state" / "**" / "d" / "*"), recursive=True),
                   key=os.path.getsize)
  with open(array_file, "r+b") as f:
    f.truncate(os.path.getsize(array_file) // 2)
  assert ckpt.restore(sgd_state, "best") is None
  assert [n.split("-")[0] for n in os.listdir(tmp_path / "damaged" / "best")] == ["4"]
  assert not os.listdir(tmp_path / "best")
