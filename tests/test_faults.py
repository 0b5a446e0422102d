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
from concurrent import futures

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (HERE, STEPS, assert_same_state, concurrently, free_port, latest_steps, multiprocess_env,
                      run_worker, train)

PREEMPTED = 143


def resume_and_compare(workdir, reference, proc=None):
  """Reruns the same command (or takes its `proc`); it must finish and equal the uninterrupted run."""
  out = workdir.parent / f"{workdir.name}.final.npz"
  proc = proc or train(workdir, out=out)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert_same_state(np.load(out), reference[0])
  report = lambda w: json.loads((w / "report" / "test" / "metrics.json").read_text())
  assert report(workdir) == report(reference[1])
  assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()], "temporary files left"
  return proc


def damage(step_dir, how):
  if how == "truncated array file":
    files = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(files[-1], "r+b") as f:
      f.truncate(os.path.getsize(files[-1]) // 2)
  else:  # missing metadata
    os.remove(os.path.join(step_dir, "meta", "metadata"))


def nan_runs(reference, tmp_path):
  """A finished 12-step run resumed at a NaN-making learning rate, then resumed normally: (proc, steps) of each."""
  workdir = tmp_path / "work"
  shutil.copytree(reference[1], workdir)  # a finished 12-step run: checkpoints 8 and 12
  nan = train(workdir, overrides=json.dumps({"num_train_steps": 20, "learning_rate": 1e30}))
  nan_steps = latest_steps(workdir)
  rerun = train(workdir, overrides=json.dumps({"num_train_steps": 16}))
  return (nan, nan_steps), (rerun, latest_steps(workdir))


def two_processes_sigterm(tmp_path):
  """Two processes joined by jax.distributed, SIGTERM to process 1 mid-training: ([(proc, out, err)], workdir)."""
  env = multiprocess_env()
  coordinator, workdir = f"localhost:{free_port()}", tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "train_worker.py"), "multihost", f"--workdir={workdir}",
       f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"]
      + (["--fault=step:5:SIGTERM"] if i == 1 else []),
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  return [(p, *p.communicate(timeout=900)) for p in procs], workdir


@pytest.fixture(scope="module")
def side_runs(reference, tmp_path_factory):
  """The launcher, NaN and two-process runs, independent of the fault chain: {name: future}.

  They run one after the other in a background thread, alongside the chain's mostly single-threaded runs
  (imports, tracing) on a 2-core machine; each test waits for its own. One thread, not three: more at once
  adds memory (~4.6 GB peak for the module as it is) and no speed, as the cores are then full.
  """
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for them
    yield {"launcher": pool.submit(launcher_runs, tmp_path_factory.mktemp("launcher")),
           "nan": pool.submit(nan_runs, reference, tmp_path_factory.mktemp("nan")),
           "two_processes": pool.submit(two_processes_sigterm, tmp_path_factory.mktemp("two_processes"))}


