"""Training and evaluation of DSN-SAAL: pmap'd steps, the loop, checkpoints and reports.

Layout follows the Flax ImageNet example: pure `train_step` / `eval_step`
functions wrapped in `jax.pmap` over the local devices (axis name `batch`),
and `train_and_evaluate(config, workdir)` that owns the loop. Gradients and
BatchNorm statistics are averaged over all devices of all processes, so an
N-device step equals a 1-device step on the same global batch. The loss's own
parameters (SAAL's raw alpha and beta, `params['saal']`; Meta-Weight-Net's
MLPs, `params['mwn']`) are trained either with the network by its optimizer
(`config.saal.update_rule='joint'`, the paper's) or by `meta_train_step`'s bilevel
step on a held-out meta set (`'meta'`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from dsn_saal_jax import augment
from dsn_saal_jax import checkpointing
from dsn_saal_jax import config_lib
from dsn_saal_jax import losses
from dsn_saal_jax import meta
from dsn_saal_jax import metrics as metrics_lib
from dsn_saal_jax import models
from dsn_saal_jax.models import predict_probs
from dsn_saal_jax.optim import make_lr_schedule, make_optimizer

AXIS = "batch"
HISTORY_FILE = "history.jsonl"
LOSS_PARAM_KEYS = ("saal", "mwn")  # entries of params that belong to the loss, not the network


class Preempted(RuntimeError):
  """Raised after SIGTERM once the checkpoint is saved; rerunning the same command resumes."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # network params plus the loss's own (params['saal'] or params['mwn']), if it has any.
  batch_stats: Any
  opt_state: optax.OptState


@flax.struct.dataclass
class MetaTrainState(TrainState):
  """The state of update_rule='meta': `opt_state` of the network's params alone, `meta_opt_state` of the loss's.

  A subclass, not an optional field, so that checkpoints of TrainState keep
  their exact tree (orbax refuses a target with an extra None entry).
  """
  meta_opt_state: optax.OptState


# ----------------------------------------------------------------------------- model, loss, state


def create_model(config: ml_collections.ConfigDict, num_classes: int, axis_name: str | None = AXIS) -> nn.Module:
  """The configured backbone (`config.backbone`), with side heads when `config.model == 'dsn'`."""
  return models.get_model(
      config.get("backbone", models.DEFAULT_BACKBONE), num_classes=num_classes, dsn=config.model == "dsn",
      fuse_channels=config.fuse_channels, axis_name=axis_name, dtype=jnp.dtype(config.compute_dtype),
      **models.config_kwargs(config))


def make_loss_fn(config: ml_collections.ConfigDict, class_counts: np.ndarray, class_names=None) -> losses.LossFn:
  options = {
      "saal": dict(log_zero=config.saal.log_zero, normalize_weights=config.saal.normalize_weights,
                   learn_alpha_beta=config.saal.learn_alpha_beta, alpha_param=config.saal.alpha_param),
      "ce": {}, "focal": dict(gamma=config.focal_gamma), "cb": dict(beta_cb=config.cb_beta),
      "sce": dict(alpha=config.sce_alpha, beta=config.sce_beta), "la": dict(tau=config.la_tau), "mwn": {},
  }[config.loss]
  return losses.make_loss(config.loss, class_counts, class_names, **options)


def model_fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """What a checkpoint must agree on to be restored into this config's state."""
  shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in models.config_kwargs(config).items()
           if k != "dropout_rate"}
  return {"backbone": config.backbone, "model": config.model, "num_classes": int(num_classes),
          "channels": int(config.channels), **shape, "fuse_channels": int(config.fuse_channels),
          "loss_params": "mwn" if config.loss == "mwn" else config.loss == "saal",
          "saal_alpha_param": config.saal.alpha_param, "saal_update_rule": config.saal.update_rule}


def network_params(params: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in params.items() if k not in LOSS_PARAM_KEYS}


def loss_params(params: Mapping[str, Any]) -> Any:
  """The loss's own parameters in `params` (None for the fixed losses)."""
  return next((params[k] for k in LOSS_PARAM_KEYS if k in params), None)


