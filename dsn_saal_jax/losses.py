"""The self-adaptive auxiliary loss (SAAL, Eq. 5-10) and baselines with the same interface.

Every loss maps (heads, labels, saal_params, mask) to (total, per_head): `heads`
is the model's tuple of (B, C) logit arrays, `labels` (B,) integer classes,
`saal_params` the loss's own parameters (`params['saal']`, Meta-Weight-Net's
`params['mwn']`; ignored by the fixed losses) and
`mask` optional per-example weights (padded eval examples get 0). `total` is
the sum over heads of each head's batch mean (Eq. 2). All computation is in
at least float32 whatever the model's compute dtype (float64 when the model runs in it).

`make_loss` validates the class counts k_n once, outside any trace, and
returns a jit-compiled function with them baked in as constants.

The loss's own parameters live in the model's optax-trained params pytree,
under one top-level key (`LOSS_PARAM_KEYS`); `split_params` is the one place
that tells the network's part from the loss's (steps, optimizer masks,
checkpoints and prediction all use it). It lives here, below all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[..., tuple[jax.Array, jax.Array]]
LOSS_NAMES = ("saal", "ce", "focal", "cb", "sce", "la", "mwn")
LOSS_PARAM_KEYS = ("saal", "mwn")  # top-level entries of params that belong to the loss, not the network
ALPHA_PARAMS = ("sigmoid", "log10")
_LN10 = float(np.log(10.0))


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
  """(the network's params, the loss's own: `params['saal']` or `params['mwn']`, None for the fixed losses)."""
  key = loss_param_key(params)
  return {k: v for k, v in params.items() if k not in LOSS_PARAM_KEYS}, (params[key] if key else None)


def loss_param_key(params: Mapping[str, Any]) -> str | None:
  """The key of `params` that holds the loss's own parameters ('saal', 'mwn'), None if there is none."""
  return next((k for k in LOSS_PARAM_KEYS if k in params), None)


def merge_params(network: Mapping[str, Any], key: str | None, loss_params: Any) -> dict[str, Any]:
  """`split_params`'s inverse: the network's params with the loss's under `key` (none when `key` is None)."""
  return {**network, **({key: loss_params} if key is not None else {})}


def param_labels(params: Mapping[str, Any]) -> dict[str, Any]:
  """'network' or 'loss' for every leaf of `params` (e.g. for optax.masked or optax.multi_transform)."""
  return {k: jax.tree_util.tree_map(lambda _, label="loss" if k in LOSS_PARAM_KEYS else "network": label, v)
          for k, v in params.items()}


def init_saal_params(rng: jax.Array, num_heads: int, stddev: float = 1.0, *, alpha_param: str = "sigmoid",
                     class_counts: Sequence[float] | None = None) -> dict[str, jax.Array]:
  """Raw alpha and beta_1..num_heads; beta raw ~ N(0, stddev) as in Algorithm 1.

  alpha raw: `sigmoid` draws it N(0, stddev) too (Algorithm 1). There alpha^k_n
  ~ 0 for every class of more than a few dozen examples, so all w_n are equal
  and no gradient moves alpha. `log10` starts it deterministically at
  r = log10(max k_n), so 1 - alpha ~ 1/k_max: the effective number of the
  largest class is then ~0.63 k_max and of much smaller ones ~k_n, weights
  near inverse frequency on the scale where r's gradient is not zero. The
  seed still varies beta and the network.
  """
  a_rng, b_rng = jax.random.split(rng)
  if alpha_param == "log10":
    if class_counts is None:
      raise ValueError("alpha_param='log10' starts alpha from the largest class count; pass class_counts.")
    alpha = jnp.float32(np.log10(np.max(check_class_counts(class_counts))))
  elif alpha_param == "sigmoid":
    alpha = stddev * jax.random.normal(a_rng, (), jnp.float32)
  else:
    raise ValueError(f"alpha_param must be one of {', '.join(ALPHA_PARAMS)}, got {alpha_param!r}.")
  return {"alpha": alpha, "beta": stddev * jax.random.normal(b_rng, (num_heads,), jnp.float32)}