@pytest.fixture(scope="module")
def faulted(reference, side_runs, tmp_path_factory):  # pylint: disable=unused-argument
  """One workdir taken through a fault at every phase in turn, each run resuming the one before.

  `side_runs` is requested only to start first, so that its runs go alongside this chain.

  Every process start costs a Python+JAX import, so the faults share runs: each faulted run is also the
  resumption of the previous fault, and the final rerun must still equal the uninterrupted run bit for
  bit, so every resume on the way was exact. What each test checks is recorded as the runs happen:
    save      fresh run, SIGTERM while step 4's checkpoint is being written         -> [4]
    step      resumes at 4, SIGTERM mid-step (batch 6 is fetched, 2 ahead, during step 5) -> [4, 6]
    commit    resumes at 6, SIGKILL with step 8's files written but not committed   -> [4, 6] + tmp files
    validation  resumes at 6, SIGTERM in the step-8 validation (also a checkpoint step) -> [6, 8]
    step10    resumes at 8, SIGTERM mid-step                                       -> [8, 10]
  then step 10 is damaged two ways: a copy of the workdir with a truncated array file is rerun to the end,
  the workdir itself (missing metadata) gets SIGTERM in its final report and is rerun to the end.
  """
  from dsn_saal_jax import predict  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("faulted")
  workdir = tmp / "work"
  tmp_glob = lambda w: glob.glob(str(w / "checkpoints" / "8.orbax-checkpoint-tmp*"))
  runs = {}

  def run(name, fault, w=workdir):
    proc = train(w, fault=fault)
    runs[name] = {"proc": proc, "steps": latest_steps(w), "report": (w / "report").exists()}
    return proc

  run("save", "save:4:SIGTERM")
  run("step", "step:6:SIGTERM")
  run("commit", "commit:8:SIGKILL")
  runs["commit"]["tmp_files"] = bool(tmp_glob(workdir))
  # A predictor or evaluator started now reads step 6, never the half-written step 8. The evaluator reads a
  # copy of this moment's workdir, so that it runs alongside the next fault's run.
  runs["commit"]["predictor_source"] = predict.Predictor.from_workdir(str(workdir), "latest").source
  runs["commit"]["tmp_files_after_predictor"] = bool(tmp_glob(workdir))
  readers_copy = tmp / "readers_copy"
  shutil.copytree(workdir, readers_copy)
  evaluated, _ = concurrently(
      lambda: run_worker(["evaluate", f"--workdir={readers_copy}", "--checkpoint=latest"], 1),
      lambda: run("validation", "validation:1:SIGTERM"))
  runs["commit"]["evaluated"] = evaluated
  runs["commit"]["tmp_files_after_evaluator"] = bool(tmp_glob(readers_copy))
  run("step10", "step:10:SIGTERM")

  truncated = tmp / "truncated"
  shutil.copytree(workdir, truncated)
  damage(str(truncated / "checkpoints" / "10"), "truncated array file")
  damage(str(workdir / "checkpoints" / "10"), "missing metadata")
  truncated_rerun, _ = concurrently(lambda: train(truncated, out=tmp / "truncated.final.npz"),
                                    lambda: run("report", "report:0:SIGTERM"))
  runs["report"]["report_files"] = sorted(os.listdir(workdir / "report" / "test"))
  return {"runs": runs, "workdir": workdir, "truncated": (truncated, truncated_rerun)}


@pytest.mark.parametrize("name, saved, resumed_at", [
    ("save", [4], None),     # (c) fresh run, while step 4's checkpoint is being written
    ("step", [4, 6], 4),     # (a) mid-step (batch 6 is fetched, 2 ahead, during step 5)
    ("validation", [6, 8], 6),  # (b) in the step-8 validation, which is also a checkpoint step
    ("step10", [8, 10], 8),  # (a) again, to have a newest checkpoint to damage
])
def test_sigterm_in_training_exits_143_with_a_complete_checkpoint_and_the_rerun_resumes_from_it(
    faulted, name, saved, resumed_at):
  run = faulted["runs"][name]
  proc = run["proc"]
  assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
  assert "PREEMPTED" in proc.stdout and "checkpoint saved" in proc.stdout
  assert "StepAlreadyExists" not in proc.stderr
  assert run["steps"] == saved
  assert not run["report"]
  if resumed_at is None:
    assert "Resumed from" not in proc.stderr
  else:
    assert f"at step {resumed_at}." in proc.stderr  # "Resumed from ... at step N."


def test_sigkill_before_a_checkpoint_commits_leaves_it_invisible(faulted):
  """(e) Killed with step 8's files written but not committed: step 6 is the resume point."""
  run = faulted["runs"]["commit"]
  assert run["proc"].returncode == -9
  assert run["steps"] == [4, 6]
  assert run["tmp_files"], "the kill came too late"
  assert run["predictor_source"].endswith(os.path.join("checkpoints", "6"))
  evaluated = run["evaluated"]
  assert evaluated.returncode == 0, evaluated.stderr[-4000:]
  assert '"step": 6' in evaluated.stdout
  assert run["tmp_files_after_predictor"] and run["tmp_files_after_evaluator"], "a reader deleted the job's files"
  # The next run resumes from step 6, writes step 8 again over the leftover files, and ends exact (below).
  assert "at step 6." in faulted["runs"]["validation"]["proc"].stderr