def make_meta_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(config.saal.meta_lr) for the meta-learned loss parameters.

  Adam, as Meta-Weight-Net's MW-Net.py (lr 1e-3), because the meta-gradient
  scales with the lookahead's learning rate (1e-3 here, 0.1 there) and Adam's
  step does not. Without their weight decay (1e-4): at our ~100x smaller
  meta-gradients it would dominate Adam's normalized step.
  """
  return optax.adam(config.saal.meta_lr)


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
  """The initial state; `class_counts` (k_n) are needed by `config.saal.alpha_param='log10'`'s alpha."""
  model_rng, saal_rng = jax.random.split(rng)
  variables = init_variables(config, model, image_shape, model_rng)
  params = dict(variables["params"])
  if config.loss == "saal":
    params["saal"] = losses.init_saal_params(saal_rng, model.num_heads, config.saal.init_stddev,
                                             alpha_param=config.saal.alpha_param, class_counts=class_counts)
  elif config.loss == "mwn":
    params["mwn"] = losses.init_mwn_params(saal_rng, model.num_heads)
  if config.saal.update_rule == "meta":
    return MetaTrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                          opt_state=optimizer.init(network_params(params)),
                          meta_opt_state=make_meta_optimizer(config).init(loss_params(params)))
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
    heads, updates = model.apply(
        {"params": network_params(params), "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    total, per_head = loss_fn(heads, batch["label"], loss_params(params))
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


def meta_train_step(state: MetaTrainState, batch: Mapping[str, jax.Array], dropout_rng: jax.Array, *,
                    model: nn.Module, loss_fn: losses.LossFn, meta_loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    optimizer: optax.GradientTransformation, meta_optimizer: optax.GradientTransformation,
                    learning_rate_fn: optax.Schedule, update_loss_params: bool = True, frozen: Sequence[str] = (),
                    alpha_param: str = "sigmoid") -> tuple[MetaTrainState, dict[str, jax.Array]]:
  """The bilevel step (config.saal.update_rule='meta'); run under pmap(axis_name='batch') as `train_step`.

  With `update_loss_params`, first the loss's parameters phi (SAAL's raw
  alpha, beta; MW-Net's MLPs) take one `meta_optimizer` step on the gradient
  of `meta_loss_fn` (balanced CE of the final head on this step's meta batch,
  `batch['meta_image']`) at the lookahead theta' = theta - lr grad_theta
  L_train(theta; phi) (`meta.hypergradient`). Then the network takes its
  `optimizer` step on L_train(theta; phi_new), as `train_step` does. Entries
  of phi named in `frozen` keep their values. Meta-gradients are averaged
  over devices; the BatchNorm statistics of the lookahead's pass are
  dropped, those of the training batch kept. Steps between meta steps
  (config.saal.meta_every_steps) are this function without
  `update_loss_params`, a program of its own: under `lax.cond` XLA:CPU ran
  the meta step ~3x slower (its branch copies the forward pass's residuals).
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), jax.lax.axis_index(AXIS))
  key = next(k for k in LOSS_PARAM_KEYS if k in state.params)
  net = network_params(state.params)

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

  phi, meta_opt_state, meta_loss = state.params[key], state.meta_opt_state, jnp.full((), jnp.nan, jnp.float32)
  if update_loss_params:
    meta_loss, grads = meta.hypergradient(grad_fn, net, phi, learning_rate_fn(state.step), outer_loss)
    grads = {k: jnp.zeros_like(g) if k in frozen else g for k, g in jax.lax.pmean(grads, AXIS).items()}
    updates, meta_opt_state = meta_optimizer.update(grads, meta_opt_state, phi)
    phi, meta_loss = optax.apply_updates(phi, updates), jax.lax.pmean(meta_loss, AXIS)
  total, per_head = loss_fn(heads, batch["label"], phi)
  updates, opt_state = optimizer.update(grad_fn(phi), state.opt_state, net)
  params = {**optax.apply_updates(net, updates), key: phi}
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
  heads = model.apply({"params": network_params(state.params), "batch_stats": state.batch_stats},
                      batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  total, _ = loss_fn(heads, batch["label"], loss_params(state.params), mask)
  return {"probs": predict_probs(heads, eval_head), "loss_sum": total * jnp.sum(mask)}


def is_meta_step(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether step `step` (0-based) updates the loss's parameters by the bilevel step."""
  return config.saal.update_rule == "meta" and step % config.saal.meta_every_steps == 0


def make_train_step(config: ml_collections.ConfigDict, info, model: nn.Module, loss_fn: losses.LossFn,
                    optimizer: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
                    meta_step: bool = True) -> Callable:
  """`train_step`, or for config.saal.update_rule='meta' `meta_train_step` on the dataset's meta set (`info`),
  updating the loss's parameters if `meta_step` (see `is_meta_step`)."""
  meta_counts = getattr(info, "meta_counts", None)
  if config.saal.update_rule == "joint":
    if meta_counts is not None:
      raise ValueError("The dataset holds out a meta set, but config.saal.update_rule='joint' would not use it: "
                       "set update_rule='meta', or build the dataset without one (meta_fraction=0).")
    augmentation = {"augment_policy": augment.SUPERVISED, "seed": config.seed} if config.get("augment") else {}
    return functools.partial(train_step, model=model, loss_fn=loss_fn, optimizer=optimizer,
                             learning_rate_fn=learning_rate_fn, alpha_param=config.saal.alpha_param, **augmentation)
  if config.get("augment"):
    raise ValueError("config.augment=True is implemented for config.saal.update_rule='joint' only; turn one off.")
  if meta_counts is None:
    raise ValueError("config.saal.update_rule='meta' learns on a meta set, but the dataset holds none; build it "
                     "with ArrayDataset(..., meta_fraction=config.saal.meta_fraction).")
  frozen = {"alpha_beta": (), "alpha": ("beta",), "beta": ("alpha",)}[config.saal.meta_learn]
  return functools.partial(
      meta_train_step, model=model, loss_fn=loss_fn, meta_loss_fn=meta.balanced_ce(meta_counts),
      optimizer=optimizer, meta_optimizer=make_meta_optimizer(config), learning_rate_fn=learning_rate_fn,
      update_loss_params=meta_step, frozen=frozen if config.loss == "saal" else (),
      alpha_param=config.saal.alpha_param)


# ----------------------------------------------------------------------------- helpers


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """`tree` copied to every local device, laid out exactly as pmap outputs are.

  The mesh axis must carry the steps' name: with any other (flax's
  `replicate`, or none), the second step, fed the first step's outputs,
  compiles the whole train step again.
  """
  n = len(devices) if devices else jax.local_device_count()
  stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), tree)
  return jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)(stacked)


