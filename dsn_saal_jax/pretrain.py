"""Contrastive self-supervised pretraining (Self-Trans, Table 3 of the paper) as a stand-in for ImageNet weights.

SimCLR (Chen et al. 2020) rather than Self-Trans's MoCo v2: every negative of
a step is another example of the same global batch, gathered from all devices
(`lax.all_gather` over the trainer's axis 'batch'), and BatchNorm statistics
are synced over that axis as in supervised training, so the pmapped step is
the trainer's with a different loss and needs no momentum encoder, queue or
shuffle-BN (docs/design.md says more). The encoder is a registered backbone
without side heads; its feature is the global average of the Grad-CAM feature
map (`models.mark_cam`), followed by a 2-layer MLP projection head. Each
example gives two views (dsn_saal_jax.augment, PRETRAINING policy) drawn on
device from (seed, step, example, view). Labels are never read: batches are
cut down to their images on the host.

The result, `<workdir>/backbone`, is what `--config.init_checkpoint` takes:
the backbone's params and BatchNorm statistics only (no classifier, side
heads or SAAL parameters), and `dsn_saal_pretrain.json` naming its backbone,
input channels and shape, so a run of another model is refused.

One module (~450 lines) because it is one method end to end: its config
section, heads, step, unlabeled-folder reader, loop and export. The loop's
infrastructure is the trainer's (`runtime`), its state `steps.TrainState`.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import shutil
import time
from typing import Any, Iterator, Mapping

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
from dsn_saal_jax import convert
from dsn_saal_jax import host
from dsn_saal_jax import models
from dsn_saal_jax import runtime
from dsn_saal_jax import steps

AXIS = models.AXIS
METHODS = ("simclr",)
# SimCLR's negatives for one view are the other 2B - 2 views of the global batch B; below 8 examples
# (14 negatives) telling the positive apart is too easy to learn features from.
MIN_BATCH = 8
BACKBONE_DIR = "backbone"


class PretrainInputError(config_lib.ConfigError):
  """Bad input a user can fix (a folder without slices, a config the method cannot run); a usage error (exit 2)."""


def pretrain_config(base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """`base` (the training config the backbone is for; default the trainer's schema) plus `pretrain`.

  Data and model fields stay `base`'s, so the backbone fits the run it initialises; the optimizer's become
  the method's. Pretraining always augments (augment.PRETRAINING); `config.augment` is the supervised
  trainer's switch.
  """
  c = config_lib.base_config() if base is None else copy.deepcopy(base)
  c.learning_rate = 0.05     # cosine-decayed to 0 over the run (MoCo v2's schedule)
  c.weight_decay = 1e-4
  with c.unlocked():
    c.pretrain = ml_collections.ConfigDict(dict(
        method="simclr",
        folder="",             # unlabeled slices (PNG/JPEG/DICOM, any nesting); "" = the dataset's training split
        temperature=0.2,       # Self-Trans's (MoCo v2's) temperature
        projection_hidden=0,   # hidden width of the MLP head; 0 = the backbone's feature width
        projection_dim=128,
    ))
  return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """The trainer's checks on the shared fields, then the method's; bad values are PretrainInputError."""
  if "pretrain" not in config:
    raise PretrainInputError("This config has no `pretrain` section; build it from pretrain.pretrain_config() "
                             "(see configs/pretrain.py).")
  schema = pretrain_config().pretrain
  for key in config.pretrain.keys():
    if key not in schema:
      raise PretrainInputError(f"Unknown config.pretrain key {key!r}; known: {', '.join(sorted(schema.keys()))}.")
  shared = config.to_dict()
  shared.pop("pretrain")
  config_lib.validate_config(ml_collections.ConfigDict(shared), num_devices)
  p = config.pretrain
  if p.method not in METHODS:
    raise PretrainInputError(f"config.pretrain.method={p.method!r} is not one of {', '.join(METHODS)}.")
  if not p.temperature > 0:
    raise PretrainInputError(f"config.pretrain.temperature must be positive, got {p.temperature!r}.")
  if config.batch_size < MIN_BATCH:
    raise PretrainInputError(
        f"config.batch_size={config.batch_size} gives SimCLR only {2 * config.batch_size - 2} negatives per view "
        f"(the other views of the global batch); set config.batch_size >= {MIN_BATCH}.")
  if p.projection_dim <= 0 or p.projection_hidden < 0:
    raise PretrainInputError(f"config.pretrain.projection_dim must be positive and projection_hidden >= 0, got "
                             f"{p.projection_dim} and {p.projection_hidden}.")


# ----------------------------------------------------------------------------- loss


def contrastive_loss(z1: jax.Array, z2: jax.Array, all1: jax.Array, all2: jax.Array, first: jax.Array | int,
                     temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SimCLR's NT-Xent of this device's rows: (mean loss, mean positive and negative cosine similarity).

  `z1`, `z2` (n, d): the two views' projections of this device's examples, which are
  rows `first .. first + n - 1` of the global batch; `all1`, `all2` (N, d): every
  device's (all-gathered). Each of the 2n local views is classified against the
  other 2N - 1 views of the global batch, its positive being the same example's other view.
  """
  dtype = jnp.promote_types(z1.dtype, jnp.float32)
  unit = lambda z: z.astype(dtype) * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z.astype(dtype)), -1,
                                                                        keepdims=True), 1e-12))
  n, big_n = z1.shape[0], all1.shape[0]
  queries = unit(jnp.concatenate([z1, z2]))
  keys = unit(jnp.concatenate([all1, all2]))
  local = first + jnp.arange(n)
  rows = jnp.concatenate([local, big_n + local])
  positives = jnp.concatenate([big_n + local, local])
  cos = jnp.dot(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
  columns = jnp.arange(2 * big_n)[None]
  is_self, is_pos = columns == rows[:, None], columns == positives[:, None]
  logits = jnp.where(is_self, -jnp.inf, cos / temperature)
  loss = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(jnp.where(is_pos, cos, 0.0), -1) / temperature)
  negative = ~(is_self | is_pos)
  pos_sim = jnp.mean(jnp.sum(jnp.where(is_pos, cos, 0.0), -1))
  neg_sim = jnp.sum(jnp.where(negative, cos, 0.0)) / jnp.sum(negative)
  return loss, pos_sim, neg_sim


