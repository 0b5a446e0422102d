"""The trainer's config schema, the paper's protocol and config validation.

`configs/*.py` files build their `get_config()` from here so that every field
exists in exactly one place; `validate_config` then rejects anything a user
could mistype (unknown keys, unknown dataset, impossible values) with a
message that names the key or value and how to fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

from dsn_saal_jax import meta
from dsn_saal_jax.losses import ALPHA_PARAMS, LOSS_NAMES

MODELS = ("dsn", "baseline")
DATASETS = ("synthetic_ct", "covid19_diag", "covidx_ct", "covid19_ct", "sars_cov2_ct", "image_folder")
EVAL_HEADS = ("final", "mean")
CHECKPOINT_CHOICES = ("best", "latest")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Metrics a checkpoint can be selected by (validation split), all "higher is better".
SELECTION_METRICS = ("macro_f1", "accuracy", "g_mean", "auc", "macro_sensitivity")


class ConfigError(ValueError):
  """A config value the run cannot use (alone or with its data); the message names the key and the fix.

  launch/train.py prints it as one `Error:` line with the usage exit status (2), not a traceback.
  """


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer and the data layer read, at the paper's protocol (Sec. 4.2)."""
  c = ml_collections.ConfigDict()
  # Data (read by dsn_saal_jax.data.input_pipeline).
  c.dataset = "synthetic_ct"
  c.data_dir = ""            # TFDS data_dir; "" = TFDS default.
  c.manual_dir = ""          # Where the real data sets' downloaded files are (image_folder: your folder).
  c.class_names = ()         # image_folder's class order (folder names); () = the sorted folder names.
  c.split_fractions = (0.7, 0.1, 0.2)  # image_folder: train/val/test shares of each class's cases.
  c.split_seed = 0           # image_folder's case split; apart from seed, so repeated runs share a test set.
  c.image_size = 224
  c.channels = 1
  c.covid_fraction = 1.0     # Seeded fraction of the minority class's training examples kept (Table 6).
  c.minority_class = ""      # The class covid_fraction thins; "" = the COVID class (a class named covid).
  c.train_per_class = 0      # Seeded training examples kept per class, before covid_fraction; 0 = all.
  c.fold = 0                 # For data sets without an official split (5 folds).
  c.seed = 0
  c.batch_size = 32          # Global, over all devices of all processes.
  c.eval_batch_size = 64     # Global.
  c.dedup = False            # Evaluate validation/test without copies of training (or validation) slices.
  c.lung_mask = True
  c.norm_mean = ()           # Per-channel input normalization; () = ImageNet statistics.
  c.norm_std = ()
  c.synthetic_scale = 0.1    # synthetic_ct size as a fraction of COVID19-Diag's counts.
  c.synthetic_image_size = 64
  c.synthetic_seed = 0
  # Training-time augmentation on device (dsn_saal_jax/augment.py: crop 0.5-1, flip, +/-10 deg, intensity and
  # contrast jitter), drawn per (seed, step, example). Off: the paper reports none.
  c.augment = False

  # Model.
  c.backbone = "vgg16_bn"    # vgg16_bn | resnet50 | resnext50_32x4d | densenet169 | mobilenet_v2 (models.list_models())
  c.model = "dsn"            # dsn | baseline
  # VGG16-BN's shape (torchvision's by default; narrower for CPU runs). Other backbones have their own.
  c.widths = (64, 128, 256, 512, 512)
  c.stages = (2, 2, 3, 3, 3)
  c.hidden = 4096
  c.width_scale = 1.0        # Other backbones: channels x this (1.0 = torchvision's; < 1 for CPU-budget runs).
  c.fuse_channels = 1
  c.dropout_rate = 0.5
  c.eval_head = "final"      # final | mean (average of the six softmaxes)
  c.compute_dtype = "float32"  # float32 | bfloat16 (mixed precision: parameters, BN statistics and loss stay float32)
  c.init_checkpoint = ""     # ImageNet init: launch/convert_torchvision.py output dir; "" = random.

  # Loss.
  c.loss = "saal"            # saal | ce | focal | cb | sce | la (logit-adjusted CE) | mwn (Meta-Weight-Net)
  # normalize_weights: w <- C w / sum w. The paper's literal Eq. 10 (False) lets alpha run to 1, which
  # shrinks every w_n to 1/k_n and stalls training at the majority class (results/covid19_ct_cpu).
  # alpha_param: sigmoid (the paper's alpha = sigmoid(raw), raw ~ N(0, init_stddev)) | log10 (1 - alpha ~ 10^-r,
  # r from log10 of the largest class count; see losses.alpha_logit).
  # update_rule: how the loss's own parameters learn. joint (the paper's): with the network, by SGD on the training
  # loss, which can only shrink beta (every DRCE term is >= 0). meta: by Adam(meta_lr) on the balanced CE of a
  # held-out meta set after a one-step lookahead of the network (steps.meta_train_step), every
  # meta_every_steps steps; meta_learn: which of SAAL's alpha and beta it learns (the other stays fixed).
  # loss=mwn (Meta-Weight-Net) learns only that way.
  # meta_fraction: share of each class's training examples held out as the meta set (drawn after
  # train_per_class and covid_fraction); meta_balanced: the same total, split evenly over the classes.
  c.saal = ml_collections.ConfigDict(dict(
      log_zero=-4.0, normalize_weights=True, learn_alpha_beta=True, init_stddev=1.0, alpha_param="sigmoid",
      update_rule="joint", meta_lr=1e-3, meta_every_steps=1, meta_learn="alpha_beta", meta_fraction=0.1,
      meta_balanced=False))
  c.focal_gamma = 2.0
  c.cb_beta = 0.9999
  c.sce_alpha = 0.1
  c.sce_beta = 1.0
  c.la_tau = 1.0             # la: training logits + la_tau * log(class prior of the training split).

  # Optimizer: SGD, momentum 0.9, coupled weight decay 5e-4, lr 1e-3 / 10 every 40 epochs.
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_decay_epochs = 40
  c.lr_decay_factor = 0.1
  c.num_epochs = 120
  c.num_train_steps = -1     # > 0 overrides num_epochs (tests, smoke runs).

  # Loop, evaluation, checkpoints.
  c.log_every_steps = 50
  c.tensorboard = True           # Also write the logged scalars as TensorBoard events (history.jsonl always).
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 0   # 0 = at the end of every epoch.
  c.keep_checkpoints = 2
  c.selection_metric = "macro_f1"
  c.eval_checkpoint = "best"     # Checkpoint the final test report uses: best | latest.
  c.gradcam_per_class = 4
  return c


