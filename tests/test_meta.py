"""Learning the loss's own parameters: alpha's parametrization, the meta set and the bilevel (meta) step."""

import json
from concurrent import futures

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsn_saal_jax import checkpointing, config_lib, losses, meta, models, runtime, steps as steps_lib, train
from dsn_saal_jax.array_dataset import ArrayDataset

from conftest import run_worker


def test_alpha_param_and_update_rule_are_in_the_fingerprint_and_older_checkpoints_are_the_defaults():
  """A raw alpha means another alpha under the other parametrization, and update_rule='meta' states hold the
  meta optimizer's: resuming across either is refused; checkpoints from before both fields are sigmoid, joint."""
  sigmoid, log10 = config_lib.base_config(), config_lib.base_config()
  log10.loss_kwargs.saal.alpha_param, log10.meta.update_rule = "log10", "meta"
  old, new = checkpointing.model_fingerprint(sigmoid, 3), checkpointing.model_fingerprint(log10, 3)
  assert checkpointing.fingerprint_differences(old, new) == [
      "saal_alpha_param: checkpoint 'sigmoid' vs config 'log10'",
      "saal_update_rule: checkpoint 'joint' vs config 'meta'"]
  legacy = {k: v for k, v in old.items() if k not in ("saal_alpha_param", "saal_update_rule")}
  assert checkpointing.fingerprint_differences(legacy, old) == []
  sigmoid.loss = "mwn"
  assert checkpointing.fingerprint_differences(old, checkpointing.model_fingerprint(sigmoid, 3)) == [
      "loss_params: checkpoint True vs config 'mwn'"]
  log10.loss_kwargs.saal.alpha_param = "log"
  with pytest.raises(ValueError, match=r"config.loss_kwargs.saal.alpha_param='log' is not one of sigmoid, log10"):
    config_lib.validate_config(log10, 1)


# ----------------------------------------------------------------------------- the meta set

LABELS = np.array([0] * 200 + [1] * 30 + [2] * 9)
NAMES = ("normal", "pneumonia", "covid")


def test_meta_set_is_a_seeded_stratified_slice_held_out_of_training():
  train_pos, meta_pos = meta.meta_split(LABELS, 0.1, False, seed=0, class_names=NAMES)
  assert np.bincount(LABELS[meta_pos]).tolist() == [20, 3, 1]  # round(0.1 k_n): as imbalanced as training
  assert np.bincount(LABELS[train_pos]).tolist() == [180, 27, 8]
  assert not set(train_pos) & set(meta_pos) and len(train_pos) + len(meta_pos) == len(LABELS)
  np.testing.assert_array_equal(meta_pos, meta.meta_split(LABELS, 0.1, False, 0, NAMES)[1])
  assert not np.array_equal(meta_pos, meta.meta_split(LABELS, 0.1, False, 1, NAMES)[1])
  _, balanced = meta.meta_split(LABELS, 0.1, True, seed=0, class_names=NAMES)
  assert np.bincount(LABELS[balanced]).tolist() == [8, 8, 8]  # round(0.1 * 239 / 3) of every class


@pytest.mark.parametrize("fraction, balanced, message", [
    (0.0, False, r"config.meta.fraction=0.0 must be in \(0, 0.5\]"),
    (0.6, False, r"config.meta.fraction=0.6 must be in \(0, 0.5\]"),
    (0.05, False, r"leaves no meta example of class covid \(9 training examples\)"),
    (0.2, True, r"balanced: round\(0.2 \* 239 / 3\) = 16 of every class\) leaves no training example "
                r"of class covid \(9 examples, 16 for meta\); lower it or set config.meta.balanced=False"),
])
def test_meta_set_that_would_empty_a_class_is_refused_naming_it(fraction, balanced, message):
  with pytest.raises(ValueError, match=message):
    meta.meta_split(LABELS, fraction, balanced, 0, NAMES)


def test_meta_batches_are_a_function_of_the_step_and_cover_the_meta_set():
  """A meta set smaller than a batch repeats in it; every pass is a seeded permutation (resume sees the same)."""
  positions = np.concatenate([meta.meta_batch_positions(7, 4, seed=0, step=s) for s in range(7)])
  for start in range(0, 28, 7):
    assert sorted(positions[start:start + 7]) == list(range(7))
  np.testing.assert_array_equal(meta.meta_batch_positions(7, 4, 0, 5), positions[20:24])
  assert sorted(meta.meta_batch_positions(3, 8, 0, 0)[:3]) == [0, 1, 2]