def unreplicate(tree: Any) -> Any:
  """Host copy of device 0's replica (flax's `unreplicate` keeps the device axis on a 1-device mesh)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(jax.device_get(x.addressable_shards[0].data)).reshape(x.shape[1:]), tree)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize`, with CPU collectives (gloo) so CPU-only clusters and tests work too.

  Without arguments, JAX auto-detects Cloud TPU pods and SLURM jobs.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  if jax.default_backend() == "cpu":
    logging.warning(
        "jax.distributed joined %d processes, but JAX found only CPUs: each host trains on its CPU cores. For "
        "GPUs or TPUs install JAX's build for them (pip install -e '.[cuda12]' or '.[tpu]').", jax.process_count())


def log_backend() -> None:
  """One line naming the platform and devices JAX found (a CPU-only JAX on a GPU machine shows here)."""
  count, local = jax.device_count(), jax.local_device_count()
  kinds = ", ".join(sorted({d.device_kind for d in jax.local_devices()}))
  logging.info("JAX backend %s: %d device%s%s (%sprocess %d of %d).", jax.default_backend(), count,
               "" if count == 1 else "s", f", {local} in this process" if local != count else "",
               "" if jax.default_backend() == "cpu" else f"{kinds}; ", jax.process_index(), jax.process_count())


# Training work, in FLOPs, from which a config is GPU/TPU scale: 3x XLA's count of one example's forward pass
# (forward and backward), times the examples training sees. 1e15 is about a day at the ~13 GFLOP/s at which
# configs/default.py trains on 2 CPU cores, a few hours on 16; the paper configs (VGG16-BN at 224 px, 30 GFLOPs
# an image, 120 epochs) need ~5e15 on COVID19-CT's 425 training slices and more on the other sets.
CPU_SCALE_FLOPS = 1e15


def training_flops(config: ml_collections.ConfigDict, model: nn.Module, variables: Any, image_shape,
                   total_steps: int) -> float | None:
  """Estimated FLOPs of a whole training run (see CPU_SCALE_FLOPS); None if XLA gives no count.

  `variables` may be `jax.ShapeDtypeStruct`s: only the forward pass is traced, nothing is compiled.
  """
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  cost = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x).cost_analysis()
  if not cost or "flops" not in cost:
    return None
  return 3.0 * float(cost["flops"]) * total_steps * config.batch_size


def _warn_if_gpu_scale_on_cpu(config: ml_collections.ConfigDict, run: _Run, state: TrainState) -> None:
  """A warning when only CPUs train a GPU/TPU-scale config; costs a trace of the forward pass (~0.5 s)."""
  if jax.default_backend() != "cpu":
    return
  variables = {"params": network_params(state.params), "batch_stats": state.batch_stats}
  flops = training_flops(config, create_model(config, run.num_classes, axis_name=None), variables,
                         run.dataset.info.image_shape, run.total_steps)
  if flops is not None and flops > CPU_SCALE_FLOPS:
    logging.warning(
        "This config is GPU/TPU scale (training takes ~%.0e FLOPs, over %.0e), but JAX found only CPUs. Install "
        "JAX's build for your accelerator (pip install -e '.[cuda12]' or '.[tpu]'), or train a CPU-sized config "
        "such as configs/covid19_ct_cpu.py.", flops, CPU_SCALE_FLOPS)


def _any_process(flag: bool) -> bool:
  """`flag` of any process: a cross-process allgather (a host round trip) with several processes."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class _Preemption:
  """SIGTERM handling: raise at once while nothing needs saving, else record it for the next step boundary.

  Outside `deferred()` (building the dataset, compiling, restoring) a SIGTERM
  raises `Preempted` where the program is: nothing is half-written there, and a
  dataset build left unfinished is rebuilt on the next run. Inside it (the
  training loop and the final report) the loop saves a checkpoint at the next
  step boundary (`stop_after`) and then raises.

  With several processes the one that got the signal must not stop alone, so
  the flag is agreed by all (an allgather), but only at the steps where the
  loop waits for the device anyway (`stop_after`'s `boundary`: log and
  checkpoint steps); steps in between dispatch without any host round trip.
  JAX's own `multihost_utils.reached_preemption_sync_point` is not used: it
  takes SIGTERM through the coordination service's C handler, which the Python
  handler here (needed to stop before training and during the report) replaces.
  """

  def __init__(self):
    self.requested = False
    self._deferred = False
    self._previous = None

  def __enter__(self):
    if hasattr(signal, "SIGTERM"):
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: the caller handles signals.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if not self._deferred:
      raise Preempted("Preempted (SIGTERM) before training started; nothing new to save. Rerun the same "
                      "command to resume.")
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then stopping.")

  def stop_after(self, done: int, total: int, boundary: bool) -> bool:
    """Whether training stops (saving) after step `done`: this process's flag with one process, else
    the flag of any process, exchanged at `boundary` steps only. Never after the last step (the report runs)."""
    if done >= total:
      return False
    if jax.process_count() == 1:
      return self.requested
    return boundary and _any_process(self.requested)

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    self._deferred = True
    try:
      yield
    finally:
      self._deferred = False

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def itstime(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, evaluate, save) is due after `done` of `total` steps; always at the end."""
  return (every > 0 and done % every == 0) or done == total


class _MetricBuffer:
  """Device metrics of recent steps, fetched in one transfer when a log, save or epoch end needs them.

  Dispatch stays async in between. Each fetched step is checked for a finite
  loss, then kept for two readers: the logged window (TensorBoard,
  history.jsonl) and the epoch's console line.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._device: list[tuple[int, Any]] = []
    self._window: list[tuple[int, dict[str, np.ndarray]]] = []
    self._epoch: list[tuple[int, dict[str, np.ndarray]]] = []

  def add(self, step: int, metrics) -> None:
    self._device.append((step, metrics))

  def fetch(self, last_good: int | None) -> None:
    # Device 0's replica of every buffered step in one device_get: its copies overlap, one wait in all.
    first = [jax.tree_util.tree_map(lambda x: x.addressable_data(0), m) for _, m in self._device]
    fetched = [(s, jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(x.shape[1:]), m))
               for (s, _), m in zip(self._device, jax.device_get(first))]
    self._device = []
    for step, m in fetched:
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(
            f"The training loss became {m['loss']} at step {step}; training stopped. The last good checkpoint "
            f"(step {last_good}) in {self.workdir}/checkpoints is kept. Lower config.learning_rate, check the "
            "input data for NaN/inf, or (SAAL) try --config.saal.normalize_weights=true.")
    self._window += fetched
    self._epoch += fetched

  def take_window(self, last_good: int | None) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The steps since the last logged window."""
    self.fetch(last_good)
    taken, self._window = self._window, []
    return taken

  def take_epoch(self, last_good: int | None) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The steps since the last epoch line (since the start, for the first epoch of a resumed run)."""
    self.fetch(last_good)
    taken, self._epoch = self._epoch, []
    return taken