def from_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`: a config built on another (configs/ is no package)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def paper_config(dataset: str, channels: int, lung_mask: bool, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's protocol on `dataset`, with the variant string `arg` applied."""
  c = base_config()
  c.dataset = dataset
  c.channels = channels
  c.lung_mask = lung_mask
  return apply_variant(c, arg)


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies `--config=file.py:ARG`, e.g. `baseline,ce` or `dsn,saal,covid_fraction=0.25,seed=2`.

  Bare tokens pick the model (dsn | baseline), the backbone (vgg16_bn | resnet50 | ...) or the loss;
  `key=value` tokens set any top-level field, parsed with the field's type.
  """
  if not arg:
    return config
  for token in (t.strip() for t in arg.split(",")):
    if not token:
      continue
    if "=" not in token:
      from dsn_saal_jax import models  # pylint: disable=g-import-not-at-top
      if token in MODELS:
        config.model = token
      elif token in models.list_models():
        config.backbone = token
      elif token in LOSS_NAMES:
        config.loss = token
      else:
        raise ValueError(f"Unknown config variant {token!r}; use a model ({', '.join(MODELS)}), a backbone "
                         f"({', '.join(models.list_models())}), a loss ({', '.join(LOSS_NAMES)}) or key=value.")
      continue
    key, value = (s.strip() for s in token.split("=", 1))
    _check_known(key, config.keys(), "config variant")
    config[key] = _parse_like(config[key], value, key)
  return config


def _parse_like(current: Any, value: str, key: str) -> Any:
  if isinstance(current, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"Config variant {key}={value!r}: expected true or false.")
    return value.lower() in ("true", "1")
  if isinstance(current, tuple):  # widths=8x16x16x32x32, split_fractions=0.8x0.1x0.1, class_names=normal+covid
    kind = type(current[0]) if current else str
    try:
      return tuple(kind(v) for v in value.split("+" if kind is str else "x"))
    except ValueError as e:
      raise ValueError(f"Config variant {key}={value!r}: expected {kind.__name__}s joined by "
                       f"{'+' if kind is str else 'x'}.") from e
  try:
    return type(current)(value)
  except ValueError as e:
    raise ValueError(f"Config variant {key}={value!r}: expected a {type(current).__name__}.") from e


def _check_known(key: str, known: Iterable[str], where: str) -> None:
  known = list(known)
  if key not in known:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"Unknown {where} key {key!r}.{hint} Known keys: {', '.join(sorted(known))}.")


def check_split_fractions(fractions: Iterable[float]) -> None:
  """Raises ConfigError unless `fractions` are three train/val/test shares >= 0 (train > 0) summing to 1."""
  fractions = tuple(fractions)
  if (len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0
      or abs(sum(fractions) - 1) > 1e-6):
    raise ConfigError(
        f"config.split_fractions={fractions} must be three train/val/test shares >= 0 (train > 0) that sum to 1 "
        f"(they sum to {sum(fractions):g}), e.g. --config.split_fractions='(0.7, 0.1, 0.2)'.")


UPDATE_RULES = ("joint", "meta")  # not `update`: that name is ConfigDict.update, unreachable as config.saal.update
META_LEARN = ("alpha_beta", "alpha", "beta")
META_LOSSES = ("saal", "mwn")  # the losses with parameters of their own


def _validate_saal_update(config: ml_collections.ConfigDict) -> None:
  """config.saal's update rule and meta set: values, and a loss that has something to learn."""
  saal = config.saal
  for key, allowed in (("update_rule", UPDATE_RULES), ("meta_learn", META_LEARN)):
    if saal[key] not in allowed:
      raise ConfigError(f"config.saal.{key}={saal[key]!r} is not one of {', '.join(allowed)}.")
  meta.check_meta_fraction(saal.meta_fraction)
  if not (isinstance(saal.meta_every_steps, int) and saal.meta_every_steps >= 1):
    raise ConfigError(f"config.saal.meta_every_steps must be a positive integer, got {saal.meta_every_steps!r}.")
  if not saal.meta_lr > 0:
    raise ConfigError(f"config.saal.meta_lr must be positive, got {saal.meta_lr!r}.")
  if saal.update_rule == "meta" and config.loss not in META_LOSSES:
    raise ConfigError(f"config.saal.update_rule='meta' meta-learns the loss's own parameters, but config.loss="
                     f"{config.loss!r} has none; use loss={' or '.join(META_LOSSES)}, or update_rule='joint'.")
  if saal.update_rule == "meta" and config.loss == "saal" and not saal.learn_alpha_beta:
    raise ConfigError("config.saal.update_rule='meta' with config.saal.learn_alpha_beta=False: alpha and beta are "
                     "fixed, so there is nothing to meta-learn; set learn_alpha_beta=True or update_rule='joint'.")
  if config.loss == "mwn" and saal.update_rule != "meta":
    raise ConfigError(f"config.loss='mwn' (Meta-Weight-Net) learns its weights on the meta set only; set "
                     f"config.saal.update_rule='meta' (got {saal.update_rule!r}).")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for any key or value the trainer cannot run with."""
  schema = base_config()
  for key in config.keys():
    _check_known(key, schema.keys(), "config")
  for key in schema.keys():
    if key not in config:
      raise ConfigError(f"Config is missing key {key!r}; build configs from dsn_saal_jax.config_lib.base_config().")
  for key in config.saal.keys():
    _check_known(key, schema.saal.keys(), "config.saal")
  choices = {"dataset": DATASETS, "model": MODELS, "loss": LOSS_NAMES, "eval_head": EVAL_HEADS,
             "eval_checkpoint": CHECKPOINT_CHOICES, "selection_metric": SELECTION_METRICS,
             "compute_dtype": COMPUTE_DTYPES}
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ConfigError(f"config.{key}={config[key]!r} is not one of {', '.join(allowed)}.")
  if config.saal.alpha_param not in ALPHA_PARAMS:
    raise ConfigError(f"config.saal.alpha_param={config.saal.alpha_param!r} is not one of {', '.join(ALPHA_PARAMS)}.")
  _validate_saal_update(config)
  positive = ("learning_rate", "batch_size", "eval_batch_size", "image_size", "num_epochs", "lr_decay_epochs",
              "log_every_steps", "eval_every_epochs", "hidden", "keep_checkpoints")
  for key in positive:
    if not config[key] > 0:
      raise ConfigError(f"config.{key} must be positive, got {config[key]!r}.")
  for key in ("weight_decay", "momentum", "checkpoint_every_steps", "dropout_rate"):
    if config[key] < 0:
      raise ConfigError(f"config.{key} must be >= 0, got {config[key]!r}.")
  if not 0 < config.covid_fraction <= 1:
    raise ConfigError(f"config.covid_fraction must be in (0, 1], got {config.covid_fraction!r}.")
  if config.train_per_class < 0:
    raise ConfigError(f"config.train_per_class must be >= 0 (0 = all), got {config.train_per_class!r}.")
  check_split_fractions(config.split_fractions)
  if len(set(config.class_names)) != len(config.class_names):
    raise ConfigError(f"config.class_names {tuple(config.class_names)} names a class twice.")
  if config.minority_class and config.class_names and config.minority_class not in config.class_names:
    raise ConfigError(f"config.minority_class={config.minority_class!r} is not one of config.class_names "
                     f"{tuple(config.class_names)}.")
  from dsn_saal_jax import models  # pylint: disable=g-import-not-at-top  (flax only when validating)
  if config.backbone not in models.list_models():
    raise ConfigError(f"config.backbone={config.backbone!r} is not one of {', '.join(models.list_models())}.")
  min_size = models.get_model(config.backbone, num_classes=2, **models.config_kwargs(config)).min_size
  if config.image_size < min_size:
    raise ConfigError(f"config.image_size must be >= {min_size} for {config.backbone} (its downsampling "
                     f"stages), got {config.image_size}.")
  if config.channels not in (1, 3):
    raise ConfigError(f"config.channels must be 1 or 3, got {config.channels}.")
  if config.width_scale != 1.0 and "width_scale" not in models.config_fields(config.backbone):
    raise ConfigError(f"config.width_scale={config.width_scale} does not apply to {config.backbone}"
                     + ("; narrow it with config.widths instead." if config.backbone == "vgg16_bn" else "."))
  if not config.width_scale > 0:
    raise ConfigError(f"config.width_scale must be positive, got {config.width_scale!r}.")
  if config.backbone == "vgg16_bn" and len(config.widths) != len(config.stages):
    raise ConfigError(f"config.widths {tuple(config.widths)} and config.stages {tuple(config.stages)} "
                     "need one entry per stage.")
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % num_devices:
      raise ConfigError(
          f"config.{key}={config[key]} is not divisible by the {num_devices} devices; set it to a multiple of "
          f"{num_devices} (e.g. --config.{key}={max(num_devices, config[key] // num_devices * num_devices)}).")