# ----------------------------------------------------------------------------- model


class ProjectionHead(nn.Module):
  """SimCLR's / MoCo v2's 2-layer MLP on the pooled feature; thrown away after pretraining."""
  hidden: int
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x.astype(jnp.float32)))
    return nn.Dense(self.features, name="fc2")(x)


def create_encoder(config: ml_collections.ConfigDict, axis_name: str | None = AXIS) -> nn.Module:
  """The configured backbone without side heads (its classifier is built but never used)."""
  return models.get_model(config.backbone, num_classes=2, dsn=False, fuse_channels=config.model.fuse_channels,
                          axis_name=axis_name, dtype=jnp.dtype(config.compute_dtype), **models.config_kwargs(config))


def pooled_features(encoder: nn.Module, variables: Mapping[str, Any], images: jax.Array, train: bool,
                    rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """(global average of the backbone's last feature map (B, C), updated batch_stats or None)."""
  out, updates = encoder.apply(dict(variables), images, train=train, mutable=["batch_stats", "intermediates"],
                               rngs={"dropout": rng} if rng is not None else {})
  del out  # the classifier's logits: XLA drops them, nothing depends on them
  feature_map = updates["intermediates"]["cam"][0]
  return jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2)), updates.get("batch_stats")


def head_modules(encoder: nn.Module) -> set[str]:
  """Top-level modules that are not the backbone: the classifier's layers (torchvision's `classifier*`, `fc`)."""
  return {path[0] for prefix, path, _ in encoder.torch_layers()
          if prefix.split(".")[0] in ("classifier", "fc") or prefix.startswith("side.")}


def backbone_variables(encoder: nn.Module, params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict:
  """The backbone's params and BatchNorm statistics: what init_checkpoint puts into a training run."""
  heads = head_modules(encoder)
  keep = lambda tree: {k: v for k, v in tree.items() if k not in heads}
  return {"params": keep(params), "batch_stats": keep(batch_stats)}


def create_state(config: ml_collections.ConfigDict, encoder: nn.Module, projector_of, image_shape,
                 optimizer: optax.GradientTransformation, rng: jax.Array) -> steps.TrainState:
  """The trainer's TrainState, params {'encoder', 'projection'}; the encoder initialised as for training.

  With config.init_checkpoint (ImageNet weights, as Self-Trans starts from) the backbone continues from it.
  """
  enc_rng, proj_rng = jax.random.split(rng)
  variables = steps.init_variables(config, encoder, image_shape, enc_rng)  # init_checkpoint: e.g. ImageNet
  x = jnp.zeros((1, *image_shape), jnp.float32)
  feats, _ = pooled_features(encoder.clone(axis_name=None), variables, x, train=False)
  projector = projector_of(feats.shape[-1])
  params = {"encoder": variables["params"],
            "projection": projector.init(proj_rng, feats)["params"]}
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                          opt_state=optimizer.init(params))


