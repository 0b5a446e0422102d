"""The trainer's config schema, the paper's protocol and config validation.

`configs/*.py` files build their `get_config()` from here so that every field
exists in exactly one place; `validate_config` then rejects anything a user
could mistype (unknown keys, unknown dataset, impossible values) with a
message that names the key or value and how to fix it.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from dsn_saal_jax import meta
from dsn_saal_jax.losses import ALPHA_PARAMS, LOSS_NAMES, LOSS_PARAM_KEYS

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

  # Model: config.backbone is the registered builder (models.list_models()), config.model its keyword arguments.
  c.backbone = "vgg16_bn"    # vgg16_bn | resnet50 | resnext50_32x4d | densenet169 | mobilenet_v2
  c.model = ml_collections.ConfigDict(dict(
      dsn=True,                # deep supervision (side heads); False: the backbone alone (the paper's baseline)
      fuse_channels=1, dropout_rate=0.5,
      # VGG16-BN's shape (torchvision's by default; narrower for CPU runs). Other backbones have their own.
      widths=(64, 128, 256, 512, 512), stages=(2, 2, 3, 3, 3), hidden=4096,
      width_scale=1.0))        # other backbones: channels x this (1.0 = torchvision's; < 1 for CPU-budget runs)
  c.eval_head = "final"      # final | mean (average of the six softmaxes)
  c.compute_dtype = "float32"  # float32 | bfloat16 (mixed precision: parameters, BN statistics and loss stay float32)
  c.init_checkpoint = ""     # ImageNet init: launch/convert_torchvision.py output dir; "" = random.

  # Loss.
  c.loss = "saal"            # saal | ce | focal | cb | sce | la (logit-adjusted CE) | mwn (Meta-Weight-Net)
  # Each loss's options under its own name: losses.make_loss(name, **loss_kwargs[name]) (SAAL's init_stddev
  # initializes its parameters instead).
  # saal.normalize_weights: w <- C w / sum w. The paper's literal Eq. 10 (False) lets alpha run to 1, which
  # shrinks every w_n to 1/k_n and stalls training at the majority class (results/covid19_ct_cpu).
  # saal.alpha_param: sigmoid (the paper's alpha = sigmoid(raw), raw ~ N(0, init_stddev)) | log10 (1 - alpha ~
  # 10^-r, r from log10 of the largest class count; see losses.alpha_logit).
  # la.tau: training logits + tau * log(class prior of the training split).
  c.loss_kwargs = ml_collections.ConfigDict(dict(
      saal=dict(log_zero=-4.0, normalize_weights=True, learn_alpha_beta=True, init_stddev=1.0,
                alpha_param="sigmoid"),
      focal=dict(gamma=2.0), cb=dict(beta=0.9999), sce=dict(alpha=0.1, beta=1.0), la=dict(tau=1.0)))
  # How the loss's own parameters learn (SAAL's alpha, beta; Meta-Weight-Net's MLP). update_rule: joint (the
  # paper's): with the network, by SGD on the training loss, which can only shrink beta (every DRCE term is >= 0).
  # meta: by Adam(lr) on the balanced CE of a held-out meta set after a one-step lookahead of the network
  # (steps.meta_train_step), every every_steps steps; learn: which of SAAL's alpha and beta it learns (the other
  # stays fixed). loss=mwn learns only that way. fraction: share of each class's training examples held out as
  # the meta set (drawn after train_per_class and covid_fraction); balanced: the same total, split evenly over
  # the classes.
  c.meta = ml_collections.ConfigDict(dict(
      update_rule="joint", lr=1e-3, every_steps=1, learn="alpha_beta", fraction=0.1, balanced=False))

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

  Bare tokens pick the model (dsn | baseline: config.model.dsn), the backbone (vgg16_bn | resnet50 | ...)
  or the loss; `key=value` tokens set any field, dotted (`model.widths=8x16x16x32x32`) or by a name it
  had before the schema moved it (`widths=...`, see MOVED_KEYS), parsed with the field's type.
  """
  if not arg:
    return config
  for token in (t.strip() for t in arg.split(",")):
    if not token:
      continue
    if "=" not in token:
      from dsn_saal_jax import models  # pylint: disable=g-import-not-at-top
      if token in MODELS:
        config.model.dsn = token == "dsn"
      elif token in models.list_models():
        config.backbone = token
      elif token in LOSS_NAMES:
        config.loss = token
      else:
        raise ValueError(f"Unknown config variant {token!r}; use a model ({', '.join(MODELS)}), a backbone "
                         f"({', '.join(models.list_models())}), a loss ({', '.join(LOSS_NAMES)}) or key=value.")
      continue
    key, value = (s.strip() for s in token.split("=", 1))
    if key == "model":  # model=dsn|baseline, as before config.model held the backbone's arguments
      if value not in MODELS:
        raise ValueError(f"Config variant model={value!r}: expected one of {', '.join(MODELS)}.")
      config.model.dsn = value == "dsn"
      continue
    key = MOVED_KEYS.get(key, key)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      _check_known(name, [k for k in node.keys() if isinstance(node[k], ml_collections.ConfigDict)],
                   "config variant")
      node = node[name]
    _check_known(leaf, node.keys(), f"config.{'.'.join(parents)}" if parents else "config variant")
    node[leaf] = _parse_like(node[leaf], value, key)
  return config