def test_array_dataset_trains_without_the_meta_set_and_feeds_it_per_step():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(len(LABELS), 4, 4, 1)).astype(np.float32)
  images[:, 0, 0, 0] = np.arange(len(LABELS))  # the example's index, to follow it
  ds = ArrayDataset((images, LABELS), {}, NAMES, 16, 16, seed=0, meta_fraction=0.1)
  assert ds.info.class_counts.tolist() == [180, 27, 8] and ds.info.meta_counts.tolist() == [20, 3, 1]
  meta_ids = set(ds.meta_images[:, 0, 0, 0].astype(int))
  batches = [next(ds.train_iter(s)) for s in range(ds.info.steps_per_epoch)]
  seen = {int(i) for b in batches for i in b["image"][..., 0, 0, 0].ravel()}
  assert not seen & meta_ids
  assert {int(i) for b in batches for i in b["meta_image"][..., 0, 0, 0].ravel()} == meta_ids
  b = batches[3]
  assert b["meta_image"].shape == b["image"].shape and b["meta_label"].shape == b["label"].shape
  np.testing.assert_array_equal(next(ds.train_iter(3))["meta_label"], b["meta_label"])
  assert ArrayDataset((images, LABELS), {}, NAMES, 16, 16).info.meta_counts is None


# ----------------------------------------------------------------------------- the bilevel step's math


O0 = {"xla_backend_optimization_level": 0}  # XLA:CPU compiles these one-off programs ~2x faster; same values


@pytest.fixture(scope="module")
def tiny_f64():
  """A DSN-VGG with one conv per stage in float64, and its variables."""
  with jax.enable_x64(True):
    model = models.get_model("vgg16_bn", num_classes=2, stages=(1, 1, 1, 1, 1), widths=(2, 3, 3, 3, 3), hidden=8,
                             dropout_rate=0.0, dtype=jnp.float64, param_dtype=jnp.float64)
    x, key = np.zeros((1, 32, 32, 1)), jax.random.PRNGKey(0)
    return model, jax.jit(model.init).lower(key, x).compile(compiler_options=O0)(key, x)


@pytest.mark.parametrize("loss", ["saal", "mwn"])
def test_hypergradient_matches_float64_finite_differences_through_batchnorm_and_max_pool(meta_worker_started,
                                                                                       tiny_f64, loss):
  """d meta_loss(theta - lr grad_theta L_train(theta; phi)) / d phi against central differences, float64.

  The reference differentiates the whole forward pass directly (no shared VJP); the tiny DSN-VGG runs
  train-mode BatchNorm and 2x2 max pools, so grad-of-grad goes through both custom kernels.
  """
  del meta_worker_started  # requested only to start the worker first: it runs alongside these tests
  counts = (30, 6)
  model, variables = tiny_f64
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x, xm = rng.normal(size=(2, 4, 32, 32, 1))
    y, ym = np.array([0, 1, 0, 0]), np.array([1, 0, 1, 0])
    params, stats = variables["params"], variables["batch_stats"]
    if loss == "saal":
      phi = {"alpha": jnp.float64(1.2), "beta": jnp.linspace(-1.0, 1.0, 6)}
      loss_fn = losses.make_loss("saal", counts, normalize_weights=True, alpha_param="log10")
    else:
      phi = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), losses.init_mwn_params(jax.random.PRNGKey(1), 6))
      loss_fn = losses.make_loss("mwn", counts)
    apply = lambda p, images: model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                          mutable=["batch_stats"])[0]
    train_loss = lambda heads, f: loss_fn(heads, y, f)[0]
    outer_loss = lambda p: meta.balanced_ce((3, 1))(apply(p, xm)[-1], ym)
    lr = 0.5

    def hypergradient(f):
      _, _, grad_fn = meta.linearize_training_loss(lambda p: (apply(p, x), None), params, train_loss)
      return meta.hypergradient(grad_fn, params, f, lr, outer_loss)

    def reference(f):
      g = jax.grad(lambda p: train_loss(apply(p, x), f))(params)
      return outer_loss(jax.tree_util.tree_map(lambda p, d: p - lr * d, params, g))

    value, grads = jax.jit(hypergradient).lower(phi).compile(compiler_options=O0)(phi)
    ref = jax.jit(reference).lower(phi).compile(compiler_options=O0)
    assert abs(float(value) - float(ref(phi))) < 1e-12
    flat, unflatten = jax.flatten_util.ravel_pytree(phi)
    flat_grads = jax.flatten_util.ravel_pytree(grads)[0]
    coords = range(len(flat)) if loss == "saal" else [0, 150, 300, 450, 600, len(flat) - 1]  # w1, b1, w2, b2
    eps = 1e-5
    for i in coords:
      step = np.zeros(len(flat))
      step[i] = eps
      fd = (float(ref(unflatten(flat + step))) - float(ref(unflatten(flat - step)))) / (2 * eps)
      assert abs(float(flat_grads[i]) - fd) <= 1e-7 + 1e-5 * abs(fd), (i, float(flat_grads[i]), fd)
    assert float(jnp.max(jnp.abs(flat_grads))) > 1e-6  # the lookahead really carries phi's influence


