"""Exchange of weights between PyTorch state_dicts and Flax variables.

The mapping is exact and strict both ways: every key is accounted for, shapes
are checked, and any mismatch is an error listing all offending keys. Backbone
and classifier keys are torchvision's (each model lists them in
`torch_layers()`), side branches `side.{s}.{convs.{j},fuse,fc}.*`, and the
SAAL scalars, when present, `saal.alpha` / `saal.beta`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import flax.linen as nn

from dsn_saal_jax import config_lib, models

# torch key suffix -> (flax collection, flax leaf name, how torch's array is laid out), per layer kind.
_LEAVES = {
    "conv": {"weight": ("params", "kernel", "conv"), "bias": ("params", "bias", None)},
    "conv_nobias": {"weight": ("params", "kernel", "conv")},
    "linear": {"weight": ("params", "kernel", "linear"), "bias": ("params", "bias", None)},
    "bn": {"weight": ("params", "scale", None), "bias": ("params", "bias", None),
           "running_mean": ("batch_stats", "mean", None), "running_var": ("batch_stats", "var", None)},
}


def _module_map(model: nn.Module) -> Iterator[tuple[str, tuple[str, ...], dict]]:
  """(torch module prefix, flax module path, leaf table) for every layer of `model`."""
  for prefix, path, kind in model.torch_layers():
    yield prefix, path, _LEAVES[kind]


def _bn_prefixes(model: nn.Module) -> list[str]:
  return [prefix for prefix, _, table in _module_map(model) if table is _LEAVES["bn"]]


def _to_flax_layout(a: np.ndarray, layout: str | None) -> np.ndarray:
  if layout == "conv":  # OIHW -> HWIO
    return np.transpose(a, (2, 3, 1, 0))
  if layout == "linear":  # (out, in) -> (in, out)
    return np.transpose(a)
  return a


def _to_torch_layout(a: np.ndarray, layout: str | None) -> np.ndarray:
  if layout == "conv":  # HWIO -> OIHW
    return np.transpose(a, (3, 2, 0, 1))
  if layout == "linear":
    return np.transpose(a)
  return a


def variables_to_state_dict(variables: Mapping[str, Any], model: nn.Module) -> dict[str, np.ndarray]:
  """Flax {'params', 'batch_stats'} -> a torch-layout state_dict of NumPy arrays.

  `num_batches_tracked` is written as 0: Flax does not count BN updates, and
  torch only reads it when BatchNorm momentum is None.
  """
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
  used, out = set(), {}
  for prefix, path, table in _module_map(model):
    for suffix, (collection, leaf, layout) in table.items():
      key = (collection, *path, leaf)
      if key not in flat:
        raise ValueError(f"Flax variables lack {'/'.join(key)} needed for torch key {prefix}.{suffix}.")
      out[f"{prefix}.{suffix}"] = np.ascontiguousarray(_to_torch_layout(np.asarray(flat[key]), layout))
      used.add(key)
  for prefix in _bn_prefixes(model):
    out[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
  for name in ("alpha", "beta"):
    key = ("params", "saal", name)
    if key in flat:
      out[f"saal.{name}"] = np.asarray(flat[key])
      used.add(key)
  unused = sorted("/".join(k) for k in flat if k not in used)
  if unused:
    raise ValueError(f"Flax variables hold entries the {type(model).__name__} layout does not know: {unused}.")
  return out


def state_dict_to_variables(state_dict: Mapping[str, Any], model: nn.Module,
                            in_channels: int | None = None) -> dict[str, Any]:
  """A torch-layout state_dict -> Flax {'params', 'batch_stats'}, checked against `model`.

  Raises ValueError naming every missing key, unexpected key and shape
  mismatch at once, so nothing is silently dropped or broadcast.
  """
  # Copy: jnp.asarray may alias a NumPy view of a torch tensor, which torch later updates in place.
  sd = {k: np.array(v.detach().cpu().numpy() if hasattr(v, "detach") else v, copy=True)
        for k, v in state_dict.items()}
  first = model.torch_first_conv
  if in_channels is None:
    in_channels = sd[first].shape[1] if first in sd else 3
  size = max(model.min_size, 32)
  expected = traverse_util.flatten_dict(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, in_channels)))))
  missing, shapes, flat, used = [], [], {}, set()
  for prefix, path, table in _module_map(model):
    for suffix, (collection, leaf, layout) in table.items():
      tkey, fkey = f"{prefix}.{suffix}", (collection, *path, leaf)
      if tkey not in sd:
        missing.append(tkey)
        continue
      used.add(tkey)
      value = _to_flax_layout(sd[tkey], layout)
      if value.shape != expected[fkey].shape:
        shapes.append(f"{tkey}: {sd[tkey].shape}, expected {_to_torch_layout(np.empty(expected[fkey].shape), layout).shape}")
        continue
      flat[fkey] = jnp.asarray(value, expected[fkey].dtype)
  used.update(f"{p}.num_batches_tracked" for p in _bn_prefixes(model) if f"{p}.num_batches_tracked" in sd)
  saal = [k for k in ("saal.alpha", "saal.beta") if k in sd]
  if len(saal) == 1:
    missing.append(({"saal.alpha", "saal.beta"} - set(saal)).pop())
  for key in saal:
    flat[("params", "saal", key.split(".")[1])] = jnp.asarray(sd[key], jnp.float32)
    used.add(key)
  unexpected = sorted(set(sd) - used)
  problems = [f"{name}: {items}" for name, items in
              (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if items]
  if problems:
    raise ValueError(
        f"state_dict does not match {type(model).__name__}(num_classes={model.num_classes}, dsn={model.dsn}, "
        f"in_channels={in_channels}): " + "; ".join(problems))
  return traverse_util.unflatten_dict(flat)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a plain tensor state_dict file safely (never unpickles code)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except OSError:
    raise
  except Exception as e:  # torch raises several unrelated types for refused or corrupt pickles
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(
        f"{path} is not a plain tensor state_dict that torch.load(weights_only=True) can read "
        f"(it may pickle code or a whole model, or be corrupt: {reason}). Save one with "
        "torch.save(model.state_dict(), path).") from e
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    kinds = type(obj).__name__ if not isinstance(obj, Mapping) else sorted({type(v).__name__ for v in obj.values()})
    raise ValueError(f"{path} holds {kinds}, not a flat name -> tensor state_dict. Save one with "
                     "torch.save(model.state_dict(), path).")
  return {k: v.numpy() for k, v in obj.items()}


def torchvision_variables(state_dict: Mapping[str, Any], backbone: str = "vgg16_bn", in_channels: int = 3,
                          num_classes: int = 1000) -> dict[str, Any]:
  """The Flax backbone and classifier variables of a torchvision `backbone` state_dict.

  For 1-channel input the first conv kernel is the sum over RGB (a gray image
  replicated to RGB gives the same response). When `num_classes` != 1000 the
  last Linear is left out, so the trainer initialises it afresh; side
  branches are never part of ImageNet weights and always start random.
  """
  if in_channels not in (1, 3):
    raise ValueError(f"in_channels must be 1 or 3, got {in_channels}.")
  model = models.get_model(backbone, num_classes=1000, dsn=False)
  sd = dict(state_dict)  # state_dict_to_variables makes the one copy of every array
  first = model.torch_first_conv
  if in_channels == 1 and first in sd:
    w = sd[first]
    sd[first] = np.asarray(w.detach().cpu().numpy() if hasattr(w, "detach") else w).sum(axis=1, keepdims=True)
  try:
    variables = state_dict_to_variables(sd, model, in_channels=in_channels)
  except ValueError as e:
    guess = [name for name in guess_architectures(sd) if name != backbone]
    if not guess:
      raise
    raise ValueError(f"These weights are not torchvision's {backbone}: they have the keys and shapes of "
                     f"{' or '.join(guess)}; pass --arch={guess[0]} (choices: "
                     f"{', '.join(models.list_models())}). Details: {e}") from None
  if num_classes != 1000:
    variables["params"].pop(model.classifier)
  return variables


def guess_architectures(state_dict: Mapping[str, Any]) -> list[str]:
  """The registered backbones whose torchvision state_dict (1000 classes) has exactly these keys and shapes."""
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  found = []
  for name in models.list_models():
    model = models.get_model(name, num_classes=1000, dsn=False)
    keys = {f"{prefix}.{suffix}" for prefix, _, table in _module_map(model) for suffix in table}
    if keys != set(shapes):
      continue
    flat = traverse_util.flatten_dict(jax.eval_shape(
        lambda m=model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))))
    expected = {f"{prefix}.{suffix}": _to_torch_layout(np.empty(flat[(collection, *path, leaf)].shape, np.int8),
                                                       layout).shape
                for prefix, path, table in _module_map(model)
                for suffix, (collection, leaf, layout) in table.items()}
    if all(expected[k] == shapes[k] for k in shapes if k != model.torch_first_conv):
      found.append(name)
  return found


def save_pretrained(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Write converted variables as an Orbax checkpoint (atomic: a temp dir renamed when complete)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), dict(variables))


# Written next to the arrays by launch/pretrain.py: what model the self-supervised backbone was trained as.
PRETRAIN_META = "dsn_saal_pretrain.json"


def load_pretrained(path: str | os.PathLike, backbone: str | None = None, in_channels: int | None = None,
                    shape: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Variables of a converted (launch/convert_torchvision.py) or pretrained (launch/pretrain.py) checkpoint.

  A pretrained one records its backbone, input channels and shape (`shape`: the backbone's config fields);
  given the config's, any difference is refused naming both values (a ConfigError: config.init_checkpoint
  names a checkpoint this config cannot start from).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise config_lib.ConfigError(f"{path} is not a converted checkpoint directory; make one with "
                            "launch/convert_torchvision.py or launch/pretrain.py.")
  meta_path = os.path.join(path, PRETRAIN_META)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    expected = {"backbone": backbone, "in_channels": in_channels,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in (shape or {}).items()}}
    diffs = [f"{k}: checkpoint {meta.get(k)!r} vs config {v!r}" for k, v in expected.items()
             if v is not None and k in meta and meta[k] != v]
    if diffs:
      raise config_lib.ConfigError(f"{path} holds a backbone pretrained for another model ({'; '.join(diffs)}). "
                       "Pretrain one for this config (launch/pretrain.py with the same backbone, channels and "
                       "widths), or set the config to match the checkpoint.")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))


def merge_pretrained(variables: Mapping[str, Any], pretrained: Mapping[str, Any],
                     source: str = "pretrained") -> dict[str, Any]:
  """`variables` with every leaf of `pretrained` put in place; each must exist with the same shape.

  Leaves absent from `pretrained` (side branches, a new last Linear) keep
  their fresh initialisation.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  problems = []
  for key, value in traverse_util.flatten_dict(dict(pretrained)).items():
    name = "/".join(key)
    if key not in flat:
      problems.append(f"{name} is not in the model")
    elif tuple(value.shape) != tuple(flat[key].shape):
      problems.append(f"{name} has shape {tuple(value.shape)}, the model needs {tuple(flat[key].shape)}")
    else:
      flat[key] = jnp.asarray(value, flat[key].dtype)
  if problems:
    raise config_lib.ConfigError(f"{source} does not fit the model: " + "; ".join(problems) +
                     ". ImageNet weights need the full-size backbone they were converted for (same --arch as "
                     "config.backbone, default widths) and the converter's --in_channels equal to the config's "
                     "channels.")
  return traverse_util.unflatten_dict(flat)
