"""Meta-learning the loss's own parameters on a held-out slice of the training split.

The meta set is a seeded, class-stratified slice of the training examples a
run keeps (after `train_per_class` and `covid_fraction`), taken out of what the
network trains on; never validation (which selects checkpoints) nor test.
Batches of it are drawn by global step, so a resumed run sees the same ones.

The bilevel step (`steps.meta_train_step`) is built from the two pure
functions here: `linearize_training_loss` and `hypergradient`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Random streams of config.seed: input_pipeline uses 0-2 (subsampling, shuffling, per class).
_META_SPLIT_STREAM = 3
_META_SHUFFLE_STREAM = 4


def check_meta_fraction(fraction: float) -> None:
  if not 0.0 < fraction <= 0.5:
    raise ValueError(f"config.meta.fraction={fraction!r} must be in (0, 0.5]: the share of each class's "
                     "training examples held out as the meta set.")


def meta_split(labels: np.ndarray, fraction: float, balanced: bool, seed: int,
               class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(train positions, meta positions) into `labels`, each sorted; a seeded draw within each class.

  Stratified (default): round(fraction * k_n) meta examples of class n, so the
  meta set is as imbalanced as the training data. `balanced`: round(fraction *
  N / C) of every class, the same total split evenly, which takes a larger
  share of the minority. A class left with no meta or no training example is
  an error naming it.
  """
  check_meta_fraction(fraction)
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=len(class_names))
  if balanced:
    meta_counts = np.full(len(counts), round(fraction * len(labels) / len(counts)))
  else:
    meta_counts = np.array([round(fraction * k) for k in counts])
  how = (f"balanced: round({fraction} * {len(labels)} / {len(counts)}) = {meta_counts[0]} of every class"
         if balanced else "round(fraction * k_n) of each class")
  no_meta = [f"{name} ({k} training examples)" for name, k, m in zip(class_names, counts, meta_counts) if m < 1]
  if no_meta:
    raise ValueError(f"config.meta.fraction={fraction} ({how}) leaves no meta example of class "
                     f"{', '.join(no_meta)}; raise it or keep more examples of that class.")
  no_train = [f"{name} ({k} examples, {m} for meta)" for name, k, m in zip(class_names, counts, meta_counts)
              if m >= k]
  if no_train:
    hint = " or set config.meta.balanced=False." if balanced else "."
    raise ValueError(f"config.meta.fraction={fraction} ({how}) leaves no training example of class "
                     f"{', '.join(no_train)}; lower it{hint}")
  rng = np.random.default_rng([seed, _META_SPLIT_STREAM])
  meta = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == n), size=m, replace=False)
                                 for n, m in enumerate(meta_counts)]))
  return np.setdiff1d(np.arange(len(labels)), meta), meta


def meta_batch_positions(num_meta: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Positions in the meta set of global step `step`'s meta batch.

  Steps read consecutive stretches of one stream of seeded permutations of
  the meta set, so a meta set smaller than a batch simply repeats within it.
  """
  flat = step * batch_size + np.arange(batch_size)
  epochs, within = np.divmod(flat, num_meta)
  orders = {e: np.random.default_rng([seed, _META_SHUFFLE_STREAM, e]).permutation(num_meta)
            for e in np.unique(epochs)}
  return np.array([orders[e][i] for e, i in zip(epochs, within)], np.int64)


# ----------------------------------------------------------------------------- the bilevel step's math


def linearize_training_loss(forward: Callable[[Any], tuple[Any, Any]], params: Any,
                            train_loss: Callable[[Any, Any], jax.Array], axis_name: str | None = None
                            ) -> tuple[Any, Any, Callable[[Any], Any]]:
  """(heads, aux, grad_fn) from one forward pass: grad_fn(loss_params) = grad_theta L_train(theta; loss_params).

  `forward(params) -> (heads, aux)` is the network on the training batch;
  `train_loss(heads, loss_params)` the loss. The forward pass does not depend
  on the loss's parameters, so one VJP serves the lookahead (differentiated
  again through grad_fn with respect to loss_params) and the update with the
  new parameters after it. Under pmap the gradient is the mean over devices,
  so N devices equal one on the same global batch.
  """
  heads, vjp_fn, aux = jax.vjp(forward, params, has_aux=True)

  def grad_fn(loss_params: Any) -> Any:
    (grads,) = vjp_fn(jax.grad(train_loss)(heads, loss_params))
    if axis_name is not None and jax.lax.axis_size(axis_name) > 1:
      grads = jax.lax.pmean(grads, axis_name)
    return grads

  return heads, aux, grad_fn


def hypergradient(grad_fn: Callable[[Any], Any], params: Any, loss_params: Any, inner_lr: jax.Array,
                  outer_loss: Callable[[Any], jax.Array]) -> tuple[jax.Array, Any]:
  """(meta loss, its gradient in loss_params) after a one-step lookahead theta' = theta - inner_lr grad_fn(lp).

  The lookahead is plain SGD, without momentum or weight decay, as
  Meta-Weight-Net's reference code (`update_params(lr_inner=...)`, the
  network's current learning rate): the meta-gradient then depends only on
  this step's batch, not on the optimizer's history.
  """
  def objective(lp: Any) -> jax.Array:
    lookahead = jax.tree_util.tree_map(lambda p, g: p - inner_lr * g, params, grad_fn(lp))
    return outer_loss(lookahead)

  return jax.value_and_grad(objective)(loss_params)


def balanced_ce(meta_counts: Sequence[int]) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The meta loss: CE with class n weighted by C / (m_n sum_k 1/m_k), m_n its count in the meta set.

  Its expectation over the meta set is the mean over classes of each class's
  CE, so the minority counts as much as the majority whatever the meta set's
  imbalance (plain CE when config.meta.balanced gives equal counts).
  """
  inverse = 1.0 / np.asarray(meta_counts, np.float64)
  weights = jnp.asarray(len(inverse) * inverse / inverse.sum(), jnp.float32)

  def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return jnp.mean(-weights[labels] * jnp.take_along_axis(logp, labels[:, None], -1)[:, 0])

  return loss
