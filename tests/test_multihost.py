"""Two processes joined by jax.distributed (CPU collectives over localhost) train like one process."""

import json
import subprocess
import sys
import os

import numpy as np

from conftest import HERE, concurrently, free_port, multiprocess_env, run_worker

# Two epochs of 4 steps; logs, checkpoints and validation every 4: steps 1-3 and 5-7 are no boundary of any kind.
STEPS, EVERY = 8, 4
OVERRIDES = json.dumps({"num_train_steps": STEPS, "checkpoint_every_steps": EVERY, "log_every_steps": EVERY,
                        "model.dropout_rate": 0.0})


def syncs_after_each_step(out: str) -> dict[int, list[str]]:
  """{done: the cross-process syncs made after step `done` and before the next step}, from --record_syncs."""
  events = json.loads(next(line for line in out.splitlines() if line.startswith("SYNCS "))[len("SYNCS "):])
  syncs, done = {}, None
  for kind, value in events:
    if kind == "step":
      done = value + 1
      syncs[done] = []
    elif done is not None:
      syncs[done].append(value)
  return syncs


def test_two_processes_match_one_process(tmp_path):
  env = multiprocess_env()
  coordinator = f"localhost:{free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "train_worker.py"), "multihost", f"--workdir={tmp_path / 'multi'}",
       f"--out={tmp_path / 'multi'}", f"--overrides={OVERRIDES}", f"--coordinator={coordinator}",
       "--num_processes=2", f"--process_id={i}", "--record_syncs"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  # The one-process run alongside the two: it overlaps their imports and compiles on a 2-core machine.
  outputs, single = concurrently(
      lambda: [p.communicate(timeout=900) for p in procs],
      lambda: run_worker(["train", f"--workdir={tmp_path / 'single'}", f"--out={tmp_path / 'single.npz'}",
                          f"--overrides={OVERRIDES}"], 1))
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, err[-4000:]
    assert f"FINISHED {STEPS}" in out
    # No host round trip between boundaries; at a log/checkpoint boundary, one agreement on the SIGTERM flag.
    syncs = syncs_after_each_step(out)
    assert sorted(syncs) == list(range(1, STEPS + 1))
    for done, made in syncs.items():
      if done % EVERY:
        assert made == [], f"process {i}: cross-process syncs {made} after step {done}, no boundary"
      elif done < STEPS:
        assert made.count("preemption_flag") == 1, f"process {i} after step {done}: {made}"
  assert single.returncode == 0, single.stderr[-4000:]

  ref = np.load(tmp_path / "single.npz")
  for i in range(2):
    got = np.load(f"{tmp_path / 'multi'}.{i}.npz")
    assert sorted(got.files) == sorted(ref.files)
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=f"process {i}: {k}")
  assert int(ref["step"]) == STEPS
  # The checkpoint written jointly by both processes is complete and restorable.
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["4", "8"]
  metrics = (tmp_path / "multi" / "report" / "test" / "metrics.json").read_text()
  assert '"num_examples": 29' in metrics
