"""SAAL and baseline losses against independent NumPy/mpmath implementations of the paper's equations."""

import itertools

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from dsn_saal_jax import losses

mpmath.mp.dps = 40


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_weights(alpha_raw, counts, normalize=False):
  """Eq. 5 inverted, evaluated literally in 40-digit arithmetic."""
  alpha = 1 / (1 + mpmath.exp(-mpmath.mpf(float(alpha_raw))))
  w = np.array([float((1 - alpha) / (1 - alpha ** int(k))) for k in counts])
  return len(counts) * w / w.sum() if normalize else w


def ref_saal(heads, labels, alpha_raw, beta_raw, counts, log_zero=-4.0, normalize=False):
  """Eq. 10 per head with q one-hot and log 0 = A, batch mean, summed over heads (Eq. 2)."""
  w = ref_weights(alpha_raw, counts, normalize)
  total = 0.0
  for i, z in enumerate(heads):
    p = np_softmax(z)
    q = np.eye(len(counts))[labels]
    log_q = np.where(q > 0, 0.0, log_zero)
    dce = -np.sum(w * q * np.log(p), -1)
    drce = -np.sum(w * p * log_q, -1)
    beta = 1 / (1 + np.exp(-float(beta_raw[i])))
    total += np.mean(dce + beta * drce)
  return total


def random_problem(seed, num_classes, num_heads=6, batch=16):
  rng = np.random.RandomState(seed)
  heads = tuple(rng.randn(batch, num_classes).astype(np.float32) * 3 for _ in range(num_heads))
  labels = rng.randint(0, num_classes, batch)
  beta = rng.randn(num_heads).astype(np.float32)
  return heads, labels, beta


COUNTS = {2: [(1, 1), (5, 300_000), (300_000, 40)], 3: [(2674, 980, 1256), (1, 17, 300_000), (300_000, 300_000, 1)]}


@pytest.mark.parametrize("num_classes,counts,alpha_raw", [
    (c, k, a) for c in (2, 3) for k in COUNTS[c] for a in (-12.0, -1.0, 0.3, 4.0, 12.0)])
def test_saal_matches_reference(num_classes, counts, alpha_raw):
  heads, labels, beta = random_problem(num_classes * 7 + len(counts), num_classes)
  saal = {"alpha": jnp.float32(alpha_raw), "beta": jnp.asarray(beta)}
  for normalize in (False, True):
    loss_fn = losses.make_loss("saal", counts, normalize_weights=normalize)
    total, per_head = loss_fn(heads, labels, saal)
    expected = ref_saal(heads, labels, alpha_raw, beta, counts, normalize=normalize)
    np.testing.assert_allclose(float(total), expected, rtol=2e-5)
    assert per_head.shape == (6,)
    np.testing.assert_allclose(float(per_head.sum()), float(total), rtol=1e-6)


@pytest.mark.parametrize("counts,alpha_raw", itertools.product(
    [(1, 300_000), (3, 300_000, 12), (2674, 980, 1256)], [-15.0, -3.0, 0.0, 3.0, 15.0]))
def test_weights_stable_and_grad_signs(counts, alpha_raw):
  counts_arr = jnp.asarray(counts, jnp.float32)
  w = losses.effective_number_weights(jnp.float32(alpha_raw), counts_arr)
  np.testing.assert_allclose(np.asarray(w), ref_weights(alpha_raw, counts), rtol=1e-5)

  heads, labels, beta = random_problem(1, len(counts))
  loss_fn = losses.make_loss("saal", counts)
  grads = jax.grad(lambda s: loss_fn(heads, labels, s)[0])({"alpha": jnp.float32(alpha_raw), "beta": jnp.asarray(beta)})
  assert np.all(np.isfinite(grads["beta"])) and np.isfinite(grads["alpha"])
  # DRCE >= 0 with A < 0, so a larger beta always raises the loss.
  assert np.all(np.asarray(grads["beta"]) > 0)
  # w_n = (1-a)/(1-a^k) falls from 1 towards 1/k as alpha grows (k >= 2), so the loss falls too;
  # in float32 the slope underflows only where alpha is within 1e-6 of 0 or 1.
  if 0 < abs(alpha_raw) < 10:
    assert float(grads["alpha"]) < 0
  else:
    assert float(grads["alpha"]) <= 0


def test_alpha_grad_matches_finite_difference():
  counts = (300, 40, 7)
  heads, labels, beta = random_problem(3, 3)
  ref = lambda a: ref_saal(heads, labels, a, beta, counts)
  loss_fn = losses.make_loss("saal", counts)
  g = jax.grad(lambda s: loss_fn(heads, labels, s)[0])({"alpha": jnp.float32(0.7), "beta": jnp.asarray(beta)})
  fd = (ref(0.7 + 1e-4) - ref(0.7 - 1e-4)) / 2e-4
  np.testing.assert_allclose(float(g["alpha"]), fd, rtol=1e-3)