def toy_blobs(n_majority: int, n_minority: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Two overlapping 2-D Gaussian blobs (unit variance, centres (0, 0) and (1.5, 1.5)); class 1 is the minority."""
  rng = np.random.default_rng(seed)
  x = np.concatenate([rng.normal(0.0, 1.0, (n_majority, 2)), rng.normal(1.5, 1.0, (n_minority, 2))])
  return x.astype(np.float32), np.r_[np.zeros(n_majority), np.ones(n_minority)].astype(np.int32)


def train_toy(update_rule: str, alpha_param: str, steps: int = 300, lr: float = 0.5) -> tuple[float, float]:
  """Logistic regression with SAAL (one head) on 400:20 blobs; (w_minority / w_majority, minority test recall).

  `meta` takes its lookahead on the training set and its meta loss on a balanced meta set of 25 + 25,
  as the trainer's meta_train_step does with Adam(0.05) on alpha, beta; `joint` trains them with the
  network by SGD (momentum 0.9), the paper's rule.
  """
  counts = (400, 20)
  (x, y), (xm, ym), (xt, yt) = toy_blobs(400, 20, 0), toy_blobs(25, 25, 1), toy_blobs(1000, 1000, 2)
  loss_fn = losses.make_loss("saal", counts, normalize_weights=True, alpha_param=alpha_param)
  logits = lambda theta, inputs: (inputs @ theta["w"] + theta["b"],)
  theta = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
  phi = losses.init_saal_params(jax.random.PRNGKey(0), 1, alpha_param=alpha_param, class_counts=counts)
  sgd, adam, meta_loss = optax.sgd(lr, momentum=0.9), optax.adam(0.05), meta.balanced_ce((25, 25))

  @jax.jit
  def joint_step(params, opt_state):
    grads = jax.grad(lambda p: loss_fn(logits(p, x), y, p["saal"])[0])(params)
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def meta_step(theta, phi, opt_state, meta_state):
    _, _, grad_fn = meta.linearize_training_loss(lambda t: (logits(t, x), None), theta,
                                                  lambda heads, f: loss_fn(heads, y, f)[0])
    _, grads = meta.hypergradient(grad_fn, theta, phi, lr, lambda t: meta_loss(logits(t, xm)[0], ym))
    updates, meta_state = adam.update(grads, meta_state, phi)
    phi = optax.apply_updates(phi, updates)
    updates, opt_state = sgd.update(grad_fn(phi), opt_state, theta)
    return optax.apply_updates(theta, updates), phi, opt_state, meta_state

  if update_rule == "joint":
    params = {**theta, "saal": phi}
    opt_state = sgd.init(params)
    for _ in range(steps):
      params, opt_state = joint_step(params, opt_state)
    theta, phi = {k: params[k] for k in theta}, params["saal"]
  else:
    opt_state, meta_state = sgd.init(theta), adam.init(phi)
    for _ in range(steps):
      theta, phi, opt_state, meta_state = meta_step(theta, phi, opt_state, meta_state)
  w = losses.saal_class_weights(losses.alpha_logit(phi["alpha"], alpha_param), jnp.asarray(counts, jnp.float32),
                                normalize=True)
  predicted = np.argmax(logits(theta, xt)[0], -1)
  return float(w[1] / w[0]), float(np.mean(predicted[yt == 1] == 1))


def test_meta_learned_log10_alpha_weights_the_minority_and_raises_its_recall():
  """20:1 blobs: the paper's joint rule leaves w_min/w_maj at 1 (sigmoid alpha's flat start); meta with log10
  alpha moves it from its start (13) to the inverse frequency (20) and the minority's recall from 0.5 to 0.8.

  (On this convex toy, joint with log10 alpha also reaches ~20: the normalized training loss itself falls
  when the class with 1/20 of the examples gains weight. The CPU study has to tell the rules apart.)
  """
  start = losses.saal_class_weights(losses.alpha_logit(jnp.log10(400.0), "log10"),
                                    jnp.asarray((400, 20), jnp.float32), normalize=True)
  joint_ratio, joint_recall = train_toy("joint", "sigmoid")
  meta_ratio, meta_recall = train_toy("meta", "log10")
  assert abs(joint_ratio - 1) < 0.01
  assert float(start[1] / start[0]) < 14 and meta_ratio > 19
  assert meta_recall > joint_recall + 0.2 and meta_recall > 0.75


# ----------------------------------------------------------------------------- the trainer's meta step


def run_meta_worker(tmp):
  """One 2-device worker process (tests/train_worker.py meta): the step on 2 devices and on 1, then a run
  uninterrupted and one preempted and resumed. XLA at -O0: these tiny programs compile ~2x faster."""
  flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
  return tmp, run_worker(["meta", f"--out={tmp / 'out.npz'}"], 2, env_extra={"XLA_FLAGS": flags})


@pytest.fixture(scope="module")
def meta_worker_started(tmp_path_factory):
  """run_meta_worker's future: the worker runs in a background thread, alongside this module's in-process
  tests (the float64 hypergradients and the toy meta run request it first), as both are mostly
  single-threaded compiles on a 2-core machine."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(run_meta_worker, tmp_path_factory.mktemp("meta"))


