"""Identical (and near-identical) slices of a built dataset, and the split leaks they cause.

Public COVID CT sets hold exact copies (the SARS-CoV-2 CT-scan set has byte-identical
slices; some reappear in other collections), so a split can put one slice in train and
test and inflate every metric. `ensure` writes `duplicates.json` beside the built data:
every group of identical slices (split, index, id and label of each member), the groups
that cross split boundaries or disagree on the label, and the same for near-duplicates
(close contrast-normalised thumbnails: see `NEAR`).

Hashes are taken from the built splits in `prepare()`, not while generating, because
- the stored slice is exactly what the model sees (grayscale, cropped, lung-masked):
  a JPEG screenshot and a PNG of one slice decode to one array;
- an example's index in its split exists only once TFDS has shuffled and written it;
- one pass covers every builder, including ones added later, and data built before
  this check (its first use computes the file).
The price is one more decode of every slice per build. sars_cov2_ct also hashes its
source files before it deals the folds, so that identical slices share a fold.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import itertools
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from scipy import spatial

FILENAME = "duplicates.json"
# 3: near = contrast-normalised thumbnails within NEAR_MAX_DIFFERENCE, over all pairs (2: an equal difference hash
# and 16x16 thumbnails within 1.5 grey levels; 1: the difference hash alone).
FORMAT = 3
EXACT = "blake2b-128 of the dtype, shape and pixels of the decoded stored slice"
# Validated on the real COVID19-CT (docs/design.md, "Duplicates across splits"; results/covid19_ct_duplicates).
# Format 2's grey-level distance called the nearly empty slices a failed lung mask leaves copies of one another
# (3 groups of different scans) and missed a rescaled copy (2.46 grey levels, beyond a neighbouring slice's 2.03);
# its equal-difference-hash gate kept 48-90% of JPEG copies of real slices. So thumbnails are divided by their
# mean absolute deviation, and every pair within the limit is found. The limit keeps what a copy keeps: on real
# slices a JPEG (quality 75, 0.027), re-windowed (0.008) or 0.5x-1.7x rescaled copy (0.05 for 95%, 0.10 at most);
# on 64-px generated ones a JPEG (0.076); different generated slices differ by 0.075 or more (two classes 0.10).
# The real copy is at 0.043-0.048, neighbouring slices of one scan from 0.053 (flagged too: a thumbnail cannot tell
# them apart), different scans from 0.24.
THUMBNAIL = 16
NEAR_MAX_DIFFERENCE = 0.08
NEAR = (f"mean absolute difference at most {NEAR_MAX_DIFFERENCE} between {THUMBNAIL}x{THUMBNAIL} box-filtered "
        "thumbnails less their mean and divided by their mean absolute deviation, from the group's first slice; "
        "different pixels (the same slice rescaled, re-encoded or re-windowed, or a neighbouring slice of one "
        "scan)")
_COARSE = 4  # the k-d tree proposes pairs by the thumbnails' _COARSE x _COARSE block means
_PAIRS_CHUNK = 1 << 14  # proposed pairs compared at once (2 x 16 MiB of thumbnails)
_CHUNK = 256
_SHOWN = 3  # example ids per warning


def slice_hash(image: np.ndarray) -> str:
  """Exact hash of a decoded slice: equal iff dtype, shape and every pixel are equal."""
  image = np.ascontiguousarray(image)
  h = hashlib.blake2b(f"{image.dtype.str}{image.shape}".encode(), digest_size=16)
  h.update(image.tobytes())
  return h.hexdigest()


def thumbnail(image: np.ndarray) -> np.ndarray:
  """The slice box-filtered to THUMBNAIL x THUMBNAIL, less its mean, over its mean absolute deviation.

  So a re-windowed copy (grey levels shifted or scaled) keeps its thumbnail, and the nearly empty slices
  a failed lung mask leaves (one blob each) are far apart rather than all within a grey level. A flat
  slice gives zeros. The mean over channels makes RGB and gray copies equal.
  """
  channels = np.asarray(image).reshape(image.shape[0], image.shape[1], -1)
  gray = channels[:, :, 0] if channels.shape[2] == 1 else channels.mean(-1)
  small = np.asarray(Image.fromarray(gray.astype(np.float32)).resize((THUMBNAIL,) * 2, Image.Resampling.BOX))
  small = small - small.mean()
  spread = np.abs(small).mean()
  return small / spread if spread > 1e-3 else np.zeros_like(small)


def report_path(builder: tfds.core.DatasetBuilder) -> epath.Path:
  return epath.Path(builder.data_dir) / FILENAME


def split_order(splits: Iterable[str]) -> list[str]:
  """train, validation, test, then the rest (e.g. folds) by name: earlier splits keep their copies."""
  rank = {"train": 0, "validation": 1, "test": 2}
  return sorted(splits, key=lambda s: (rank.get(s, 3), s))


def _decode_and_hash(data: bytes) -> tuple[str, np.ndarray]:
  with Image.open(io.BytesIO(data)) as im:
    image = np.asarray(im)
  if image.ndim == 2:
    image = image[:, :, None]  # what the (H, W, 1) image feature decodes to
  return slice_hash(image), thumbnail(image)


def _members(builder: tfds.core.DatasetBuilder, split: str,
             pool: concurrent.futures.Executor) -> list[dict[str, Any]]:
  """One record per stored example of `split`, in storage order, with its hash and thumbnail."""
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  label = builder.info.features["label"]
  out = []
  for start in range(0, len(source), _CHUNK):
    examples = source.__getitems__(range(start, min(start + _CHUNK, len(source))))
    hashes = pool.map(_decode_and_hash, [ex["image"] for ex in examples])
    for index, (ex, (exact, thumb)) in enumerate(zip(examples, hashes), start=start):
      out.append({"split": split, "index": index, "id": ex["id"].decode(),
                  "label": label.int2str(int(ex["label"])), "exact": exact, "thumbnail": thumb})
  return out


def near_pairs(thumbnails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(i, j), i < j, and the distance of every pair of `thumbnails` (n, THUMBNAIL, THUMBNAIL) within the limit.

  A k-d tree over the _COARSE x _COARSE block means proposes pairs: their summed absolute difference is
  at most (_COARSE / THUMBNAIL)^2 times the thumbnails', so no pair within the limit is missed, and only
  the few proposed per slice (mostly neighbouring slices) are compared in full, not all n^2 / 2.
  """
  n, block = len(thumbnails), THUMBNAIL // _COARSE
  flat = thumbnails.reshape(n, -1).astype(np.float32)
  coarse = thumbnails.reshape(n, _COARSE, block, _COARSE, block).mean((2, 4)).reshape(n, -1)
  radius = _COARSE**2 * NEAR_MAX_DIFFERENCE * (1 + 1e-5)
  candidates = spatial.KDTree(coarse, leafsize=64).query_pairs(radius, p=1, output_type="ndarray").reshape(-1, 2)
  distance = np.concatenate([np.abs(flat[chunk[:, 0]] - flat[chunk[:, 1]]).mean(1) for chunk in np.split(
      candidates, range(_PAIRS_CHUNK, len(candidates), _PAIRS_CHUNK))])
  close = distance <= NEAR_MAX_DIFFERENCE
  return candidates[close], distance[close]