def test_sigterm_during_the_final_report_exits_143_after_a_whole_report(faulted):
  run = faulted["runs"]["report"]
  assert run["proc"].returncode == PREEMPTED, run["proc"].stderr[-4000:]
  assert "during the final report" in run["proc"].stdout
  assert run["steps"] == [8, STEPS]
  assert run["report_files"] == ["confusion_matrix.png", "gradcam.png", "manifest.json", "metrics.json", "roc.png"]


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_intact_one(faulted):
  truncated, truncated_rerun = faulted["truncated"]
  for how, workdir, proc in (("truncated array file", truncated, truncated_rerun),
                             ("missing metadata", faulted["workdir"], faulted["runs"]["report"]["proc"])):
    assert f"The latest checkpoint of step 10 ({workdir / 'checkpoints' / '10'}) is damaged" in proc.stderr, how
    assert "at step 8." in proc.stderr, how
    assert [n.split("-")[0] for n in os.listdir(workdir / "damaged" / "latest")] == ["10"], how  # kept


def test_every_fault_then_a_rerun_ends_exactly_where_the_uninterrupted_run_does(faulted, reference):
  truncated, truncated_rerun = faulted["truncated"]
  resume_and_compare(truncated, reference, truncated_rerun)
  proc = resume_and_compare(faulted["workdir"], reference)
  assert f"at step {STEPS}." in proc.stderr


