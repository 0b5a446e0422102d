"""`config.init_checkpoint`: the trainer starts from a converted checkpoint (launch/convert_torchvision.py)."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import init_variables
from dsn_saal_jax import config_lib, convert, train
from dsn_saal_jax.models import DSNVGG16BN
from train_worker import tiny_config


def test_train_state_starts_from_the_converted_backbone(tmp_path):
  c = tiny_config()
  # A "pretrained" backbone + classifier: the baseline's variables without the last Linear.
  donor = DSNVGG16BN(1000, dsn=False, widths=c.widths, hidden=c.hidden)
  donor_vars = init_variables(donor, (1, 32, 32, 1), seed=7)
  pretrained = jax.tree_util.tree_map(np.asarray, donor_vars)
  pretrained["params"].pop("fc8")
  pretrained["batch_stats"]["bn3_2"]["var"] = np.full_like(pretrained["batch_stats"]["bn3_2"]["var"], 2.5)
  convert.save_pretrained(tmp_path / "imagenet", pretrained)

  c.init_checkpoint = str(tmp_path / "imagenet")
  model = train.create_model(c, 3)
  opt = train.make_optimizer(c, 4)
  state = train.create_train_state(c, model, (32, 32, 1), opt, jax.random.PRNGKey(0))
  got = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats})
  want = traverse_util.flatten_dict(pretrained)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg="/".join(key))
  # Side branches, the new 3-class fc8 and the SAAL scalars are the trainer's own.
  assert got[("params", "fc8", "kernel")].shape == (c.hidden, 3)
  assert ("params", "side1", "fc", "kernel") in got and ("params", "saal", "alpha") in got

  c.widths = (8, 16, 16, 32, 64)
  with pytest.raises(ValueError, match=r"imagenet does not fit the model: .*conv5_1/kernel has shape"):
    train.create_train_state(c, train.create_model(c, 3), (32, 32, 1), opt, jax.random.PRNGKey(0))


def test_train_step_compiles_once(caplog):
  """`train.replicate` lays the state out as the step's outputs are, so step 2 reuses step 1's program."""
  import functools
  c = tiny_config()
  model = train.create_model(c, 3)
  opt = train.make_optimizer(c, 4)
  state = train.create_train_state(c, model, (32, 32, 1), opt, jax.random.PRNGKey(0))
  loss_fn = train.make_loss_fn(c, np.array([8, 5, 3]))
  p_step = jax.pmap(functools.partial(train.train_step, model=model, loss_fn=loss_fn, optimizer=opt,
                                      learning_rate_fn=train.make_lr_schedule(c, 4)),
                    axis_name=train.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
  n = jax.local_device_count()
  batch = {"image": np.zeros((n, 4, 32, 32, 1), np.float32), "label": np.zeros((n, 4), np.int32)}
  rstate = train.replicate(state)
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    for _ in range(3):
      rstate, metrics = p_step(rstate, batch, jax.random.PRNGKey(1))
    jax.block_until_ready(metrics)
  # pmap names its program jit(_fun); the batch's image shape picks out the train step's compilations.
  step_compiles = [r for r in caplog.records
                   if r.getMessage().startswith("Compiling") and f"float32[{n},4,32,32,1]" in r.getMessage()]
  assert len(step_compiles) == 1


def test_bfloat16_compute_keeps_float32_state_and_follows_float32():
  """Mixed precision: bf16 convs and matmuls, float32 parameters, BN statistics, loss and update."""
  import functools
  c = tiny_config()
  opt = train.make_optimizer(c, 4)
  loss_fn = train.make_loss_fn(c, np.array([8, 5, 3]))
  state = train.create_train_state(c, train.create_model(c, 3), (32, 32, 1), opt, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((1, 8, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(0, 3, (1, 8)).astype(np.int32)}
  results = {}
  for dtype in ("float32", "bfloat16"):
    c.compute_dtype = dtype
    step = jax.pmap(functools.partial(train.train_step, model=train.create_model(c, 3), loss_fn=loss_fn,
                                      optimizer=opt, learning_rate_fn=train.make_lr_schedule(c, 4)),
                    axis_name=train.AXIS, in_axes=(0, 0, None))
    new_state, metrics = step(train.replicate(state), batch, jax.random.PRNGKey(1))
    results[dtype] = (train.unreplicate(new_state), train.unreplicate(metrics))
  (s32, m32), (s16, m16) = results["float32"], results["bfloat16"]
  for leaf in jax.tree_util.tree_leaves((s16.params, s16.batch_stats, s16.opt_state, m16["loss"])):
    assert np.asarray(leaf).dtype in (np.float32, np.int32)
  assert abs(m16["loss"] - m32["loss"]) < 0.02 * abs(m32["loss"])
  # The parameter updates agree in direction (bf16 keeps ~3 significant digits).
  flat = lambda s: np.concatenate([np.ravel(np.asarray(x) - np.asarray(y)) for x, y in zip(
      jax.tree_util.tree_leaves(s.params), jax.tree_util.tree_leaves(state.params))])
  u32, u16 = flat(s32), flat(s16)
  assert np.dot(u32, u16) / np.linalg.norm(u32) / np.linalg.norm(u16) > 0.99
  assert np.max(np.abs(u16 - u32)) > 0  # bf16 really ran
  with pytest.raises(ValueError, match="compute_dtype"):
    c.compute_dtype = "float16"
    config_lib.validate_config(c, 1)