def _summaries(fetched: list[tuple[int, dict[str, np.ndarray]]], num_heads: int) -> dict[str, float]:
  mean = lambda k: float(np.mean([m[k] for _, m in fetched], axis=0))
  out = {"train/loss": mean("loss"), "train/accuracy": mean("accuracy"),
         "train/learning_rate": float(fetched[-1][1]["learning_rate"])}
  per_head = np.mean([m["loss_per_head"] for _, m in fetched], axis=0)
  names = [f"side{i}" for i in range(1, num_heads)] + ["final"]
  out.update({f"train/loss_{n}": float(v) for n, v in zip(names, per_head)})
  last = fetched[-1][1]
  if "alpha" in last:
    out["train/alpha"] = float(last["alpha"])
    out.update({f"train/beta_{i}": float(b) for i, b in enumerate(last["beta"], start=1)})
  return out


def _meta_summaries(fetched: list[tuple[int, dict[str, np.ndarray]]], class_names: Sequence[str]) -> dict[str, float]:
  """The bilevel step's scalars over a logged window: mean meta loss of its meta steps, MW-Net's mean weights."""
  out = {}
  meta_losses = [float(m["meta_loss"]) for _, m in fetched if "meta_loss" in m and np.isfinite(m["meta_loss"])]
  if meta_losses:
    out["train/meta_loss"] = float(np.mean(meta_losses))
  if "mwn_weight_sum" in fetched[-1][1]:
    sums = np.sum([m["mwn_weight_sum"] for _, m in fetched], axis=0)
    counts = np.sum([m["class_count"] for _, m in fetched], axis=0)
    out.update({f"train/mwn_weight_{name}": float(w / k) for name, w, k in zip(class_names, sums, counts) if k > 0})
  return out