def test_predictor_names_a_damaged_checkpoint_and_falls_back_to_an_intact_one(reference, tmp_path):
  from dsn_saal_jax import checkpointing, predict  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "work"
  shutil.copytree(reference[1], workdir)
  damage(str(workdir / "checkpoints" / "12"), "missing metadata")
  with pytest.raises(checkpointing.CheckpointDamagedError, match=r"checkpoints/12 cannot be read .*damaged"):
    predict.Predictor.from_checkpoint(str(workdir / "checkpoints" / "12"))
  assert predict.Predictor.from_workdir(str(workdir), "latest").source.endswith(os.path.join("checkpoints", "8"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(side_runs):
  (proc, steps), (rerun, rerun_steps) = side_runs["nan"].result()
  assert proc.returncode not in (0, PREEMPTED)
  assert "FloatingPointError" in proc.stderr and "The training loss became nan at step" in proc.stderr
  assert "last good checkpoint (step 12)" in proc.stderr
  assert steps == [8, 12]
  # The surviving checkpoint is intact: a normal run resumes from it and finishes.
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert "Resumed from" in rerun.stderr and rerun_steps == [12, 16]


def test_sigterm_to_one_of_two_processes_makes_both_save_the_same_step_and_exit_143(side_runs):
  runs, workdir = side_runs["two_processes"].result()
  steps = []
  for p, out, err in runs:
    assert p.returncode == PREEMPTED, err[-4000:]
    steps += re.findall(r"PREEMPTED Preempted \(SIGTERM\) at step (\d+)/12", out)
  assert len(steps) == 2 and steps[0] == steps[1]  # process 0 got no signal, yet stopped at the same step
  assert latest_steps(workdir) == [4, int(steps[0])]


# ----------------------------------------------------------------------------- the real launcher and data build

LAUNCH = os.path.join(os.path.dirname(HERE), "launch", "train.py")


def launch(workdir, data_dir, fault=None):
  """launch/train.py on configs/default.py shrunk to seconds, through the real TFDS build and pipeline."""
  overrides = {"data_dir": data_dir, "synthetic_scale": 0.01, "synthetic_image_size": 32, "image_size": 32,
               "model.widths": "(4,8,8,8,8)", "model.hidden": 16, "num_train_steps": 6, "batch_size": 16,
               "eval_batch_size": 16, "log_every_steps": 3, "checkpoint_every_steps": 3, "gradcam_per_class": 1}
  args = ["launch"] + ([f"--fault={fault}"] if fault else []) + [
      "--", LAUNCH, f"--config={os.path.dirname(HERE)}/configs/default.py", f"--workdir={workdir}"]
  return run_worker(args + [f"--config.{k}={v}" for k, v in overrides.items()], 1)


def launched_result(workdir):
  metrics = json.loads((workdir / "report" / "test" / "metrics.json").read_text())
  with ocp.PyTreeCheckpointer() as ckptr:
    state = ckptr.restore(str(workdir / "checkpoints" / str(max(latest_steps(workdir))) / "state"))
  return metrics, state


def launcher_runs(tmp_path):
  """The launcher's fault runs; what the test below checks, recorded as they happen."""
  reference, workdir, data_dir = tmp_path / "reference", tmp_path / "work", tmp_path / "data"

  def faults():  # alongside the reference run: its own data_dir and workdir
    procs = [launch(workdir, data_dir, fault="build:20:SIGTERM"),
             launch(workdir, data_dir, fault="build:40:SIGKILL")]  # (f) in the middle of the build
    partial = glob.glob(str(data_dir / "synthetic_ct" / "*" / "1.0.0"))
    procs.append(launch(workdir, data_dir, fault="validation:1:SIGTERM"))  # rebuilds, then (b) at step 3
    return procs, partial, latest_steps(workdir)

  ref_proc, faulted_runs = concurrently(lambda: launch(reference, tmp_path / "data_reference"), faults)
  # Every checkpoint damaged (in a copy of this workdir).
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  for step in latest_steps(damaged):
    damage(str(damaged / "checkpoints" / str(step)), "missing metadata")
  resumed, failed = concurrently(lambda: launch(workdir, data_dir),
                                 lambda: launch(damaged, data_dir))
  return {"reference": (ref_proc, reference), "faults": faulted_runs, "resumed": (resumed, workdir),
          "damaged": (failed, damaged)}


def test_launcher_survives_a_killed_dataset_build_and_sigterm_in_validation(side_runs):
  runs = side_runs["launcher"].result()
  (ref_proc, reference), ((build_term, build_kill, validation), partial, validation_steps) = (runs["reference"],
                                                                                              runs["faults"])
  assert ref_proc.returncode == 0, ref_proc.stderr[-4000:]
  assert build_term.returncode == PREEMPTED, build_term.stderr[-4000:]
  assert "before training started" in build_term.stderr
  assert build_kill.returncode == -9
  assert not partial, "a partial build looks finished"
  assert validation.returncode == PREEMPTED, validation.stderr[-4000:]
  assert "StepAlreadyExists" not in validation.stderr and validation_steps == [3]

  proc, workdir = runs["resumed"]
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "at step 3." in proc.stderr  # "Resumed from ... at step 3."

  (metrics, state), (ref_metrics, ref_state) = launched_result(workdir), launched_result(reference)
  assert metrics == ref_metrics
  leaves, ref_leaves = (ocp.tree.to_flat_dict(s) for s in (state, ref_state))
  assert leaves.keys() == ref_leaves.keys()
  for key in leaves:
    np.testing.assert_array_equal(leaves[key], ref_leaves[key], err_msg=str(key))

  # Every checkpoint damaged: a clear error naming them, no traceback, exit 1 (not 143).
  failed, damaged = runs["damaged"]
  assert failed.returncode == 1, failed.stderr[-4000:]
  assert f"No intact checkpoint in {damaged / 'checkpoints'}" in failed.stderr
  assert f"step 3 at {damaged / 'checkpoints' / '3'}" in failed.stderr
  assert "Traceback" not in failed.stderr
