"""The pure steps of training and evaluation, and the state they carry.

As in the Flax ImageNet example, `train_step` / `meta_train_step` / `eval_step`
are module-level functions of (state, batch, ...) with the model, loss and
optimizer passed in by `functools.partial`, run under `jax.pmap(axis_name=AXIS)`
by `dsn_saal_jax.train` (and by tests and benchmarks, vmapped or pmapped).
Gradients and BatchNorm statistics are averaged over all devices of all
processes, so an N-device step equals a 1-device step on the same global batch.
The loss's own parameters (SAAL's raw alpha and beta, `params['saal']`;
Meta-Weight-Net's MLPs, `params['mwn']`; split off by `losses.split_params`)
are trained either with the network by its optimizer
(`config.meta.update_rule='joint'`, the paper's) or by `meta_train_step`'s
bilevel step on a held-out meta set (`'meta'`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsn_saal_jax import augment
from dsn_saal_jax import losses
from dsn_saal_jax import meta
from dsn_saal_jax import models
from dsn_saal_jax.models import AXIS, predict_probs


@flax.struct.dataclass
class TrainState:
  """What a step carries to the next; a checkpoint holds it, less a None `meta_opt_state` (`checkpointing`).

  `params`: the network's params plus the loss's own, if it has any (`losses.split_params`);
  `opt_state`: the optimizer's state of what it trains (all of `params`, or for update_rule='meta'
  the network's part only); `meta_opt_state`: update_rule='meta' only, the loss parameters' Adam.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  meta_opt_state: optax.OptState | None = None


# ----------------------------------------------------------------------------- state


def make_meta_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(config.meta.lr) for the meta-learned loss parameters.

  Adam, as Meta-Weight-Net's MW-Net.py (lr 1e-3), because the meta-gradient
  scales with the lookahead's learning rate (1e-3 here, 0.1 there) and Adam's
  step does not. Without their weight decay (1e-4): at our ~100x smaller
  meta-gradients it would dominate Adam's normalized step.
  """
  return optax.adam(config.meta.lr)


def init_variables(config: ml_collections.ConfigDict, model: nn.Module, image_shape, rng: jax.Array) -> dict:
  """Network variables: random (torchvision init), then ImageNet weights from `config.init_checkpoint`.

  The checkpoint is launch/convert_torchvision.py's or launch/pretrain.py's output; leaves it lacks
  (side branches, a new last Linear, a pretrained backbone's classifier) keep their random init.
  """
  pretrained = None
  if config.init_checkpoint:  # read (and checked against the config) before the init compiles
    from dsn_saal_jax import convert  # pylint: disable=g-import-not-at-top
    shape = {k: v for k, v in models.config_kwargs(config).items() if k != "dropout_rate"}
    pretrained = convert.load_pretrained(config.init_checkpoint, backbone=config.backbone,
                                         in_channels=int(image_shape[-1]), shape=shape)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  lowered = jax.jit(functools.partial(model.init, train=False)).lower({"params": rng}, x)
  # XLA:CPU spends most of a small run optimizing the one-off init program (~45 s at -O3 vs ~8 s).
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  variables = lowered.compile(compiler_options=options)({"params": rng}, x)
  if pretrained is not None:
    variables = convert.merge_pretrained(variables, pretrained, source=config.init_checkpoint)
  return jax.tree_util.tree_map(jnp.asarray, dict(variables))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, image_shape,
                       optimizer: optax.GradientTransformation, rng: jax.Array,
                       class_counts: np.ndarray | None = None) -> TrainState:
  """The initial state; `class_counts` (k_n) are needed by `config.loss_kwargs.saal.alpha_param='log10'`'s alpha."""
  model_rng, saal_rng = jax.random.split(rng)
  variables = init_variables(config, model, image_shape, model_rng)
  params = dict(variables["params"])
  if config.loss == "saal":
    params["saal"] = losses.init_saal_params(saal_rng, model.num_heads, config.loss_kwargs.saal.init_stddev,
                                             alpha_param=config.loss_kwargs.saal.alpha_param, class_counts=class_counts)
  elif config.loss == "mwn":
    params["mwn"] = losses.init_mwn_params(saal_rng, model.num_heads)
  if config.meta.update_rule == "meta":
    network, loss_params = losses.split_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=optimizer.init(network),
                      meta_opt_state=make_meta_optimizer(config).init(loss_params))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(params))