# Keys the config schema moved (issue 28: one thing per key), old dotted path -> new. `upgrade` rewrites
# config.json files written before, apply_variant still takes the old names, and a launcher refuses an old
# `--config.<old path>` naming the new one. `model` held "dsn" | "baseline"; config.model.dsn holds True | False.
MOVED_KEYS = {
    "model": "model.dsn",
    **{k: f"model.{k}" for k in ("widths", "stages", "hidden", "width_scale", "fuse_channels", "dropout_rate")},
    **{f"saal.{k}": f"loss_kwargs.saal.{k}"
       for k in ("log_zero", "normalize_weights", "learn_alpha_beta", "init_stddev", "alpha_param")},
    "saal.update_rule": "meta.update_rule", "saal.meta_lr": "meta.lr", "saal.meta_every_steps": "meta.every_steps",
    "saal.meta_learn": "meta.learn", "saal.meta_fraction": "meta.fraction", "saal.meta_balanced": "meta.balanced",
    "focal_gamma": "loss_kwargs.focal.gamma", "cb_beta": "loss_kwargs.cb.beta", "sce_alpha": "loss_kwargs.sce.alpha",
    "sce_beta": "loss_kwargs.sce.beta", "la_tau": "loss_kwargs.la.tau",
}


def upgrade(config_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A config (a saved config.json's dict, whole or in part) in today's schema: MOVED_KEYS' old paths moved.

  Dicts already in today's schema come back unchanged (a copy); keys the dict lacks stay absent.
  """
  out = copy.deepcopy(dict(config_dict))
  moved = {}
  for old, new in MOVED_KEYS.items():
    *parents, leaf = old.split(".")
    node = out
    for name in parents:
      node = node.get(name) if isinstance(node.get(name), Mapping) else {}
    if leaf not in node or (old == "model" and not isinstance(node[leaf], str)):
      continue
    value = node.pop(leaf)
    if old == "model":
      if value not in MODELS:
        raise ConfigError(f"Saved config's model={value!r} is not one of {', '.join(MODELS)}.")
      value = value == "dsn"
    moved[new] = value
  if out.get("saal") == {}:
    del out["saal"]
  for new, value in moved.items():
    *parents, leaf = new.split(".")
    node = out
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return out


def load_saved(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """A run's saved config.json (train.py writes it into the workdir) in today's schema.

  Keys added to the schema after the file was written take their defaults, as checkpoints of then do.
  """
  with open(path) as f:
    saved = upgrade(json.load(f))
  config = base_config()
  _update(config, saved, str(path))
  return config


def _update(config: ml_collections.ConfigDict, values: Mapping[str, Any], where: str, prefix: str = "") -> None:
  for key, value in values.items():
    _check_known(key, config.keys(), f"{where}: config{prefix}")
    if isinstance(config[key], ml_collections.ConfigDict):
      _update(config[key], value, where, f"{prefix}.{key}")
    else:
      config[key] = tuple(value) if isinstance(config[key], tuple) else value


def moved_flag_error(argv: Sequence[str]) -> str | None:
  """The message for the first `--config.<key>` in `argv` that names a key the schema moved (MOVED_KEYS).

  cli.parse_flags checks it before absl parses the flags.
  """
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    old = arg[len("--config."):].split("=", 1)[0]
    if old in MOVED_KEYS:
      new = MOVED_KEYS[old]
      how = " (true: dsn, false: baseline)" if old == "model" else ""
      return (f"config.{old} is now config.{new}{how}: pass --config.{new}=... instead of {arg.split('=', 1)[0]} "
              "(docs/design.md, Config schema).")
  return None


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


UPDATE_RULES = ("joint", "meta")  # not `update`: that name is ConfigDict.update, unreachable as config.meta.update
META_LEARN = ("alpha_beta", "alpha", "beta")


def _validate_meta(config: ml_collections.ConfigDict) -> None:
  """config.meta's update rule and meta set: values, and a loss that has something to learn."""
  m = config.meta
  for key, allowed in (("update_rule", UPDATE_RULES), ("learn", META_LEARN)):
    if m[key] not in allowed:
      raise ConfigError(f"config.meta.{key}={m[key]!r} is not one of {', '.join(allowed)}.")
  meta.check_meta_fraction(m.fraction)
  if not (isinstance(m.every_steps, int) and m.every_steps >= 1):
    raise ConfigError(f"config.meta.every_steps must be a positive integer, got {m.every_steps!r}.")
  if not m.lr > 0:
    raise ConfigError(f"config.meta.lr must be positive, got {m.lr!r}.")
  if m.update_rule == "meta" and config.loss not in LOSS_PARAM_KEYS:
    raise ConfigError(f"config.meta.update_rule='meta' meta-learns the loss's own parameters, but config.loss="
                     f"{config.loss!r} has none; use loss={' or '.join(LOSS_PARAM_KEYS)}, or update_rule='joint'.")
  if m.update_rule == "meta" and config.loss == "saal" and not config.loss_kwargs.saal.learn_alpha_beta:
    raise ConfigError("config.meta.update_rule='meta' with config.loss_kwargs.saal.learn_alpha_beta=False: alpha "
                     "and beta are fixed, so there is nothing to meta-learn; set learn_alpha_beta=True or "
                     "update_rule='joint'.")
  if config.loss == "mwn" and m.update_rule != "meta":
    raise ConfigError(f"config.loss='mwn' (Meta-Weight-Net) learns its weights on the meta set only; set "
                     f"config.meta.update_rule='meta' (got {m.update_rule!r}).")


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, where: str = "config") -> None:
  """Every key of `schema` in `config` and no other, through the nested blocks; a moved key names its new path."""
  for key in config.keys():
    path = f"{where}.{key}"[len("config."):]
    if path in MOVED_KEYS and not isinstance(config[key], ml_collections.ConfigDict):  # not today's config.model
      raise ConfigError(f"config.{path} is now config.{MOVED_KEYS[path]} (docs/design.md, Config schema).")
    _check_known(key, schema.keys(), where)
  for key in schema.keys():
    if key not in config:
      raise ConfigError(f"Config is missing key {where}.{key}; build configs from "
                        "dsn_saal_jax.config_lib.base_config().")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f"{where}.{key} must be a block of keys ({', '.join(schema[key].keys())}), "
                          f"got {config[key]!r}.")
      _check_keys(config[key], schema[key], f"{where}.{key}")


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """config.model: values, and no backbone argument set that config.backbone does not take."""
  from dsn_saal_jax import models  # pylint: disable=g-import-not-at-top  (flax only when validating)
  if config.backbone not in models.list_models():
    raise ConfigError(f"config.backbone={config.backbone!r} is not one of {', '.join(models.list_models())}.")
  m, defaults = config.model, base_config().model
  if not isinstance(m.dsn, bool):
    raise ConfigError(f"config.model.dsn must be true (side heads) or false (the baseline), got {m.dsn!r}.")
  if not m.hidden > 0:
    raise ConfigError(f"config.model.hidden must be positive, got {m.hidden!r}.")
  if m.dropout_rate < 0:
    raise ConfigError(f"config.model.dropout_rate must be >= 0, got {m.dropout_rate!r}.")
  if not m.width_scale > 0:
    raise ConfigError(f"config.model.width_scale must be positive, got {m.width_scale!r}.")
  taken = models.config_fields(config.backbone)
  # VGG's shape keys stay set on other backbones (configs/covid19_ct_cpu.py:resnet50, the sweep's Table 4):
  # only a width_scale the backbone would ignore is an error.
  if "width_scale" not in taken and m.width_scale != defaults.width_scale:
    hint = "; narrow it with config.model.widths instead" if "widths" in taken else ""
    raise ConfigError(f"config.model.width_scale={m.width_scale} does not apply to {config.backbone}{hint}; "
                      f"leave it at {defaults.width_scale}.")
  if "widths" in taken and len(m.widths) != len(m.stages):
    raise ConfigError(f"config.model.widths {tuple(m.widths)} and config.model.stages {tuple(m.stages)} "
                      "need one entry per stage.")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for any key or value the trainer cannot run with."""
  _check_keys(config, base_config())
  choices = {"dataset": DATASETS, "loss": LOSS_NAMES, "eval_head": EVAL_HEADS,
             "eval_checkpoint": CHECKPOINT_CHOICES, "selection_metric": SELECTION_METRICS,
             "compute_dtype": COMPUTE_DTYPES}
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ConfigError(f"config.{key}={config[key]!r} is not one of {', '.join(allowed)}.")
  alpha_param = config.loss_kwargs.saal.alpha_param
  if alpha_param not in ALPHA_PARAMS:
    raise ConfigError(f"config.loss_kwargs.saal.alpha_param={alpha_param!r} is not one of {', '.join(ALPHA_PARAMS)}.")
  _validate_meta(config)
  positive = ("learning_rate", "batch_size", "eval_batch_size", "image_size", "num_epochs", "lr_decay_epochs",
              "log_every_steps", "eval_every_epochs", "keep_checkpoints")
  for key in positive:
    if not config[key] > 0:
      raise ConfigError(f"config.{key} must be positive, got {config[key]!r}.")
  for key in ("weight_decay", "momentum", "checkpoint_every_steps"):
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
  _validate_model(config)
  from dsn_saal_jax import models  # pylint: disable=g-import-not-at-top  (flax only when validating)
  min_size = models.get_model(config.backbone, num_classes=2, **models.config_kwargs(config)).min_size
  if config.image_size < min_size:
    raise ConfigError(f"config.image_size must be >= {min_size} for {config.backbone} (its downsampling "
                     f"stages), got {config.image_size}.")
  if config.channels not in (1, 3):
    raise ConfigError(f"config.channels must be 1 or 3, got {config.channels}.")
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % num_devices:
      raise ConfigError(
          f"config.{key}={config[key]} is not divisible by the {num_devices} devices; set it to a multiple of "
          f"{num_devices} (e.g. --config.{key}={max(num_devices, config[key] // num_devices * num_devices)}).")