def make_projector(config: ml_collections.ConfigDict, feature_width: int) -> ProjectionHead:
  return ProjectionHead(config.pretrain.projection_hidden or feature_width, config.pretrain.projection_dim)


# ----------------------------------------------------------------------------- step


def pretrain_step(state: steps.TrainState, images: jax.Array, *, encoder: nn.Module, projector: ProjectionHead,
                  optimizer: optax.GradientTransformation, learning_rate_fn: optax.Schedule, temperature: float,
                  seed: int) -> tuple[steps.TrainState, dict[str, jax.Array]]:
  """One SimCLR step on this device's slice (n, H, W, C) of the global batch; run under pmap(axis_name='batch')."""
  n = images.shape[0]
  first = jax.lax.axis_index(AXIS) * n
  views = jnp.concatenate([augment.augment_batch(images, seed, state.step, first, augment.PRETRAINING, view=v)
                           for v in (0, 1)])
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), state.step), jax.lax.axis_index(AXIS))

  def loss_of(params):
    feats, batch_stats = pooled_features(
        encoder, {"params": params["encoder"], "batch_stats": state.batch_stats}, views, train=True, rng=rng)
    z = projector.apply({"params": params["projection"]}, feats)
    z1, z2 = z[:n], z[n:]
    gather = lambda a: jax.lax.all_gather(a, AXIS, tiled=True)
    loss, pos, neg = contrastive_loss(z1, z2, gather(z1), gather(z2), first, temperature)
    return loss, (pos, neg, batch_stats)

  (loss, (pos, neg, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  if jax.lax.axis_size(AXIS) > 1:
    grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  metrics = jax.lax.pmean({"loss": loss, "positive_similarity": pos, "negative_similarity": neg,
                           "learning_rate": learning_rate_fn(state.step)}, AXIS)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state), metrics


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                                 optax.Schedule]:
  """SGD with momentum and coupled weight decay, as the trainer's, on a cosine schedule (MoCo v2's)."""
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum)), schedule


# ----------------------------------------------------------------------------- data


class SliceFolder:
  """Unlabeled slices of a folder tree, in memory as model inputs, with the input pipeline's train contract.

  Files are listed, read and preprocessed as the image_folder builder and the
  prepared variants do them (folders.walk_files, common.read_slice,
  input_pipeline.to_pixels, prepared.normalize), so the backbone sees the inputs
  its fine-tuning will. Step s is batch s % steps_per_epoch of
  a permutation seeded by (seed, epoch); each process gets its slice of the batch.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    root = config.pretrain.folder
    if not os.path.isdir(root):
      raise PretrainInputError(f"config.pretrain.folder={root!r} is not a directory.")
    # pylint: disable=g-import-not-at-top  (TensorFlow only for folders)
    from etils import epath
    from dsn_saal_jax import prepared
    from dsn_saal_jax.data import folders, input_pipeline
    from dsn_saal_jax.data.builders import common
    # pylint: enable=g-import-not-at-top
    listed, passed = folders.walk_files(root)  # the builders' rule: links into the tree not followed
    listed, duplicates = folders.count_once(listed, root)
    folders.warn_passed_over(passed + duplicates, root)
    files = [p for p in listed if common.is_slice(p)]
    images, failed = [], []
    for path in files:
      try:  # read as the builders read (DICOM windowed and lung-masked), resized and rounded as prepared
        pixels = common.read_slice(epath.Path(path), bool(config.lung_mask))
        images.append(input_pipeline.to_pixels(pixels, int(config.image_size)).numpy())
      except Exception as e:  # pylint: disable=broad-except  (PIL and pydicom raise many types)
        failed.append(f"{path} ({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})")
    if not images:
      found = (f"none of its {len(files)} candidate files could be read: {'; '.join(failed[:3])}" if files else
               "it holds no file that is an image or DICOM (searched recursively)")
      raise PretrainInputError(f"config.pretrain.folder={root!r} has no readable slices: {found}. Point it at a "
                               "folder of PNG, JPEG or DICOM slices.")
    if failed:
      logging.warning("%d of %d files in %s could not be read and are left out, e.g. %s", len(failed), len(files),
                      root, "; ".join(failed[:3]))
    self.images = prepared.normalize(np.stack(images), prepared.lookup_table(input_pipeline.normalization_for(config)))
    self.seed, self.batch_size = int(config.seed), int(config.batch_size)
    if len(self.images) < self.batch_size:
      raise PretrainInputError(f"config.pretrain.folder={root!r} has {len(self.images)} readable slices, fewer "
                               f"than one batch (config.batch_size={self.batch_size}).")
    self.num_train = len(self.images)
    self.image_shape = tuple(self.images.shape[1:])
    self.steps_per_epoch = self.num_train // self.batch_size
    logging.info("%s: %d unlabeled slices.", root, self.num_train)

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    per_process = self.batch_size // jax.process_count()
    step = start_step
    while True:
      epoch, b = divmod(step, self.steps_per_epoch)
      order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
      idx = order[b * self.batch_size:(b + 1) * self.batch_size]
      part = self.images[idx][jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
      yield {"image": part.reshape(jax.local_device_count(), -1, *part.shape[1:])}
      step += 1


def _images_only(batches: Iterator[Mapping[str, np.ndarray]]) -> Iterator[np.ndarray]:
  """Each batch's images: labels (and anything else) never leave the host."""
  for batch in batches:
    yield batch["image"]