def test_fixed_alpha_beta_get_no_gradient():
  heads, labels, beta = random_problem(4, 2)
  loss_fn = losses.make_loss("saal", (10, 100), learn_alpha_beta=False)
  g = jax.grad(lambda s: loss_fn(heads, labels, s)[0])({"alpha": jnp.float32(0.1), "beta": jnp.asarray(beta)})
  assert float(g["alpha"]) == 0 and not np.any(np.asarray(g["beta"]))


def test_mask_excludes_padding():
  heads, labels, beta = random_problem(5, 3, batch=12)
  saal = {"alpha": jnp.float32(0.0), "beta": jnp.asarray(beta)}
  loss_fn = losses.make_loss("saal", (5, 6, 7))
  mask = np.r_[np.ones(8), np.zeros(4)].astype(np.float32)
  masked, _ = loss_fn(heads, labels, saal, mask)
  first8, _ = loss_fn(tuple(h[:8] for h in heads), labels[:8], saal)
  np.testing.assert_allclose(float(masked), float(first8), rtol=1e-6)


def test_baselines_match_reference():
  heads, labels, _ = random_problem(6, 3, num_heads=2)
  counts = (50, 500, 5000)
  onehot = np.eye(3)[labels]
  ref = {"ce": 0.0, "focal": 0.0, "cb": 0.0, "sce": 0.0}
  cb_w = (1 - 0.9999) / (1 - 0.9999 ** np.asarray(counts, np.float64))
  cb_w = 3 * cb_w / cb_w.sum()
  for z in heads:
    p = np_softmax(z)
    p_y = np.sum(onehot * p, -1)
    ref["ce"] += np.mean(-np.log(p_y))
    ref["focal"] += np.mean(-(1 - p_y) ** 2 * np.log(p_y))
    ref["cb"] += np.mean(-cb_w[labels] * np.log(p_y))
    ref["sce"] += np.mean(0.1 * -np.log(p_y) + 1.0 * 4.0 * (1 - p_y))
  for name, expected in ref.items():
    total, per_head = losses.make_loss(name, counts)(heads, labels, None)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5, err_msg=name)
    assert per_head.shape == (2,)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjusted_ce_matches_hand_formula(tau):
  """Menon et al. (2021) Eq. 11: CE of z_n + tau log pi_n on every head; tau = 0 is plain CE."""
  heads, labels, _ = random_problem(8, 3, num_heads=3)
  counts = (400, 20, 3)
  prior = np.asarray(counts, np.float64) / sum(counts)
  expected = sum(np.mean(-np.log(np_softmax(z + tau * np.log(prior))[np.arange(len(labels)), labels]))
                 for z in heads)
  total, per_head = losses.make_loss("la", counts, tau=tau)(heads, labels, None)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert per_head.shape == (3,)
  np.testing.assert_allclose(float(losses.make_loss("la", counts, tau=0.0)(heads, labels, None)[0]),
                             float(losses.make_loss("ce", counts)(heads, labels, None)[0]), rtol=1e-6)


def test_meta_weight_net_matches_hand_formula():
  """Per head i: mean of V_i(CE) * CE, V_i(l) = sigmoid(w2 . relu(w1 l + b1) + b2), each head its own MLP;
  the network's gradient treats V as a constant (MW-Net.py's vnet(cost.data))."""
  heads, labels, _ = random_problem(10, 3, num_heads=2)
  mwn = losses.init_mwn_params(jax.random.PRNGKey(4), 2)
  p = {k: np.asarray(v, np.float64) for k, v in mwn.items()}
  expected = 0.0
  for i, z in enumerate(heads):
    ce = -np.log(np_softmax(z)[np.arange(len(labels)), labels])
    hidden = np.maximum(ce[:, None] * p["w1"][i] + p["b1"][i], 0)
    v = 1 / (1 + np.exp(-(hidden @ p["w2"][i] + p["b2"][i])))
    expected += np.mean(v * ce)
  loss_fn = losses.make_loss("mwn", (50, 5, 9))
  total, per_head = loss_fn(heads, labels, mwn)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert per_head.shape == (2,) and mwn["w1"].shape == (2, 100)
  # d/dz of mean(V * CE) with V held fixed: V_b (softmax - onehot) / B.
  grad = jax.grad(lambda h: loss_fn((h, heads[1]), labels, mwn)[0])(heads[0])
  ce = -np.log(np_softmax(heads[0])[np.arange(len(labels)), labels])
  v = 1 / (1 + np.exp(-(np.maximum(ce[:, None] * p["w1"][0] + p["b1"][0], 0) @ p["w2"][0] + p["b2"][0])))
  expected_grad = v[:, None] * (np_softmax(heads[0]) - np.eye(3)[labels]) / len(labels)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match=r"params\['mwn'\] has 2 MLPs, but the model has 6 heads"):
    loss_fn(random_problem(10, 3)[0], labels, mwn)


