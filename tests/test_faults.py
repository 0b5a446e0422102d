"""Preemption and faults at every phase of a run: each fault, then a rerun, ends where an uninterrupted run does.

Runs are subprocesses (tests/train_worker.py) that send themselves a signal
at a chosen moment (`--fault=PHASE:AT:SIGNAL`, see `install_fault`), so the
timing is exact and no signal reaches pytest. The tiny run trains 12 steps,
validates and checkpoints every 4, and writes its report at the end. SIGTERM
must exit 143 (what schedulers requeue on) with a complete checkpoint;
after SIGKILL nothing partial may be read as complete. Equality with the
uninterrupted run is exact: same machine, same programs.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import HERE, STEPS, assert_same_state, free_port, latest_steps, multiprocess_env, run_worker, train

PREEMPTED = 143


def resume_and_compare(tmp_path, workdir, reference):
  """Reruns the same command; it must finish and equal the uninterrupted run, state and test report."""
  proc = train(tmp_path, workdir, out=tmp_path / "final.npz")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert_same_state(np.load(tmp_path / "final.npz"), reference[0])
  report = lambda w: json.loads((w / "report" / "test" / "metrics.json").read_text())
  assert report(workdir) == report(reference[1])
  assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()], "temporary files left"
  return proc


@pytest.mark.parametrize("fault, saved", [
    ("step:6:SIGTERM", [4, 6]),        # (a) mid-step (batch 6 is fetched, 2 ahead, during step 5)
    ("validation:2:SIGTERM", [4, 8]),  # (b) in the step-8 validation, which is also a checkpoint step
    ("save:4:SIGTERM", [4]),           # (c) while step 4's checkpoint is being written
])
def test_sigterm_in_training_exits_143_with_one_complete_checkpoint_and_resumes_exactly(
    reference, tmp_path, fault, saved):
  workdir = tmp_path / "work"
  proc = train(tmp_path, workdir, fault=fault)
  assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
  assert "PREEMPTED" in proc.stdout and "checkpoint saved" in proc.stdout
  assert "StepAlreadyExists" not in proc.stderr
  assert latest_steps(workdir) == saved
  assert not (workdir / "report").exists()
  proc = resume_and_compare(tmp_path, workdir, reference)
  assert f"at step {saved[-1]}." in proc.stderr  # "Resumed from ... at step N."


def test_sigterm_during_the_final_report_exits_143_after_a_whole_report(reference, tmp_path):
  workdir = tmp_path / "work"
  proc = train(tmp_path, workdir, fault="report:0:SIGTERM")
  assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
  assert "during the final report" in proc.stdout
  assert latest_steps(workdir) == [8, STEPS]
  assert sorted(os.listdir(workdir / "report" / "test")) == [
      "confusion_matrix.png", "gradcam.png", "metrics.json", "roc.png"]
  resume_and_compare(tmp_path, workdir, reference)


def test_sigkill_before_a_checkpoint_commits_leaves_it_invisible(reference, tmp_path):
  """(e) Killed with step 8's files written but not committed: step 4 is the resume point."""
  workdir = tmp_path / "work"
  proc = train(tmp_path, workdir, fault="commit:8:SIGKILL")
  assert proc.returncode == -9
  assert latest_steps(workdir) == [4]
  assert glob.glob(str(workdir / "checkpoints" / "8.orbax-checkpoint-tmp*")), "the kill came too late"

  # A predictor or evaluator started now reads step 4, never the half-written step 8.
  proc = run_worker(["evaluate", f"--workdir={workdir}", "--checkpoint=latest"], 1, tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert '"step": 4' in proc.stdout
  from dsn_saal_jax import predict  # pylint: disable=g-import-not-at-top
  assert predict.Predictor.from_workdir(str(workdir), "latest").source.endswith(os.path.join("checkpoints", "4"))
  assert glob.glob(str(workdir / "checkpoints" / "8.orbax-checkpoint-tmp*")), "a reader deleted the job's files"

  proc = resume_and_compare(tmp_path, workdir, reference)
  assert "at step 4." in proc.stderr


def damage(step_dir, how):
  if how == "truncated array file":
    files = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(files[-1], "r+b") as f:
      f.truncate(os.path.getsize(files[-1]) // 2)
  else:  # missing metadata
    os.remove(os.path.join(step_dir, "meta", "metadata"))


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_intact_one(reference, tmp_path):
  interrupted = tmp_path / "interrupted"
  proc = train(tmp_path, interrupted, fault="step:10:SIGTERM")
  assert proc.returncode == PREEMPTED and latest_steps(interrupted) == [8, 10]
  for how in ("truncated array file", "missing metadata"):
    workdir = tmp_path / how.replace(" ", "_")
    shutil.copytree(interrupted, workdir)
    damage(str(workdir / "checkpoints" / "10"), how)
    proc = resume_and_compare(tmp_path, workdir, reference)
    assert f"The latest checkpoint of step 10 ({workdir / 'checkpoints' / '10'}) is damaged" in proc.stderr, how
    assert "at step 8." in proc.stderr
    assert [n.split("-")[0] for n in os.listdir(workdir / "damaged" / "latest")] == ["10"]  # kept, not deleted


def test_predictor_names_a_damaged_checkpoint_and_falls_back_to_an_intact_one(reference, tmp_path):
  from dsn_saal_jax import predict  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "work"
  shutil.copytree(reference[1], workdir)
  damage(str(workdir / "checkpoints" / "12"), "missing metadata")
  with pytest.raises(predict.CheckpointError, match=r"checkpoints/12 cannot be read .*damaged"):
    predict.Predictor.from_checkpoint(str(workdir / "checkpoints" / "12"))
  assert predict.Predictor.from_workdir(str(workdir), "latest").source.endswith(os.path.join("checkpoints", "8"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(reference, tmp_path):
  workdir = tmp_path / "work"
  shutil.copytree(reference[1], workdir)  # a finished 12-step run: checkpoints 8 and 12
  proc = train(tmp_path, workdir, overrides=json.dumps({"num_train_steps": 20, "learning_rate": 1e30}))
  assert proc.returncode not in (0, PREEMPTED)
  assert "FloatingPointError" in proc.stderr and "The training loss became nan at step" in proc.stderr
  assert "last good checkpoint (step 12)" in proc.stderr
  assert latest_steps(workdir) == [8, 12]
  # The surviving checkpoint is intact: a normal run resumes from it and finishes.
  proc = train(tmp_path, workdir, overrides=json.dumps({"num_train_steps": 16}))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Resumed from" in proc.stderr and latest_steps(workdir) == [12, 16]


def test_sigterm_to_one_of_two_processes_makes_both_save_the_same_step_and_exit_143(tmp_path):
  env = multiprocess_env(tmp_path)
  coordinator, workdir = f"localhost:{free_port()}", tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "train_worker.py"), "multihost", f"--workdir={workdir}",
       f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"]
      + (["--fault=step:5:SIGTERM"] if i == 1 else []),
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  steps = []
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == PREEMPTED, err[-4000:]
    steps += re.findall(r"PREEMPTED Preempted \(SIGTERM\) at step (\d+)/12", out)
  assert len(steps) == 2 and steps[0] == steps[1]  # process 0 got no signal, yet stopped at the same step
  assert latest_steps(workdir) == [4, int(steps[0])]


# ----------------------------------------------------------------------------- the real launcher and data build

LAUNCH = os.path.join(os.path.dirname(HERE), "launch", "train.py")


def launch(tmp_path, workdir, data_dir, fault=None):
  """launch/train.py on configs/default.py shrunk to seconds, through the real TFDS build and pipeline."""
  overrides = dict(data_dir=data_dir, synthetic_scale=0.01, synthetic_image_size=32, image_size=32,
                   widths="(4,8,8,8,8)", hidden=16, num_train_steps=6, batch_size=16, eval_batch_size=16,
                   log_every_steps=3, checkpoint_every_steps=3, gradcam_per_class=1)
  args = ["launch"] + ([f"--fault={fault}"] if fault else []) + [
      "--", LAUNCH, f"--config={os.path.dirname(HERE)}/configs/default.py", f"--workdir={workdir}"]
  return run_worker(args + [f"--config.{k}={v}" for k, v in overrides.items()], 1, tmp_path)


def launched_result(workdir):
  metrics = json.loads((workdir / "report" / "test" / "metrics.json").read_text())
  with ocp.PyTreeCheckpointer() as ckptr:
    state = ckptr.restore(str(workdir / "checkpoints" / str(max(latest_steps(workdir))) / "state"))
  return metrics, state


def test_launcher_survives_a_killed_dataset_build_and_sigterm_in_validation(tmp_path):
  reference = tmp_path / "reference"
  proc = launch(tmp_path, reference, tmp_path / "data_reference")
  assert proc.returncode == 0, proc.stderr[-4000:]

  workdir, data_dir = tmp_path / "work", tmp_path / "data"
  proc = launch(tmp_path, workdir, data_dir, fault="build:20:SIGTERM")
  assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
  assert "before training started" in proc.stderr
  proc = launch(tmp_path, workdir, data_dir, fault="build:40:SIGKILL")  # (f) in the middle of the build
  assert proc.returncode == -9
  assert not glob.glob(str(data_dir / "synthetic_ct" / "*" / "1.0.0")), "a partial build looks finished"
  proc = launch(tmp_path, workdir, data_dir, fault="validation:1:SIGTERM")  # rebuilds, then (b) at step 3
  assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
  assert "StepAlreadyExists" not in proc.stderr and latest_steps(workdir) == [3]
  proc = launch(tmp_path, workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]

  (metrics, state), (ref_metrics, ref_state) = launched_result(workdir), launched_result(reference)
  assert metrics == ref_metrics
  leaves, ref_leaves = (ocp.tree.to_flat_dict(s) for s in (state, ref_state))
  assert leaves.keys() == ref_leaves.keys()
  for key in leaves:
    np.testing.assert_array_equal(leaves[key], ref_leaves[key], err_msg=str(key))

  # Every checkpoint damaged: a clear error naming them, no traceback, exit 1 (not 143).
  for step in latest_steps(workdir):
    damage(str(workdir / "checkpoints" / str(step)), "missing metadata")
  proc = launch(tmp_path, workdir, data_dir)
  assert proc.returncode == 1
  assert f"No intact checkpoint in {workdir / 'checkpoints'}" in proc.stderr
  assert f"step 6 at {workdir / 'checkpoints' / '6'}" in proc.stderr
  assert "Traceback" not in proc.stderr