# ----------------------------------------------------------------------------- the loop


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a pretraining checkpoint must agree on to be resumed (never a supervised run's workdir)."""
  shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in models.config_kwargs(config).items()
           if k != "dropout_rate"}
  return {"purpose": "pretrain", "method": config.pretrain.method, "backbone": config.backbone,
          "channels": int(config.channels), **shape, "projection_hidden": int(config.pretrain.projection_hidden),
          "projection_dim": int(config.pretrain.projection_dim)}


def pretrain_and_save(config: ml_collections.ConfigDict, workdir: str, dataset=None) -> str:
  """Pretrains (resuming from `workdir`), then writes `<workdir>/backbone`; returns that path.

  `dataset`: anything with `train_iter(start_step)` and the trainer's `info` (an
  ArrayDataset), replacing config.pretrain.folder or config.dataset's training
  split. SIGTERM: as train.train_and_evaluate, `runtime.Preempted` after saving.
  """
  with runtime.Preemption() as preemption:
    return _pretrain(config, workdir, dataset, preemption)


def _open_data(config: ml_collections.ConfigDict, dataset) -> tuple[Any, int, tuple[int, ...], int]:
  """(dataset, steps per epoch, image shape, examples) of the configured source."""
  if dataset is None:
    host.hide_accelerators_from_tensorflow()  # both sources decode with TF: it must not claim accelerator memory
  if dataset is None and config.pretrain.folder:
    dataset = SliceFolder(config)
    return dataset, dataset.steps_per_epoch, dataset.image_shape, dataset.num_train
  if dataset is None:
    from dsn_saal_jax import data  # pylint: disable=g-import-not-at-top
    dataset = data.create_dataset(config)
  info = dataset.info
  return dataset, int(info.steps_per_epoch), tuple(info.image_shape), int(info.num_train)


