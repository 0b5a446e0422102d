"""Checkpoints and configs written by the code of commit 6724e37 restore, predict and resume identically.

tests/fixtures/legacy_run/ holds two tiny runs' workdirs written by that code
(update_rule 'joint' and 'meta', whose state had its own `meta_opt_state`), and
expected.json what that code predicted from them and how it resumed; see
tests/fixtures/make_legacy_run.py (never rerun it to make this test pass). The
workdir is copied to tmp_path first: resuming writes checkpoints.

Tolerances: probabilities to rtol 1e-6 and the resumed run's losses and sums to
rtol 1e-6: the same float32 programs on the same inputs. Not bit-exact, since an
XLA version or CPU may fuse and reassociate differently (relative changes of
~1e-7); anything the refactor could break (a head, a weight left out or mapped
wrong, a BN statistic, a decay or optimizer state restored wrong) moves them by
orders of magnitude more.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from dsn_saal_jax import config_lib, runtime, train
from dsn_saal_jax.array_dataset import ArrayDataset
from dsn_saal_jax.predict import Predictor

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy_run")
with open(os.path.join(FIXTURE, "expected.json")) as _f:
  EXPECTED = json.load(_f)


def _inputs() -> np.ndarray:
  """The PNGs as make_legacy_run.to_input made them model inputs: png / 127.5 - 1."""
  pngs = [np.asarray(Image.open(os.path.join(FIXTURE, "inputs", n))) for n in EXPECTED["inputs"]]
  return np.stack([p.astype(np.float32)[..., None] / 127.5 - 1.0 for p in pngs])


def _run_config(workdir: str):
  """The run's config as its workdir's config.json records it (written in the schema before issue 28)."""
  return config_lib.load_saved(os.path.join(workdir, "config.json"))


def _dataset(config):
  """make_legacy_run's in-memory data (its `blobs`), rebuilt for the run's config in today's schema."""
  from fixtures import make_legacy_run  # pylint: disable=g-import-not-at-top
  blobs, meta = make_legacy_run.blobs, config.meta.update_rule == "meta"
  return ArrayDataset(blobs(16 + 8 * meta, 0), {"validation": blobs(8, 1), "test": blobs(8, 2)},
                      make_legacy_run.CLASSES, config.batch_size, config.eval_batch_size, seed=config.seed,
                      meta_fraction=config.meta.fraction if meta else 0.0)


def _tree_sum(tree) -> float:
  return float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)
                   if np.issubdtype(np.asarray(x).dtype, np.floating)))


@pytest.fixture(params=["joint", "meta"])
def legacy(request, tmp_path):
  workdir = str(tmp_path / "workdir")
  shutil.copytree(os.path.join(FIXTURE, request.param, "workdir"), workdir)
  return request.param, workdir


def test_legacy_checkpoints_predict_as_before(legacy):
  rule, workdir = legacy
  x = _inputs()
  for which in ("best", "latest"):
    probs = Predictor.from_workdir(workdir, which).predict_inputs(x)
    np.testing.assert_allclose(probs, EXPECTED[rule][which], rtol=1e-6, atol=1e-7, err_msg=f"{rule} {which}")


def test_legacy_checkpoints_resume_as_before(legacy):
  rule, workdir = legacy
  config = _run_config(workdir)
  want = EXPECTED[rule]["resume"]
  config.num_train_steps = EXPECTED["resume_steps"]
  history = os.path.join(workdir, runtime.HISTORY_FILE)
  with open(history) as f:
    before = f.read()
  final = train.train_and_evaluate(config, workdir, dataset=_dataset(config))
  with open(history) as f:  # resumed at step 4: a run from scratch would log steps 1-4 again
    assert all(json.loads(line)["step"] > 4 for line in f.read()[len(before):].splitlines())
  steps, losses = runtime.read_history(workdir)["train/loss"]
  resumed = {str(int(s)): float(v) for s, v in zip(steps, losses) if s > 4}
  assert int(final.step) == want["step"]
  assert sorted(resumed) == sorted(want["loss"])
  np.testing.assert_allclose([resumed[k] for k in sorted(resumed)], [want["loss"][k] for k in sorted(resumed)],
                             rtol=1e-6)
  got = {"params_sum": _tree_sum(final.params), "batch_stats_sum": _tree_sum(final.batch_stats)}
  if rule == "meta":  # the network's optimizer state, then the loss parameters' (Adam)
    got["opt_state_sum"] = _tree_sum(final.opt_state)
    got["meta_opt_state_sum"] = _tree_sum(final.meta_opt_state)
  else:
    got["opt_state_sum"] = _tree_sum(final.opt_state)
  np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(got)], rtol=1e-6)