@pytest.mark.parametrize("counts", [(0, 10), (10, 0, 3), (5, -1), (4.0, float("nan"))])
def test_class_count_below_one_names_the_class(counts):
  bad = next(i for i, k in enumerate(counts) if not k >= 1)
  with pytest.raises(ValueError, match=rf"class {bad} \('c{bad}'\) has .* training examples"):
    losses.make_loss("saal", counts, class_names=[f"c{i}" for i in range(len(counts))])


def test_shape_mismatch_is_reported():
  heads, labels, beta = random_problem(7, 3)
  loss_fn = losses.make_loss("saal", (5, 6, 7))
  saal = {"alpha": jnp.float32(0.0), "beta": jnp.asarray(beta)}
  with pytest.raises(ValueError, match=r"Head 0 has logits of shape \(16, 3\), but labels have shape \(15,\)"):
    loss_fn(heads, labels[:15], saal)
  with pytest.raises(ValueError, match=r"expected \(16, 2\) logits"):
    losses.make_loss("ce", (5, 6))(heads, labels, None)
  with pytest.raises(ValueError, match="beta'] has shape \\(6,\\), but the model has 2 heads"):
    loss_fn(heads[:2], labels, saal)
  with pytest.raises(ValueError, match="Unknown loss 'dice'"):
    losses.make_loss("dice", (5, 6))


@pytest.mark.parametrize("r", [0.5, 2.0, 3.7, 9.0])
def test_log10_alpha_is_one_minus_ten_to_the_minus_r(r):
  """alpha_param='log10' stores r with 1 - alpha = 10^-r / (1 + 10^-r): the loss equals Eq. 10 at that alpha."""
  counts = (3000, 150, 7)
  logit = losses.alpha_logit(jnp.float32(r), "log10")
  one_minus_alpha = 10.0**-r / (1 + 10.0**-r)
  assert abs(float(jax.nn.sigmoid(-logit)) / one_minus_alpha - 1) < 1e-5
  if r >= 2:  # the regime Cui et al. sweep: 1 - alpha is 10^-r to 1%
    assert abs(one_minus_alpha / 10.0**-r - 1) < 0.01
  heads, labels, beta = random_problem(9, 3)
  total, _ = losses.make_loss("saal", counts, alpha_param="log10")(heads, labels, {"alpha": jnp.float32(r),
                                                                                   "beta": jnp.asarray(beta)})
  alpha_raw = float(np.log1p(-one_minus_alpha) - np.log(one_minus_alpha))
  np.testing.assert_allclose(float(total), ref_saal(heads, labels, alpha_raw, beta, counts), rtol=2e-5)


def test_log10_alpha_starts_near_inverse_frequency_where_r_has_a_gradient():
  """r0 = log10(k_max): 1 - alpha ~ 1/k_max, weights near inverse frequency and d log(w_min/w_maj)/dr > 0;
  beta is drawn exactly as for sigmoid."""
  counts = (400, 20)
  key = jax.random.PRNGKey(3)
  log10 = losses.init_saal_params(key, 6, alpha_param="log10", class_counts=counts)
  sigmoid = losses.init_saal_params(key, 6)
  assert float(log10["alpha"]) == pytest.approx(np.log10(400))
  np.testing.assert_array_equal(log10["beta"], sigmoid["beta"])
  w = losses.saal_class_weights(losses.alpha_logit(log10["alpha"], "log10"), jnp.asarray(counts, jnp.float32),
                                normalize=True)
  assert 5 < float(w[1] / w[0]) < 20  # between uniform (1) and inverse frequency (20)
  log_ratio = lambda logit: jnp.log(jnp.divide(*losses.saal_class_weights(logit, jnp.asarray(counts, jnp.float32),
                                                                          True)[::-1]))
  assert float(jax.grad(lambda r: log_ratio(losses.alpha_logit(r, "log10")))(log10["alpha"])) > 0.3
  # The trap of the paper's init: raw ~ N(0, 1) gives uniform weights, and no gradient to leave them.
  assert float(log_ratio(sigmoid["alpha"])) < 1e-6 and float(jax.grad(log_ratio)(sigmoid["alpha"])) < 1e-6
  with pytest.raises(ValueError, match="alpha_param='log10' starts alpha from the largest class count"):
    losses.init_saal_params(key, 6, alpha_param="log10")


def test_init_saal_params_is_seeded_standard_normal():
  a = losses.init_saal_params(jax.random.PRNGKey(0), 6)
  b = losses.init_saal_params(jax.random.PRNGKey(0), 6)
  c = losses.init_saal_params(jax.random.PRNGKey(1), 6)
  assert a["alpha"].shape == () and a["beta"].shape == (6,)
  np.testing.assert_array_equal(a["beta"], b["beta"])
  assert not np.allclose(a["beta"], c["beta"])
  draws = losses.init_saal_params(jax.random.PRNGKey(2), 20000)["beta"]
  assert abs(float(draws.mean())) < 0.05 and abs(float(draws.std()) - 1) < 0.05