# ----------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: Mapping[str, jax.Array], dropout_rng: jax.Array, *,
               model: nn.Module, loss_fn: losses.LossFn, optimizer: optax.GradientTransformation,
               learning_rate_fn: optax.Schedule, alpha_param: str = "sigmoid",
               augment_policy: augment.Policy | None = None,
               seed: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's slice of the global batch; run under pmap(axis_name='batch').

  With `augment_policy` (config.augment) the images are augmented here, on device, by (seed, step, example).
  """
  # A fresh dropout key per step and per device (axis_index is global across processes).
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), jax.lax.axis_index(AXIS))
  images = batch["image"]
  if augment_policy is not None:
    images = augment.augment_batch(images, seed, state.step, jax.lax.axis_index(AXIS) * images.shape[0],
                                   augment_policy)

  def loss_of(params):
    network, loss_params = losses.split_params(params)
    heads, updates = model.apply(
        {"params": network, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    total, per_head = loss_fn(heads, batch["label"], loss_params)
    return total, (per_head, heads[-1], updates["batch_stats"])

  (total, (per_head, logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  if jax.lax.axis_size(AXIS) > 1:  # on one device the all-reduce is a 0.5 GB copy of the gradients
    grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": total, "loss_per_head": per_head,
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "learning_rate": learning_rate_fn(state.step)}
  if "saal" in state.params:
    metrics.update(saal_metrics(state.params["saal"], alpha_param))
  metrics = jax.lax.pmean(metrics, AXIS)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def meta_train_step(state: TrainState, batch: Mapping[str, jax.Array], dropout_rng: jax.Array, *,
                    model: nn.Module, loss_fn: losses.LossFn, meta_loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    optimizer: optax.GradientTransformation, meta_optimizer: optax.GradientTransformation,
                    learning_rate_fn: optax.Schedule, update_loss_params: bool = True, frozen: Sequence[str] = (),
                    alpha_param: str = "sigmoid") -> tuple[TrainState, dict[str, jax.Array]]:
  """The bilevel step (config.meta.update_rule='meta'); run under pmap(axis_name='batch') as `train_step`.

  With `update_loss_params`, first the loss's parameters phi (SAAL's raw
  alpha, beta; MW-Net's MLPs) take one `meta_optimizer` step on the gradient
  of `meta_loss_fn` (balanced CE of the final head on this step's meta batch,
  `batch['meta_image']`) at the lookahead theta' = theta - lr grad_theta
  L_train(theta; phi) (`meta.hypergradient`). Then the network takes its
  `optimizer` step on L_train(theta; phi_new), as `train_step` does. Entries
  of phi named in `frozen` keep their values. Meta-gradients are averaged
  over devices; the BatchNorm statistics of the lookahead's pass are
  dropped, those of the training batch kept. Steps between meta steps
  (config.meta.every_steps) are this function without
  `update_loss_params`, a program of its own: under `lax.cond` XLA:CPU ran
  the meta step ~3x slower (its branch copies the forward pass's residuals).
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), jax.lax.axis_index(AXIS))
  key = losses.loss_param_key(state.params)
  net, phi = losses.split_params(state.params)

  def forward(params):
    heads, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                                 mutable=["batch_stats"], rngs={"dropout": rng})
    return heads, updates["batch_stats"]

  def outer_loss(params):
    heads, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["meta_image"], train=True,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(rng, 1)})
    return meta_loss_fn(heads[-1], batch["meta_label"])

  heads, batch_stats, grad_fn = meta.linearize_training_loss(
      forward, net, lambda h, phi: loss_fn(h, batch["label"], phi)[0], AXIS)

  meta_opt_state, meta_loss = state.meta_opt_state, jnp.full((), jnp.nan, jnp.float32)
  if update_loss_params:
    meta_loss, grads = meta.hypergradient(grad_fn, net, phi, learning_rate_fn(state.step), outer_loss)
    grads = {k: jnp.zeros_like(g) if k in frozen else g for k, g in jax.lax.pmean(grads, AXIS).items()}
    updates, meta_opt_state = meta_optimizer.update(grads, meta_opt_state, phi)
    phi, meta_loss = optax.apply_updates(phi, updates), jax.lax.pmean(meta_loss, AXIS)
  total, per_head = loss_fn(heads, batch["label"], phi)
  updates, opt_state = optimizer.update(grad_fn(phi), state.opt_state, net)
  params = losses.merge_params(optax.apply_updates(net, updates), key, phi)
  metrics = {"loss": total, "loss_per_head": per_head,
             "accuracy": jnp.mean(jnp.argmax(heads[-1], -1) == batch["label"]),
             "learning_rate": learning_rate_fn(state.step), "meta_loss": meta_loss}
  if key == "saal":
    metrics.update(saal_metrics(phi, alpha_param))
  else:  # MW-Net's weights on the final head, summed per class (the host divides window sums)
    onehot = jax.nn.one_hot(batch["label"], heads[-1].shape[-1], dtype=jnp.float32)
    ce = -jnp.sum(onehot * jax.nn.log_softmax(heads[-1].astype(jnp.float32)), -1)
    final = jax.tree_util.tree_map(lambda p: p[-1:], phi)
    metrics["mwn_weight_sum"] = losses.mwn_weights(final, ce[None])[0] @ onehot
    metrics["class_count"] = jnp.sum(onehot, 0)
  metrics = jax.lax.pmean(metrics, AXIS)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                            meta_opt_state=meta_opt_state)
  return new_state, metrics