@pytest.fixture(scope="module")
def meta_worker(meta_worker_started):
  tmp, proc = meta_worker_started.result()
  assert proc.returncode == 0, proc.stderr[-4000:]
  return tmp, proc


def test_meta_step_on_two_devices_equals_one_device(meta_worker):
  """Meta-gradients pmean'd, BN statistics across devices: 3 steps (meta, plain, meta) agree."""
  r = np.load(meta_worker[0] / "out.npz.equiv.npz")
  keys = sorted(k.split(":", 1)[1] for k in r.files if k.startswith("one:"))
  assert "meta_opt_state/[0]/mu/alpha" in keys and int(r["one:meta_opt_state/[0]/count"]) == 2
  for k in keys:
    np.testing.assert_allclose(r[f"many:{k}"], r[f"one:{k}"], atol=1e-5, rtol=1e-5, err_msg=k)
  for k in ("params/saal/alpha", "params/saal/beta", "batch_stats/bn1_1/mean"):
    assert np.max(np.abs(r[f"one:{k}"] - r[f"init:{k}"])) > 1e-3, k


def test_meta_run_resumed_equals_uninterrupted_and_logs_the_learned_parameters(meta_worker):
  tmp, proc = meta_worker
  r = np.load(tmp / "out.npz")
  keys = sorted(k.split(":", 1)[1] for k in r.files if k.startswith("resumed:"))
  assert any(k.startswith("meta_opt_state/") for k in keys)
  for k in keys:
    np.testing.assert_array_equal(r[f"resumed:{k}"], r[f"uninterrupted:{k}"], err_msg=k)
  assert "PREEMPTED Preempted (SIGTERM) at step 4/6" in proc.stdout and "at step 4." in proc.stderr
  history = runtime.read_history(str(tmp / "out.npz.uninterrupted"))
  assert set(history) >= {"train/meta_loss", "train/alpha", "train/beta_6", "train/saal_weight_covid"}
  np.testing.assert_array_equal(history["train/meta_loss"][0], [2, 4, 6])
  report = json.loads((tmp / "out.npz.uninterrupted" / "report" / "test" / "metrics.json").read_text())
  assert report["meta_counts"] == {"normal": 3, "pneumonia": 2, "covid": 1}
  assert sum(report["train_counts"].values()) == 64 - 6


