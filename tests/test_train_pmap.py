"""An 8-device pmap'd train step equals a 1-device step on the same global batch."""

import numpy as np

from conftest import run_worker


def test_eight_devices_equal_one_device_after_three_steps(tmp_path):
  out = tmp_path / "equiv.npz"
  proc = run_worker(["equiv", f"--out={out}"], 8, tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert '"devices": 8' in proc.stdout
  r = np.load(out)
  keys = sorted(k.split(":", 1)[1] for k in r.files if k.startswith("one:"))
  assert any(k.startswith("params/saal/alpha") for k in keys)
  assert any(k.startswith("params/saal/beta") for k in keys)
  assert any(k.startswith("batch_stats/") for k in keys)
  moved = 0.0
  for k in keys:
    one, many, init = r[f"one:{k}"], r[f"many:{k}"], r[f"init:{k}"]
    np.testing.assert_allclose(many, one, atol=1e-5, rtol=1e-5, err_msg=k)
    if k.startswith(("params/", "batch_stats/")):
      moved = max(moved, float(np.max(np.abs(one - init))))
  # The three steps really changed the state, so agreement is not trivial.
  assert moved > 1e-2
  for k in ("params/saal/alpha", "params/saal/beta", "batch_stats/bn1_1/mean"):
    assert not np.allclose(r[f"one:{k}"], r[f"init:{k}"], atol=1e-6), k
  assert int(r["one:step"]) == 3