def saal_metrics(saal_params: Mapping[str, jax.Array], alpha_param: str) -> dict[str, jax.Array]:
  """alpha and beta_i of a step, and alpha's logit, from which the host computes the class weights exactly."""
  logit = losses.alpha_logit(saal_params["alpha"], alpha_param)
  return {"alpha": jax.nn.sigmoid(logit), "alpha_logit": logit, "beta": jax.nn.sigmoid(saal_params["beta"])}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module, loss_fn: losses.LossFn,
              eval_head: str) -> dict[str, jax.Array]:
  """Class probabilities and the masked loss sum of one eval batch (padding has mask 0)."""
  network, loss_params = losses.split_params(state.params)
  heads = model.apply({"params": network, "batch_stats": state.batch_stats}, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  total, _ = loss_fn(heads, batch["label"], loss_params, mask)
  return {"probs": predict_probs(heads, eval_head), "loss_sum": total * jnp.sum(mask)}


def is_meta_step(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether step `step` (0-based) updates the loss's parameters by the bilevel step."""
  return config.meta.update_rule == "meta" and step % config.meta.every_steps == 0


def make_train_step(config: ml_collections.ConfigDict, meta_counts: np.ndarray | None, model: nn.Module,
                    loss_fn: losses.LossFn, optimizer: optax.GradientTransformation,
                    learning_rate_fn: optax.Schedule, meta_step: bool = True) -> Callable:
  """`train_step`, or for config.meta.update_rule='meta' `meta_train_step` on the dataset's meta set (of
  `meta_counts` examples per class, `DataInfo.meta_counts`), updating the loss's parameters if `meta_step`
  (see `is_meta_step`)."""
  if config.meta.update_rule == "joint":
    if meta_counts is not None:
      raise ValueError("The dataset holds out a meta set, but config.meta.update_rule='joint' would not use it: "
                       "set update_rule='meta', or build the dataset without one (meta_fraction=0).")
    augmentation = {"augment_policy": augment.SUPERVISED, "seed": config.seed} if config.get("augment") else {}
    return functools.partial(train_step, model=model, loss_fn=loss_fn, optimizer=optimizer,
                             learning_rate_fn=learning_rate_fn, alpha_param=config.loss_kwargs.saal.alpha_param, **augmentation)
  if config.get("augment"):
    raise ValueError("config.augment=True is implemented for config.meta.update_rule='joint' only; turn one off.")
  if meta_counts is None:
    raise ValueError("config.meta.update_rule='meta' learns on a meta set, but the dataset holds none; build it "
                     "with ArrayDataset(..., meta_fraction=config.meta.fraction).")
  frozen = {"alpha_beta": (), "alpha": ("beta",), "beta": ("alpha",)}[config.meta.learn]
  return functools.partial(
      meta_train_step, model=model, loss_fn=loss_fn, meta_loss_fn=meta.balanced_ce(meta_counts),
      optimizer=optimizer, meta_optimizer=make_meta_optimizer(config), learning_rate_fn=learning_rate_fn,
      update_loss_params=meta_step, frozen=frozen if config.loss == "saal" else (),
      alpha_param=config.loss_kwargs.saal.alpha_param)
