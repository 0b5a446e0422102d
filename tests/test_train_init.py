"""The train state and step: `config.init_checkpoint` (launch/convert_torchvision.py's output), one compile,
bfloat16 compute, and an 8-device pmap'd step that equals a 1-device step (in a worker process, alongside)."""

from concurrent import futures

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import init_variables, run_worker
from dsn_saal_jax import config_lib, convert, losses, models, optim, runtime, steps as steps_lib
from helpers import tiny_config


def run_eight_devices(tmp):
  """tests/train_worker.py equiv with 8 CPU devices: the state after 3 steps pmapped over 8 devices and over 1."""
  out = tmp / "equiv.npz"
  return out, run_worker(["equiv", f"--out={out}"], 8)


@pytest.fixture(scope="module")
def eight_devices_started(tmp_path_factory):
  """run_eight_devices' future: the worker runs in a background thread, alongside this module's in-process tests
  (the first requests it; both are mostly single-threaded compiles on a 2-core machine)."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(run_eight_devices, tmp_path_factory.mktemp("eight_devices"))


def test_train_state_starts_from_the_converted_backbone(eight_devices_started, tmp_path):
  del eight_devices_started  # requested only to start the 8-device worker: it runs alongside these tests
  c = tiny_config()
  # A "pretrained" backbone + classifier: the baseline's variables without the last Linear.
  donor = models.get_model(c.backbone, num_classes=1000, dsn=False)
  donor_vars = init_variables(donor, (1, 32, 32, 1), seed=7)
  pretrained = jax.tree_util.tree_map(np.asarray, donor_vars)
  pretrained["params"].pop("fc8")
  pretrained["batch_stats"]["bn3_2"]["var"] = np.full_like(pretrained["batch_stats"]["bn3_2"]["var"], 2.5)
  convert.save_pretrained(tmp_path / "imagenet", pretrained)

  c.init_checkpoint = str(tmp_path / "imagenet")
  model = models.create_model(c, 3)
  opt = optim.make_optimizer(c, 4)
  state = steps_lib.create_train_state(c, model, (32, 32, 1), opt, jax.random.PRNGKey(0))
  got = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats})
  want = traverse_util.flatten_dict(pretrained)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg="/".join(key))
  # Side branches, the new 3-class fc8 and the SAAL scalars are the trainer's own.
  assert got[("params", "fc8", "kernel")].shape == (models.VGG16_TINY_HIDDEN, 3)
  assert ("params", "side1", "fc", "kernel") in got and ("params", "saal", "alpha") in got

  c.backbone, c.model.widths, c.model.hidden = "vgg16_bn", (8, 16, 16, 32, 64), models.VGG16_TINY_HIDDEN
  with pytest.raises(ValueError, match=r"imagenet does not fit the model: .*conv5_1/kernel has shape"):
    steps_lib.create_train_state(c, models.create_model(c, 3), (32, 32, 1), opt, jax.random.PRNGKey(0))


def test_train_step_compiles_once(caplog):
  """`runtime.replicate` lays the state out as the step's outputs are, so step 2 reuses step 1's program."""
  import functools
  c = tiny_config()
  model = models.create_model(c, 3)
  opt = optim.make_optimizer(c, 4)
  state = steps_lib.create_train_state(c, model, (32, 32, 1), opt, jax.random.PRNGKey(0))
  loss_fn = losses.make_loss_fn(c, np.array([8, 5, 3]))
  p_step = jax.pmap(functools.partial(steps_lib.train_step, model=model, loss_fn=loss_fn, optimizer=opt,
                                      learning_rate_fn=optim.make_lr_schedule(c, 4)),
                    axis_name=steps_lib.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
  n = jax.local_device_count()
  batch = {"image": np.zeros((n, 4, 32, 32, 1), np.float32), "label": np.zeros((n, 4), np.int32)}
  rstate = runtime.replicate(state)
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
  opt = optim.make_optimizer(c, 4)
  loss_fn = losses.make_loss_fn(c, np.array([8, 5, 3]))
  state = steps_lib.create_train_state(c, models.create_model(c, 3), (32, 32, 1), opt, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((1, 8, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(0, 3, (1, 8)).astype(np.int32)}
  results = {}
  for dtype in ("float32", "bfloat16"):
    c.compute_dtype = dtype
    step = jax.pmap(functools.partial(steps_lib.train_step, model=models.create_model(c, 3), loss_fn=loss_fn,
                                      optimizer=opt, learning_rate_fn=optim.make_lr_schedule(c, 4)),
                    axis_name=steps_lib.AXIS, in_axes=(0, 0, None))
    new_state, metrics = step(runtime.replicate(state), batch, jax.random.PRNGKey(1))
    results[dtype] = (runtime.unreplicate(new_state), runtime.unreplicate(metrics))
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


def test_eight_devices_equal_one_device_after_three_steps(eight_devices_started):
  """An 8-device pmap'd train step equals a 1-device step on the same global batch."""
  out, proc = eight_devices_started.result()
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
