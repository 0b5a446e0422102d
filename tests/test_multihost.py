"""Two processes joined by jax.distributed (CPU collectives over localhost) train like one process."""

import subprocess
import sys
import os

import numpy as np

from conftest import HERE, concurrently, free_port, multiprocess_env, run_worker

OVERRIDES = '{"num_train_steps": 3, "checkpoint_every_steps": 3, "log_every_steps": 1, "dropout_rate": 0.0}'


def test_two_processes_match_one_process(tmp_path):
  env = multiprocess_env()
  coordinator = f"localhost:{free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "train_worker.py"), "multihost", f"--workdir={tmp_path / 'multi'}",
       f"--out={tmp_path / 'multi'}", f"--overrides={OVERRIDES}", f"--coordinator={coordinator}",
       "--num_processes=2", f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  # The one-process run alongside the two: it overlaps their imports and compiles on a 2-core machine.
  outputs, single = concurrently(
      lambda: [p.communicate(timeout=900) for p in procs],
      lambda: run_worker(["train", f"--workdir={tmp_path / 'single'}", f"--out={tmp_path / 'single.npz'}",
                          f"--overrides={OVERRIDES}"], 1))
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
    assert "FINISHED 3" in out
  assert single.returncode == 0, single.stderr[-4000:]

  ref = np.load(tmp_path / "single.npz")
  for i in range(2):
    got = np.load(f"{tmp_path / 'multi'}.{i}.npz")
    assert sorted(got.files) == sorted(ref.files)
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=f"process {i}: {k}")
  assert int(ref["step"]) == 3
  # The checkpoint written jointly by both processes is complete and restorable.
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3"]
  metrics = (tmp_path / "multi" / "report" / "test" / "metrics.json").read_text()
  assert '"num_examples": 29' in metrics