def _epoch_line(done: int, total: int, steps_per_epoch: int, fetched: list[tuple[int, dict[str, np.ndarray]]],
                validation: str, examples_per_sec: float, eta: float) -> str:
  """The console's line for an epoch: its mean loss and accuracy, `validation` and speed."""
  mean = lambda k: float(np.mean([m[k] for _, m in fetched]))
  return (f"epoch {round(done / steps_per_epoch, 2):g}/{round(total / steps_per_epoch, 2):g} (step {done}/{total}): "
          f"loss {mean('loss'):.4f}, accuracy {mean('accuracy'):.3f}{validation}; {examples_per_sec:.0f} ex/s, "
          f"ETA {datetime.timedelta(seconds=round(eta))}")


def _validation_text(metric: str, value: float | None, best: float | None, best_step: int | None) -> str:
  """The epoch line's validation part: this epoch's `metric`, if it was validated, and the best so far."""
  best_text = "none yet" if best is None else f"{best:.4f} at step {best_step}"
  if value is None:
    return f"; best validation {metric} {best_text}"
  return f"; validation {metric} {value:.4f} (best {best_text})"


# One compiled program (~0.2 s once, then ~10 us a log window) where op-by-op dispatch compiled each op (~0.5 s at
# the first log) and then took ~0.14 ms a window.
_saal_class_weights = jax.jit(losses.saal_class_weights, static_argnums=2)


def _saal_weight_summaries(config: ml_collections.ConfigDict, info, alpha_logit: np.ndarray) -> dict[str, float]:
  """The class weights w_n the SAAL loss applies at this alpha (what alpha -> 1 does is plain here)."""
  w = _saal_class_weights(np.float32(alpha_logit), np.asarray(info.class_counts, np.float32),
                          bool(config.saal.normalize_weights))
  return {f"train/saal_weight_{name}": float(v) for name, v in zip(info.class_names, np.asarray(w))}


class _Writer:
  """Scalars from process 0 only: TensorBoard event files and `history.jsonl` for plots and sweeps.

  Events go through TensorFlow's summary writer, which the TFDS pipeline has
  loaded already (tensorboardX imported torch, +3 s a run, where installed),
  tagged for TensorBoard's scalars plugin as `tf.summary.scalar` tags them (that
  function needs the tensorboard package, the viewer's extra). A run on an
  in-memory dataset can skip them (config.tensorboard=False) rather than load
  TensorFlow for them. A resumed run appends again from its checkpoint's step,
  so readers keep the last record of each step (`read_history`).
  """

  def __init__(self, workdir: str, tensorboard: bool):
    self._writer = None
    self._history = None
    if jax.process_index() == 0:
      if tensorboard:
        import dsn_saal_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (TF without accelerators)
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
        self._tf = tf
        self._scalar = summary_pb2.SummaryMetadata(plugin_data={"plugin_name": "scalars"})
        self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      path = os.path.join(workdir, HISTORY_FILE)
      torn = os.path.exists(path) and os.path.getsize(path) > 0 and _last_byte(path) != b"\n"
      self._history = open(path, "a")
      if torn:  # a run killed mid-write: end its partial record so the next one starts on its own line
        self._history.write("\n")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      with self._writer.as_default():
        for k, v in values.items():
          self._tf.summary.write(k, self._tf.constant(v, self._tf.float32), step=int(step), metadata=self._scalar)
      self._writer.flush()
    if self._history is not None:
      self._history.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
      self._history.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
    if self._history is not None:
      self._history.close()