def _near_groups(members: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
  """`members` (storage order) in groups within NEAR_MAX_DIFFERENCE of each group's first slice.

  Against the first slice only, so a group never drifts along a chain of neighbouring slices; a slice
  close to several firsts joins the closest. Exact copies are placed once, as one slice, so they always
  share a group.
  """
  by_pixels: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for m in members:
    by_pixels[m["exact"]].append(m)
  unique = list(by_pixels.values())
  if not unique:
    return []
  pairs, distance = near_pairs(np.stack([same[0]["thumbnail"] for same in unique]))
  earlier: list[list[int]] = [[] for _ in unique]  # each slice's close earlier slices, closest first
  for i, j in pairs[np.lexsort((pairs[:, 0], distance, pairs[:, 1]))].tolist():
    earlier[j].append(i)
  groups: list[list[dict[str, Any]]] = []
  group_of_first: dict[int, int] = {}
  for k, same in enumerate(unique):
    first = next((i for i in earlier[k] if i in group_of_first), None)
    if first is None:
      group_of_first[k] = len(groups)
      groups.append(list(same))
    else:
      groups[group_of_first[first]].extend(same)
  return groups


def _group_report(members: list[dict[str, Any]], key: str, order: Sequence[str]) -> dict[str, Any]:
  """Groups of identical (`key` "exact") or near-identical ("near") members, flagged, plus counts per pair of
  splits and per split."""
  if key == "near":
    candidates = _near_groups(members)
  else:
    by_hash: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for m in members:
      by_hash[m["exact"]].append(m)
    candidates = list(by_hash.values())
  groups = []
  for group in candidates:
    if len(group) < 2 or (key == "near" and len({m["exact"] for m in group}) < 2):
      continue  # a near group is only news when its pixels differ
    splits = [s for s in order if any(m["split"] == s for m in group)]
    groups.append({
        **({"hash": group[0]["exact"]} if key == "exact" else {}),
        "splits": splits, "cross_split": len(splits) > 1,
        "label_conflict": len({m["label"] for m in group}) > 1,
        "members": [{k: m[k] for k in ("split", "index", "id", "label")}
                    for m in sorted(group, key=lambda m: (order.index(m["split"]), m["id"]))]})
  groups.sort(key=lambda g: (order.index(g["splits"][0]), g["members"][0]["id"]))
  cross: dict[str, dict[str, Any]] = {}
  for g in groups:
    for a, b in itertools.combinations(g["splits"], 2):
      pair = cross.setdefault(f"{a}/{b}", {"groups": 0, "examples": {a: 0, b: 0}})
      pair["groups"] += 1
      for s in (a, b):
        pair["examples"][s] += sum(m["split"] == s for m in g["members"])
  within: dict[str, dict[str, int]] = {}
  for g in groups:
    for s in g["splits"]:
      n = sum(m["split"] == s for m in g["members"])
      if n > 1:
        entry = within.setdefault(s, {"groups": 0, "examples": 0})
        entry["groups"] += 1
        entry["examples"] += n
  return {"groups": groups, "cross_split": cross, "within_split": within,
          "label_conflicts": sum(g["label_conflict"] for g in groups)}


def compute(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The duplicates report of a prepared builder (decodes and hashes every stored slice)."""
  order = split_order(builder.info.splits)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without the GIL
    members = [m for split in order for m in _members(builder, split, pool)]
  return {
      "format": FORMAT, "dataset": builder.info.full_name, "exact_hash": EXACT, "near_criterion": NEAR,
      "splits": {s: sum(m["split"] == s for m in members) for s in order},
      "exact": _group_report(members, "exact", order),
      "near": _group_report(members, "near", order),
  }


def write(builder: tfds.core.DatasetBuilder, report: dict[str, Any]) -> None:
  """Writes under a temporary name and renames: a killed build never leaves a half file."""
  path = report_path(builder)
  tmp = path.with_name(f"{FILENAME}.tmp-{uuid.uuid4().hex}")  # unique: processes may race here
  try:
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def _current(builder: tfds.core.DatasetBuilder, path: epath.Path) -> dict[str, Any] | None:
  """The stored report when it describes this build, else None (with the reason logged)."""
  try:
    report = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s); recomputing it.", path, e)
    return None
  expected = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  if report.get("format") != FORMAT or report.get("splits") != expected:
    logging.warning("%s describes another build (format %s, splits %s; the data has %s); "
                    "recomputing it.", path, report.get("format"), report.get("splits"), expected)
    return None
  return report


def ensure(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The report of a prepared builder: read from `duplicates.json`, or computed and written there."""
  path = report_path(builder)
  if path.exists() and (report := _current(builder, path)) is not None:
    return report
  logging.info("Hashing every slice of %s for %s.", builder.info.full_name, path)
  report = compute(builder)
  write(builder, report)
  return report


def _example(group: dict[str, Any], splits: Sequence[str]) -> str:
  return " = ".join(f"{m['split']}:{m['id']}" for m in group["members"] if m["split"] in splits)


def warn(report: dict[str, Any], path: epath.Path | str, near_level: int = logging.INFO) -> None:
  """Logs exact cross-split copies (per pair of splits) and label conflicts as warnings.

  Near-duplicates get one short information line for all pairs (counts, at most
  _SHOWN examples): a resized or re-encoded copy and two similar slices look
  alike to the criterion, so a person must look, and on every run a longer
  report would bury the log. `near_level` is absl's; a generated set, whose slices are independent draws
  and so cannot leak by near copies, logs them at DEBUG.
  """
  exact = report["exact"]
  for pair, stats in exact["cross_split"].items():
    a, b = pair.split("/")
    shown = [_example(g, (a, b)) for g in exact["groups"] if a in g["splits"] and b in g["splits"]]
    counts = ", ".join(f"{n} in {s}" for s, n in stats["examples"].items())
    logging.warning("%s: %d group(s) of identical slices cross %s and %s (%s), e.g. %s. Metrics on %s are "
                    "inflated; config.dedup=True evaluates without these copies. All groups: %s",
                    report["dataset"], stats["groups"], a, b, counts, "; ".join(shown[:_SHOWN]), b, path)
  if exact["label_conflicts"]:
    logging.warning("%s: %d group(s) of identical slices carry different labels (a labelling conflict), e.g. "
                    "%s. See %s", report["dataset"], exact["label_conflicts"], _conflicts(exact), path)
  near = report["near"]
  if near["cross_split"]:
    pairs = ", ".join(f"{stats['groups']} {pair.replace('/', '-')}" for pair, stats in near["cross_split"].items())
    shown = [_pair(g) for g in near["groups"] if g["cross_split"]][:_SHOWN]
    logging.log(near_level, "%s: %d group(s) of near-identical slices cross splits (%s; %d with different labels), "
                "e.g. %s. See %s (config.dedup removes exact copies only).", report["dataset"],
                sum(g["cross_split"] for g in near["groups"]), pairs, near["label_conflicts"], "; ".join(shown), path)


def _pair(group: dict[str, Any]) -> str:
  """A cross-split group as two of its members from different splits, and how many more it has."""
  first = group["members"][0]
  other = next(m for m in group["members"] if m["split"] != first["split"])
  more = len(group["members"]) - 2
  return f"{first['split']}:{first['id']} = {other['split']}:{other['id']}" + (f" (+{more})" if more else "")


def _conflicts(part: dict[str, Any]) -> str:
  """The first groups whose members carry different labels, each member with its split and label."""
  groups = [g for g in part["groups"] if g["label_conflict"]][:_SHOWN]
  return "; ".join(", ".join(f"{m['split']}:{m['id']} ({m['label']})" for m in g["members"]) for g in groups)


def copies_to_remove(report: dict[str, Any], train_splits: Sequence[str],
                     eval_splits: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
  """Per eval split, its members identical to a slice of the training splits or of an earlier eval split.

  Training is never touched; between eval splits the earlier one (validation before test)
  keeps its copy, so no slice is both selected on and reported.
  """
  removed: dict[str, list[dict[str, Any]]] = {s: [] for s in eval_splits}
  for group in report["exact"]["groups"]:
    present, earlier = set(group["splits"]), set(train_splits)
    for split in eval_splits:
      if split in present and present & earlier:
        removed[split].extend(m for m in group["members"] if m["split"] == split)
      earlier.add(split)
  for members in removed.values():
    members.sort(key=lambda m: m["index"])
  return removed