def _pretrain(config: ml_collections.ConfigDict, workdir: str, dataset, preemption) -> str:
  runtime.log_backend()
  validate(config, jax.device_count())
  dataset, steps_per_epoch, image_shape, num_examples = _open_data(config, dataset)
  if image_shape[-1] != config.channels:
    raise PretrainInputError(f"The data has {image_shape[-1]} channels, config.channels={config.channels}.")
  total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  encoder = create_encoder(config)
  optimizer, schedule = make_optimizer(config, total)
  state = create_state(config, encoder, functools.partial(make_projector, config), image_shape, optimizer,
                       jax.random.PRNGKey(config.seed))
  projector = make_projector(config, state.params["projection"]["fc1"]["kernel"].shape[0])
  ckpt = checkpointing.Checkpoints(workdir, fingerprint(config), keep=config.keep_checkpoints)
  restored = ckpt.restore(jax.device_get(state))
  if restored is not None:
    state = restored[0]
    logging.info("Resumed pretraining from %s at step %d.", os.path.join(workdir, "checkpoints"), int(state.step))
  start = int(state.step)
  logging.info("SimCLR pretraining of %s: %d unlabeled examples, %d steps/epoch, %d steps, batch %d, "
               "temperature %g.", config.backbone, num_examples, steps_per_epoch, total, config.batch_size,
               config.pretrain.temperature)
  p_step = jax.pmap(functools.partial(
      pretrain_step, encoder=encoder, projector=projector, optimizer=optimizer, learning_rate_fn=schedule,
      temperature=float(config.pretrain.temperature), seed=int(config.seed)), axis_name=AXIS, donate_argnums=(0,))
  rstate = runtime.replicate(state)
  writer = runtime.Writer(workdir, config.tensorboard)
  ckpt_every = config.checkpoint_every_steps or steps_per_epoch
  batches = _images_only(dataset.train_iter(start))
  pending, epoch_metrics = [], []
  t_epoch, epoch_from, t_start = time.time(), start, time.time()

  def fetch() -> None:
    for step, m in pending:
      m = runtime.unreplicate(m)
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"The contrastive loss became {m['loss']} at step {step}; pretraining stopped. "
                                 f"The last good checkpoint in {workdir}/checkpoints is kept; lower "
                                 "config.learning_rate.")
      epoch_metrics.append(m)
    pending.clear()

  def save(done: int) -> None:
    fetch()
    ckpt.save(done, runtime.unreplicate(rstate))

  with preemption.deferred():
    for step in range(start, total):
      rstate, metrics = p_step(rstate, next(batches))
      pending.append((step, metrics))
      done = step + 1
      if runtime.itstime(done, config.log_every_steps, total):
        fetch()
        last = epoch_metrics[-1]
        writer.scalars(done, {f"pretrain/{k}": float(v) for k, v in last.items()})
      if runtime.itstime(done, steps_per_epoch, total):
        fetch()
        now = time.time()
        mean = lambda k: float(np.mean([m[k] for m in epoch_metrics]))
        eta = (now - t_start) / max(done - start, 1) * (total - done)
        logging.info("pretrain epoch %g/%g (step %d/%d): loss %.4f, positive similarity %.3f, negative %.3f, "
                     "lr %.2e; %.0f ex/s, ETA %s", round(done / steps_per_epoch, 2),
                     round(total / steps_per_epoch, 2), done, total, mean("loss"), mean("positive_similarity"), mean("negative_similarity"),
                     float(epoch_metrics[-1]["learning_rate"]),
                     (done - epoch_from) * config.batch_size / max(now - t_epoch, 1e-9),
                     datetime.timedelta(seconds=round(eta)))
        epoch_metrics.clear()
        t_epoch, epoch_from = now, done
      if runtime.itstime(done, ckpt_every, total):
        save(done)
      if done < total and runtime.any_process(preemption.requested):
        save(done)
        ckpt.wait()
        writer.close()
        ckpt.close()
        raise runtime.Preempted(f"Preempted (SIGTERM) at pretraining step {done}/{total}; checkpoint saved in "
                                f"{workdir}/checkpoints. Rerun the same command to resume.")
    ckpt.wait()
    final = runtime.unreplicate(rstate)
    out = export_backbone(config, encoder, final, workdir)
  writer.close()
  ckpt.close()
  return out


def export_backbone(config: ml_collections.ConfigDict, encoder: nn.Module, state: steps.TrainState,
                    workdir: str) -> str:
  """Writes `<workdir>/backbone` whole or not at all: arrays and metadata into a temp dir, then renamed."""
  out = os.path.join(os.path.abspath(workdir), BACKBONE_DIR)
  tmp = out + ".partial"
  variables = backbone_variables(encoder, state.params["encoder"], state.batch_stats)
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dsn_saal_jax.pretrain: export start")
  convert.save_pretrained(tmp, variables)
  if jax.process_index() == 0:
    shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in models.config_kwargs(config).items()
             if k != "dropout_rate"}
    meta = {"backbone": config.backbone, "in_channels": int(config.channels), **shape,
            "method": config.pretrain.method, "steps": int(state.step), "seed": int(config.seed),
            "data": config.pretrain.folder or f"{config.dataset} training split"}
    with open(os.path.join(tmp, convert.PRETRAIN_META), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dsn_saal_jax.pretrain: export done")
  logging.info("Pretrained backbone written to %s; train from it with --config.init_checkpoint=%s", out, out)
  return out