def _last_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_history(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{scalar name: (steps, values)} from `workdir/history.jsonl`, one value per step (the last written)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; it is written by train_and_evaluate while training.")
  series: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # the partial last record of a killed run
        logging.warning("%s:%d is a partial record (the run was killed while writing it); skipped.", path, number)
        continue
      step = record.pop("step")
      for k, v in record.items():
        series.setdefault(k, {})[step] = v
  return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


# ----------------------------------------------------------------------------- evaluation


def predict_split(p_eval_step: Callable, rstate: TrainState, dataset, split: str) -> dict[str, np.ndarray]:
  """Labels, probabilities and mean loss over every example of `split`, gathered from all processes."""
  labels, probs, loss_sum = [], [], 0.0
  for batch in dataset.eval_iter(split):
    out = jax.device_get(p_eval_step(rstate, batch))
    local = {"probs": out["probs"], "label": np.asarray(batch["label"]), "mask": np.asarray(batch["mask"]),
             "loss_sum": out["loss_sum"]}
    if jax.process_count() > 1:
      local = multihost_utils.process_allgather(local)
    mask = local["mask"].reshape(-1) > 0
    labels.append(local["label"].reshape(-1)[mask])
    probs.append(local["probs"].reshape(-1, local["probs"].shape[-1])[mask])
    loss_sum += float(np.sum(local["loss_sum"]))
  labels_all = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  probs_all = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
  return {"labels": labels_all, "probs": probs_all, "loss": loss_sum / max(len(labels_all), 1)}


def _first_examples(dataset, split: str, per_class: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Up to `per_class` images of each class from this process's part of `split` (for Grad-CAM)."""
  images, labels, counts = [], [], np.zeros(num_classes, int)
  for batch in dataset.eval_iter(split):
    img = np.asarray(batch["image"]).reshape(-1, *np.asarray(batch["image"]).shape[2:])
    for x, y, m in zip(img, np.asarray(batch["label"]).reshape(-1), np.asarray(batch["mask"]).reshape(-1)):
      if m > 0 and counts[y] < per_class:
        images.append(x)
        labels.append(int(y))
        counts[y] += 1
    if np.all(counts >= per_class):
      break
  return np.stack(images), np.asarray(labels)


def _meta_set_record(info) -> dict[str, dict[str, int]]:
  """Examples per class the network trained on and the meta set held out of them; {} without a meta set."""
  if getattr(info, "meta_counts", None) is None:
    return {}
  per_class = lambda counts: {str(n): int(k) for n, k in zip(info.class_names, counts)}
  return {"train_counts": per_class(info.class_counts), "meta_counts": per_class(info.meta_counts)}


def write_report(config: ml_collections.ConfigDict, state: TrainState, dataset, split: str, out_dir: str,
                 p_eval_step: Callable, rstate: TrainState, extra: Mapping[str, Any] | None = None) -> dict:
  """metrics.json and the PNG plots (confusion matrix, ROC, Grad-CAM grid) of `split` into `out_dir`."""
  from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top  (matplotlib only when reporting)
  info = dataset.info
  pred = predict_split(p_eval_step, rstate, dataset, split)
  result = metrics_lib.compute_metrics(pred["labels"], pred["probs"], info.class_names)
  # num_examples (from compute_metrics) counts what was evaluated; this, what config.dedup left out.
  result.update({"split": split, "loss": pred["loss"], "backbone": config.backbone, "model": config.model,
                 "duplicates_removed": info.duplicates_removed.get(split, 0),
                 "num_params": models.count_params(network_params(state.params)), **_meta_set_record(info),
                 **(extra or {})})
  if jax.process_index() == 0:
    images, labels = _first_examples(dataset, split, config.gradcam_per_class, len(info.class_names))
    variables = {"params": network_params(state.params), "batch_stats": state.batch_stats}
    reporting.write_report(out_dir, result, pred["labels"], pred["probs"],
                           create_model(config, len(info.class_names), axis_name=None), variables, images, labels)
  if jax.process_count() > 1:  # Others must not reach jax.distributed's shutdown barrier (timeout) first.
    multihost_utils.sync_global_devices(f"dsn_saal_jax: {split} report written")
  return result


# ----------------------------------------------------------------------------- the loop


class _Run:
  """Everything built from (config, dataset) that training and evaluation share."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, dataset, read_only: bool = False):
    config_lib.validate_config(config, jax.device_count())
    self.config, self.workdir = config, workdir
    if dataset is None:
      # Importing the data package first hides accelerators from TensorFlow.
      from dsn_saal_jax import data  # pylint: disable=g-import-not-at-top
      dataset = data.create_dataset(config)
    self.dataset = dataset
    info = dataset.info
    self.num_classes = len(info.class_names)
    self.steps_per_epoch = int(info.steps_per_epoch)
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else config.num_epochs * self.steps_per_epoch)
    self.model = create_model(config, self.num_classes)
    self.optimizer = make_optimizer(config, self.steps_per_epoch)
    self.schedule = make_lr_schedule(config, self.steps_per_epoch)
    self.loss_fn = make_loss_fn(config, np.asarray(info.class_counts), info.class_names)
    init_rng, self.dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    self.state = create_train_state(config, self.model, info.image_shape, self.optimizer, init_rng,
                                    class_counts=np.asarray(info.class_counts))
    self.checkpoints = checkpointing.Checkpoints(
        workdir, model_fingerprint(config, self.num_classes), keep=config.keep_checkpoints,
        inference=checkpointing.inference_spec(config, info), read_only=read_only)
    p_step = lambda meta_step: jax.pmap(
        make_train_step(config, info, self.model, self.loss_fn, self.optimizer, self.schedule, meta_step),
        axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
    self.p_train_step = p_step(True)
    # update_rule='meta' steps between meta steps: their own program (compiled on first use).
    self.p_plain_step = p_step(False) if config.saal.update_rule == "meta" else self.p_train_step
    self.p_eval_step = jax.pmap(
        functools.partial(eval_step, model=self.model, loss_fn=self.loss_fn, eval_head=config.eval_head),
        axis_name=AXIS)

  def step_fn(self, step: int) -> Callable:
    """The pmapped step that step `step` runs."""
    return self.p_train_step if is_meta_step(self.config, step) else self.p_plain_step

  def host_state(self, rstate: TrainState) -> TrainState:
    return unreplicate(rstate)


def _validation_split(info) -> str | None:
  return "validation" if info.num_eval.get("validation", 0) > 0 else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset=None) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint), then writes the test report.

  `dataset` replaces `input_pipeline.create_dataset(config)` (tests, notebooks
  with in-memory data). Returns the final host state. On SIGTERM it raises
  `Preempted` (launch/train.py exits 143): during training after saving a
  checkpoint at the next step boundary (one save per step, whichever path asks
  for it), during the final report once the report is written, and before
  training at once. Rerunning the same command resumes.
  """
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, dataset, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset,
                        preemption: _Preemption) -> TrainState:
  from dsn_saal_jax import reporting  # pylint: disable=g-import-not-at-top  (matplotlib only when reporting)
  reporting.check_report_dir(os.path.join(workdir, "report", "test"))  # now, not after all the training
  log_backend()
  run = _Run(config, workdir, dataset)
  info, ckpt = run.dataset.info, run.checkpoints
  state = run.state
  restored = ckpt.restore(jax.device_get(state))
  best_meta = ckpt.meta("best")
  best_value, best_step = (best_meta.get("best_value"), best_meta["step"]) if best_meta else (None, None)
  if restored is not None:
    state = restored[0]
    logging.info("Resumed from %s at step %d.", os.path.join(workdir, "checkpoints"), int(state.step))
  start_step = int(state.step)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))
  logging.info("%s: %d classes %s, k_n=%s, %d train examples, %d steps/epoch, %d steps, %d params.",
               config.dataset, run.num_classes, list(info.class_names), [int(k) for k in info.class_counts],
               info.num_train, run.steps_per_epoch, run.total_steps,
               sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params)))
  if _meta_set_record(info):
    logging.info("Meta set (config.saal.meta_fraction=%g%s), held out of the training split: %s.",
                 config.saal.meta_fraction, ", meta_balanced" if config.saal.meta_balanced else "",
                 _meta_set_record(info)["meta_counts"])
  _warn_if_gpu_scale_on_cpu(config, run, state)
  logging.info("Every %d steps the training scalars go to %s%s.", config.log_every_steps,
               f"TensorBoard (tensorboard --logdir={os.path.join(workdir, 'tensorboard')}) and "
               if config.tensorboard else "", os.path.join(workdir, HISTORY_FILE))

  rstate = replicate(state)
  writer = _Writer(workdir, config.tensorboard)
  buffer = _MetricBuffer(workdir)
  val_split = _validation_split(info)
  ckpt_every = config.checkpoint_every_steps or run.steps_per_epoch
  eval_every = config.eval_every_epochs * run.steps_per_epoch
  last_good = ckpt.latest_step()
  t_log = t_epoch = t_start = time.time()
  log_from = epoch_from = start_step
  val_value = None
  train_iter = flax.jax_utils.prefetch_to_device(run.dataset.train_iter(start_step), 2)

  def save(step: int, rstate: TrainState) -> None:
    nonlocal last_good
    buffer.fetch(last_good)
    ckpt.save(step, run.host_state(rstate), best_value=best_value)
    last_good = step

  def stop(message: str) -> None:
    ckpt.wait()
    writer.close()
    ckpt.close()
    raise Preempted(message)

  # Tracing and compiling leave many long-lived objects; kept out of the collector's view during the loop, its
  # collections stay short (on a tiny CPU model, disabling them sped the loop ~20%, in noisy measurements).
  gc.freeze()
  with preemption.deferred(), contextlib.ExitStack() as unfreeze:
    unfreeze.callback(gc.unfreeze)
    for step in range(start_step, run.total_steps):
      rstate, metrics = run.step_fn(step)(rstate, next(train_iter), run.dropout_rng)
      buffer.add(step, metrics)
      done = step + 1
      if itstime(done, config.log_every_steps, run.total_steps):
        fetched = buffer.take_window(last_good)
        now = time.time()
        values = _summaries(fetched, run.model.num_heads)
        if "alpha_logit" in fetched[-1][1]:
          values.update(_saal_weight_summaries(config, info, fetched[-1][1]["alpha_logit"]))
        values.update(_meta_summaries(fetched, info.class_names))
        values["train/examples_per_sec"] = (done - log_from) * config.batch_size / max(now - t_log, 1e-9)
        writer.scalars(done, values)
        eta = (now - t_start) / max(done - start_step, 1) * (run.total_steps - done)
        saal = f" alpha {values['train/alpha']:.3f}" if "train/alpha" in values else ""
        logging.debug("step %d/%d (epoch %.2f): loss %.4f acc %.3f lr %.2e%s, %.1f ex/s, ETA %s", done,
                      run.total_steps, done / run.steps_per_epoch, values["train/loss"], values["train/accuracy"],
                      values["train/learning_rate"], saal, values["train/examples_per_sec"],
                      datetime.timedelta(seconds=round(eta)))
        t_log, log_from = now, done
      if val_split and itstime(done, eval_every, run.total_steps):
        pred = predict_split(run.p_eval_step, rstate, run.dataset, val_split)
        val = metrics_lib.compute_metrics(pred["labels"], pred["probs"], info.class_names)
        writer.scalars(done, {f"validation/{k}": val[k] for k in metrics_lib.SUMMARY_KEYS}
                       | {"validation/loss": pred["loss"]})
        value = val_value = float(val[config.selection_metric])
        logging.debug("step %d validation: %s", done,
                      ", ".join(f"{k}={val[k]:.4f}" for k in metrics_lib.SUMMARY_KEYS))
        if np.isfinite(value) and (best_value is None or value > best_value):
          best_value, best_step = value, done
          buffer.fetch(last_good)
          ckpt.save(done, run.host_state(rstate), which="best", best_value=best_value,
                    selection_metric=config.selection_metric)
      if itstime(done, run.steps_per_epoch, run.total_steps):
        now = time.time()
        validation = _validation_text(config.selection_metric, val_value, best_value, best_step) if val_split else ""
        logging.info("%s", _epoch_line(
            done, run.total_steps, run.steps_per_epoch, buffer.take_epoch(last_good), validation,
            (done - epoch_from) * config.batch_size / max(now - t_epoch, 1e-9),
            (now - t_start) / max(done - start_step, 1) * (run.total_steps - done)))
        t_epoch, epoch_from, val_value = now, done, None
      if itstime(done, ckpt_every, run.total_steps):
        save(done, rstate)
      boundary = itstime(done, config.log_every_steps, run.total_steps) or itstime(done, ckpt_every, run.total_steps)
      if preemption.stop_after(done, run.total_steps, boundary):
        save(done, rstate)  # a no-op when this step was just saved above
        stop(f"Preempted (SIGTERM) at step {done}/{run.total_steps}; checkpoint saved in "
             f"{workdir}/checkpoints. Rerun the same command to resume.")

    ckpt.wait()
    final = run.host_state(rstate)
    best = ckpt.restore(jax.device_get(final), which="best") if config.eval_checkpoint == "best" else None
    report_state, report_step = (best[0], best[1]["step"]) if best else (final, int(final.step))
    result = write_report(config, report_state, run.dataset, "test", os.path.join(workdir, "report", "test"),
                          run.p_eval_step, replicate(report_state),
                          extra={"checkpoint": "best" if best else "latest", "checkpoint_step": report_step})
    writer.scalars(int(final.step), {f"test/{k}": result[k] for k in metrics_lib.SUMMARY_KEYS})
  if _any_process(preemption.requested):
    stop(f"Preempted (SIGTERM) during the final report; training is complete (step {int(final.step)}) and "
         f"the report in {workdir}/report/test is whole. Rerun the same command to finish.")
  writer.close()
  ckpt.close()
  return final


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str = "test", checkpoint: str = "best",
             dataset=None) -> dict:
  """Restores the `checkpoint` ('best' | 'latest') of `workdir` and writes the report of `split`."""
  run = _Run(config, workdir, dataset, read_only=True)  # a job may still be writing to workdir
  restored = run.checkpoints.restore(jax.device_get(run.state), which=checkpoint)
  if restored is None:
    raise FileNotFoundError(f"No {checkpoint} checkpoint in {workdir}; train first with launch/train.py "
                            f"--workdir={workdir}, or pick --checkpoint=latest.")
  state, meta = restored
  out_dir = os.path.join(workdir, "report", f"{split}_{checkpoint}")
  return write_report(config, state, run.dataset, split, out_dir, run.p_eval_step,
                      replicate(state), extra={"checkpoint": checkpoint, "checkpoint_step": meta["step"]})