def alpha_logit(alpha_raw: jax.Array, alpha_param: str = "sigmoid") -> jax.Array:
  """log(alpha / (1 - alpha)) of the stored raw alpha, what the stable weight formula takes.

  `sigmoid`: the raw value itself (the paper's alpha = sigmoid(raw)). `log10`:
  the raw value is r with 1 - alpha = 10^-r / (1 + 10^-r), i.e. alpha =
  sigmoid(r ln 10). That is 1 - 10^-r to 1% once r >= 2 (alpha >= 0.99, Cui et
  al.'s sweep 0.9 ... 0.9999 is r = 1 ... 4) and, unlike 1 - 10^-r itself,
  stays in (0, 1) for every r, so no clipping leaves a region without gradient.
  A unit step in r is one decade of 1 - alpha.
  """
  if alpha_param == "sigmoid":
    return alpha_raw
  return alpha_raw * _LN10


def check_class_counts(class_counts: Sequence[float], class_names: Sequence[str] | None = None) -> np.ndarray:
  """k_n as a float32 vector; a class with fewer than one training example is an error."""
  counts = np.asarray(class_counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size < 2:
    raise ValueError(f"class_counts must be a vector with one count per class (>= 2 classes), got {class_counts!r}.")
  for n, k in enumerate(counts):
    if not k >= 1:
      name = f"class {n}" + (f" ({class_names[n]!r})" if class_names else "")
      raise ValueError(
          f"{name} has {k:g} training examples; every class needs at least 1 for the effective-number "
          "weights. Check the dataset split and the COVID fraction of the imbalance protocol.")
  return counts.astype(np.float32)


def effective_number_weights(alpha_raw: jax.Array, class_counts: jax.Array) -> jax.Array:
  """w_n = (1 - alpha) / (1 - alpha^k_n) with alpha = sigmoid(alpha_raw), without underflow.

  (1 - alpha) = sigmoid(-raw) and 1 - alpha^k = -expm1(k log sigmoid(raw)), so
  neither alpha^k (k ~ 1e5) nor 1 - alpha (alpha ~ 1) is ever formed directly.
  A class with k_n = 1 has w_n = 1 for every alpha; it is set exactly, so that
  rounding in the ratio leaves no spurious gradient on alpha.
  """
  w = jax.nn.sigmoid(-alpha_raw) / -jnp.expm1(class_counts * jax.nn.log_sigmoid(alpha_raw))
  return jnp.where(class_counts == 1, 1.0, w)


def saal_class_weights(alpha_raw: jax.Array, class_counts: jax.Array, normalize: bool) -> jax.Array:
  """The w_n SAAL applies: effective-number weights, optionally rescaled to sum to C."""
  w = effective_number_weights(alpha_raw, class_counts)
  return class_counts.shape[0] * w / jnp.sum(w) if normalize else w


def _check_shapes(heads: Sequence[jax.Array], labels: jax.Array, num_classes: int) -> None:
  if not heads:
    raise ValueError("The model returned no heads.")
  for i, h in enumerate(heads):
    if h.ndim != 2 or h.shape[0] != labels.shape[0] or h.shape[1] != num_classes:
      raise ValueError(
          f"Head {i} has logits of shape {h.shape}, but labels have shape {labels.shape} and there are "
          f"{num_classes} classes; expected ({labels.shape[0]}, {num_classes}) logits for (B,) labels.")
  if labels.ndim != 1:
    raise ValueError(f"Labels must be a (B,) vector of class indices, got shape {labels.shape}.")


def _reduce(per_example: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(per_example)
  mask = mask.astype(per_example.dtype)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _loss_dtype(heads: Sequence[jax.Array]):
  return jnp.promote_types(heads[0].dtype, jnp.float32)


def _sum_heads(per_head_fn, heads, labels, mask) -> tuple[jax.Array, jax.Array]:
  per_head = jnp.stack([
      _reduce(per_head_fn(i, h.astype(_loss_dtype(heads)), labels), mask) for i, h in enumerate(heads)])
  return jnp.sum(per_head), per_head


def saal_loss(heads: Sequence[jax.Array], labels: jax.Array, saal_params: Mapping[str, jax.Array],
              class_counts: jax.Array, mask: jax.Array | None = None, *, log_zero: float = -4.0,
              normalize_weights: bool = False, learn_alpha_beta: bool = True,
              alpha_param: str = "sigmoid") -> tuple[jax.Array, jax.Array]:
  """Eq. 10 per head (DCE + beta_i DRCE), summed over heads (Eq. 2); alpha as `alpha_logit` reads it."""
  num_classes = class_counts.shape[0]
  _check_shapes(heads, labels, num_classes)
  alpha_raw, beta_raw = saal_params["alpha"], saal_params["beta"]
  if beta_raw.shape != (len(heads),):
    raise ValueError(f"params['saal']['beta'] has shape {beta_raw.shape}, but the model has {len(heads)} heads.")
  if not learn_alpha_beta:
    alpha_raw, beta_raw = jax.lax.stop_gradient(alpha_raw), jax.lax.stop_gradient(beta_raw)
  dtype = _loss_dtype(heads)
  w = saal_class_weights(alpha_logit(alpha_raw.astype(dtype), alpha_param), jnp.asarray(class_counts, dtype),
                         normalize_weights)
  beta = jax.nn.sigmoid(beta_raw.astype(dtype))
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def per_head(i, logits, labels):
    logp = jax.nn.log_softmax(logits)
    w_y = w[labels]
    dce = -w_y * jnp.sum(onehot * logp, axis=-1)
    # Eq. 9 with log q = 0 on the label and A (= log_zero) elsewhere.
    drce = -log_zero * jnp.sum((1.0 - onehot) * w * jnp.exp(logp), axis=-1)
    return dce + beta[i] * drce

  return _sum_heads(per_head, heads, labels, mask)


def ce_loss(heads, labels, saal_params=None, class_counts=None, mask=None):
  """Plain cross-entropy on every head."""
  del saal_params
  num_classes = heads[0].shape[-1] if class_counts is None else class_counts.shape[0]
  _check_shapes(heads, labels, num_classes)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return _sum_heads(lambda i, z, y: -jnp.sum(onehot * jax.nn.log_softmax(z), -1), heads, labels, mask)


def focal_loss(heads, labels, saal_params=None, class_counts=None, mask=None, *, gamma: float = 2.0):
  """Softmax focal loss -(1 - p_y)^gamma log p_y (Lin et al. 2017)."""
  del saal_params
  num_classes = heads[0].shape[-1] if class_counts is None else class_counts.shape[0]
  _check_shapes(heads, labels, num_classes)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def per_head(i, z, y):
    logp_y = jnp.sum(onehot * jax.nn.log_softmax(z), -1)
    return -((-jnp.expm1(logp_y)) ** gamma) * logp_y

  return _sum_heads(per_head, heads, labels, mask)


def class_balanced_weights(class_counts: np.ndarray, beta_cb: float = 0.9999) -> np.ndarray:
  """Cui et al. (2019) weights (1 - b)/(1 - b^k_n), normalized to sum to C."""
  counts = np.asarray(class_counts, np.float64)
  w = -np.expm1(np.log(beta_cb)) / -np.expm1(counts * np.log(beta_cb))
  return (len(counts) * w / w.sum()).astype(np.float32)


def cb_loss(heads, labels, saal_params=None, class_counts=None, mask=None, *, beta: float = 0.9999):
  """Class-balanced cross-entropy with fixed effective-number weights."""
  del saal_params
  w = jnp.asarray(class_balanced_weights(np.asarray(class_counts), beta))
  _check_shapes(heads, labels, w.shape[0])
  onehot = jax.nn.one_hot(labels, w.shape[0], dtype=jnp.float32)
  return _sum_heads(lambda i, z, y: -w[y] * jnp.sum(onehot * jax.nn.log_softmax(z), -1), heads, labels, mask)


def sce_loss(heads, labels, saal_params=None, class_counts=None, mask=None, *,
             alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0):
  """Symmetric cross-entropy alpha CE + beta RCE (Wang et al. 2019), RCE with log 0 = A."""
  del saal_params
  num_classes = heads[0].shape[-1] if class_counts is None else class_counts.shape[0]
  _check_shapes(heads, labels, num_classes)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def per_head(i, z, y):
    logp = jax.nn.log_softmax(z)
    ce = -jnp.sum(onehot * logp, -1)
    rce = -log_zero * jnp.sum((1.0 - onehot) * jnp.exp(logp), -1)
    return alpha * ce + beta * rce

  return _sum_heads(per_head, heads, labels, mask)


def la_loss(heads, labels, saal_params=None, class_counts=None, mask=None, *, tau: float = 1.0):
  """Logit-adjusted cross-entropy (Menon et al. 2021): CE of z_n + tau log pi_n, pi_n = k_n / sum k.

  Only training adds the prior; predictions use the plain logits, which is
  what makes the rare classes' decision boundaries move.
  """
  del saal_params
  counts = np.asarray(class_counts, np.float64)
  log_prior = jnp.asarray(tau * np.log(counts / counts.sum()), jnp.float32)
  _check_shapes(heads, labels, counts.shape[0])
  onehot = jax.nn.one_hot(labels, counts.shape[0], dtype=jnp.float32)
  return _sum_heads(lambda i, z, y: -jnp.sum(onehot * jax.nn.log_softmax(z + log_prior), -1), heads, labels, mask)


MWN_HIDDEN = 100  # Shu et al.'s VNet(1, 100, 1)


def init_mwn_params(rng: jax.Array, num_heads: int, hidden: int = MWN_HIDDEN) -> dict[str, jax.Array]:
  """One Meta-Weight-Net MLP 1-hidden-1 per head, stacked; torch.nn.Linear's default U(+-1/sqrt(fan_in)) init."""
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  uniform = lambda key, shape, bound: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  return {"w1": uniform(k1, (num_heads, hidden), 1.0), "b1": uniform(k2, (num_heads, hidden), 1.0),
          "w2": uniform(k3, (num_heads, hidden), hidden**-0.5), "b2": uniform(k4, (num_heads,), hidden**-0.5)}


def mwn_weights(mwn_params: Mapping[str, jax.Array], per_example: jax.Array) -> jax.Array:
  """Example weights V_i(l) = sigmoid(w2 . relu(w1 l + b1) + b2) of per-example losses l, (heads, B)."""
  hidden = jax.nn.relu(per_example[..., None] * mwn_params["w1"][:, None, :] + mwn_params["b1"][:, None, :])
  return jax.nn.sigmoid(jnp.einsum("hbk,hk->hb", hidden, mwn_params["w2"]) + mwn_params["b2"][:, None])


def mwn_loss(heads, labels, mwn_params, class_counts=None, mask=None):
  """Meta-Weight-Net (Shu et al. 2019) on every head: mean of V_i(CE) * CE, V_i head i's MLP.

  As in MW-Net.py (`vnet(cost_v.data)`), the MLP reads the CE as a constant:
  the network's gradient is that of the weighted CE, and only the meta step
  (`config.meta.update_rule='meta'`) trains the MLP, through the lookahead. The
  weights are not renormalized per batch (their class-imbalance script does).
  """
  num_classes = heads[0].shape[-1] if class_counts is None else class_counts.shape[0]
  _check_shapes(heads, labels, num_classes)
  if mwn_params["b2"].shape != (len(heads),):
    raise ValueError(f"params['mwn'] has {mwn_params['b2'].shape[0]} MLPs, but the model has {len(heads)} heads.")
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def per_head(i, z, y):
    ce = -jnp.sum(onehot * jax.nn.log_softmax(z), -1)
    mlp = jax.tree_util.tree_map(lambda p: p[i:i + 1].astype(ce.dtype), mwn_params)
    return mwn_weights(mlp, jax.lax.stop_gradient(ce)[None])[0] * ce

  return _sum_heads(per_head, heads, labels, mask)


_LOSSES: dict[str, LossFn] = {
    "saal": saal_loss, "ce": ce_loss, "focal": focal_loss, "cb": cb_loss, "sce": sce_loss, "la": la_loss,
    "mwn": mwn_loss}


def make_loss(name: str, class_counts: Sequence[float], class_names: Sequence[str] | None = None,
              **options) -> LossFn:
  """A jit-compiled loss `(heads, labels, saal_params, mask=None) -> (total, per_head)`.

  `options` are the chosen loss's keyword options (e.g. `log_zero`,
  `normalize_weights`, `learn_alpha_beta` for SAAL, `gamma` for focal).
  """
  if name not in _LOSSES:
    raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
  counts = check_class_counts(class_counts, class_names)
  fn = _LOSSES[name]

  @jax.jit
  def loss(heads, labels, saal_params, mask=None):
    return fn(heads, labels, saal_params, counts, mask, **options)

  return loss


def make_loss_fn(config: Any, class_counts: np.ndarray, class_names: Sequence[str] | None = None) -> LossFn:
  """`make_loss` for a training config: `config.loss` with its options (`config.loss_kwargs[config.loss]`)."""
  options = dict(config.loss_kwargs.get(config.loss, {}))  # ce and mwn take none
  options.pop("init_stddev", None)  # SAAL's initialization (steps.create_train_state), not a loss option
  return make_loss(config.loss, class_counts, class_names, **options)