@pytest.mark.parametrize("loss, fields, message", [
    ("ce", {"meta.update_rule": "meta"}, r"update_rule='meta' meta-learns the loss's own parameters, but "
                                         r"config.loss='ce' has none; use loss=saal or mwn"),
    ("saal", {"meta.update_rule": "meta", "loss_kwargs.saal.learn_alpha_beta": False},
     r"learn_alpha_beta=False: alpha and beta are fixed"),
    ("mwn", {"meta.update_rule": "joint"}, r"config.loss='mwn' \(Meta-Weight-Net\) learns its weights on the meta "
                                           r"set only; set config.meta.update_rule='meta'"),
    ("saal", {"meta.update_rule": "bilevel"}, r"config.meta.update_rule='bilevel' is not one of joint, meta"),
    ("saal", {"meta.learn": "gamma"}, r"config.meta.learn='gamma' is not one of alpha_beta, alpha, beta"),
    ("saal", {"meta.every_steps": 0}, r"config.meta.every_steps must be a positive integer, got 0"),
    ("saal", {"meta.lr": 0.0}, r"config.meta.lr must be positive, got 0.0"),
    ("saal", {"meta.fraction": 0.75}, r"config.meta.fraction=0.75 must be in \(0, 0.5\]"),
])
def test_meta_config_that_cannot_learn_is_refused_naming_the_value(loss, fields, message):
  c = config_lib.base_config()
  c.loss = loss
  for path, v in fields.items():
    *parents, leaf = path.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = v
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c, 1)


def test_meta_rule_and_dataset_must_agree_on_a_meta_set():
  c = config_lib.base_config()
  images, labels = np.zeros((len(LABELS), 4, 4, 1), np.float32), LABELS
  with_meta = ArrayDataset((images, labels), {}, NAMES, 16, 16, meta_fraction=0.1).info
  without = ArrayDataset((images, labels), {}, NAMES, 16, 16).info
  with pytest.raises(ValueError, match=r"holds out a meta set, but config.meta.update_rule='joint' would not use it"):
    steps_lib.make_train_step(c, with_meta.meta_counts, None, None, None, None)
  c.meta.update_rule = "meta"
  with pytest.raises(ValueError, match=r"update_rule='meta' learns on a meta set, but the dataset holds none"):
    steps_lib.make_train_step(c, without.meta_counts, None, None, None, None)


def test_logged_window_has_the_meta_loss_of_meta_steps_and_mwn_weights_per_class():
  """meta_every_steps > 1: plain steps carry a NaN meta loss, left out; MW-Net's weights are window means."""
  fetched = [(0, {"meta_loss": np.float32(0.5), "mwn_weight_sum": np.array([2.0, 0.0, 1.5]),
                  "class_count": np.array([4.0, 0.0, 2.0])}),
             (1, {"meta_loss": np.float32(np.nan), "mwn_weight_sum": np.array([1.0, 0.0, 0.0]),
                  "class_count": np.array([4.0, 0.0, 0.0])})]
  assert train._meta_summaries(fetched, NAMES) == {
      "train/meta_loss": 0.5, "train/mwn_weight_normal": 3.0 / 8, "train/mwn_weight_covid": 0.75}


def test_a_joint_state_saves_without_meta_opt_state_and_a_meta_state_with_it(tmp_path):
  """One TrainState: its `meta_opt_state` (update_rule='meta') is None otherwise and then left out of the
  checkpoint, which keeps the tree of before (orbax refuses a target with an entry the checkpoint lacks, even
  None; test_legacy_checkpoint restores both kinds written before). Each restores into its own kind."""
  joint = steps_lib.TrainState(step=np.int32(3), params={"w": np.arange(2.0)}, batch_stats={"m": np.ones(2)},
                               opt_state=(np.full(2, 0.5),))
  meta_state = joint.replace(meta_opt_state=(np.full(1, 7.0),))
  for name, state in (("joint", joint), ("meta", meta_state)):
    ckpt = checkpointing.Checkpoints(str(tmp_path / name), {"model": name})
    ckpt.save(3, state)
    ckpt.wait()
    saved = set(ckpt.latest.item_metadata(3)["state"])
    extra = {"meta_opt_state"} if name == "meta" else set()
    assert saved == {"step", "params", "batch_stats", "opt_state"} | extra
    restored, _ = ckpt.restore(jax.tree_util.tree_map(np.zeros_like, state))
    ckpt.close()
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state), strict=True):
      np.testing.assert_array_equal(got, want)
    assert (restored.meta_opt_state is None) == (name == "joint")
