"""Your own labeled CT slices: one folder per class, split by case (see `dsn_saal_jax.data.folders`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence

import tensorflow_datasets as tfds

from dsn_saal_jax import config_lib
from dsn_saal_jax.data import folders
from dsn_saal_jax.data.builders import common

# folders' split names -> the TFDS split names the input pipeline reads.
SPLITS = {"train": "train", "val": "validation", "test": "test"}
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)

INSTRUCTIONS = """\
One folder per class (its name is the class name), slices inside, optionally grouped by case:
  <manual_dir>/<class>/<slice>                every slice is its own case
  <manual_dir>/<class>/<case>/.../<slice>     slices of one patient/scan stay in one split
  <manual_dir>/{train,val,test}/<class>/...   explicit splits, used as they are
Slices are PNG, JPEG, BMP, TIFF (8-bit, windowed) or CT DICOM (.dcm, .dicom, or no extension
and DICOM content; converted to HU, windowed WL -400 / WW 1500 and lung-masked), mixed freely,
at least 16 px a side. Each file counts once, under the class folder it lies in (links back into
the folder are not followed). Without split
folders each class's cases are split train/val/test by config.split_fractions, seeded by
config.split_seed. Point the run at the folder with --config.manual_dir=/path/to/folder.
"""


@dataclasses.dataclass(eq=False, repr=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Everything that shapes the built data; `make_config` hashes it into the config name."""
  manual_dir: str = ""
  class_names: tuple[str, ...] = ()
  split_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
  split_seed: int = 0
  lung_mask: bool = False
  files: str = ""  # digest of the slice ids and labels the folder held when the config was made

  def __repr__(self) -> str:  # TFDS logs the config it is given; every field would be ~600 characters
    return f"image_folder/{self.name} ({self.manual_dir})"


def _files_digest(folder: folders.LabeledFolder) -> str:
  listing = sorted(f"{s.label}:{s.id}" for s in folder.slices)
  return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]


def make_config(manual_dir: str, class_names: Sequence[str] = (),
                split_fractions: Sequence[float] = DEFAULT_FRACTIONS, split_seed: int = 0,
                lung_mask: bool = False) -> FolderConfig:
  """A config named by a hash of the folder (path and files), classes, split and lung mask.

  Any change (another class order, other fractions or seed, a slice added,
  removed or renamed) gets its own TFDS directory, so a stale build is never
  reused; a slice overwritten in place under the same name is not noticed
  (delete the dataset directory to rebuild). The folder is scanned here, so
  layout errors surface before TFDS writes anything.
  """
  if not manual_dir:
    raise common.DatasetError(
        "image_folder needs the folder of your data: pass --config.manual_dir=/path/to/folder.\n"
        + INSTRUCTIONS)
  root = os.path.abspath(os.path.expanduser(manual_dir))
  config_lib.check_split_fractions(split_fractions)
  folder = folders.scan(root, tuple(class_names) or None)
  split_slices(folder, split_fractions, split_seed)  # a class too small for the splits, before TFDS writes
  fields = dict(manual_dir=root, class_names=folder.class_names,
                split_fractions=tuple(float(f) for f in split_fractions), split_seed=int(split_seed),
                lung_mask=bool(lung_mask), files=_files_digest(folder))
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
  return FolderConfig(
      name=f"{'lung_mask' if lung_mask else 'original'}_{digest}", **fields,
      description=(f"{root}: classes {list(folder.class_names)}, split {fields['split_fractions']} "
                   f"seed {split_seed}, lung_mask={lung_mask}."))


def case_counts(num_cases: int, fractions: Sequence[float], class_name: str) -> tuple[int, int, int]:
  """Cases of one class per split: largest remainders, then one for every split with a positive share.

  At least one case per split keeps every class in validation and test, so
  per-class metrics and checkpoint selection always see it.
  """
  needed = [i for i, f in enumerate(fractions) if f > 0]
  if num_cases < len(needed):
    raise common.DatasetError(
        f"Class {class_name} has {num_cases} case(s), fewer than the {len(needed)} splits that "
        f"config.split_fractions={tuple(fractions)} fills; every class needs at least one case in each. "
        "Add cases, or set the validation share to 0 (e.g. --config.split_fractions='(0.8, 0, 0.2)').")
  raw = [f * num_cases for f in fractions]
  counts = [math.floor(r) for r in raw]
  for i in sorted(range(3), key=lambda i: (counts[i] - raw[i], i))[:num_cases - sum(counts)]:
    counts[i] += 1
  for i in needed:
    if counts[i] == 0:
      counts[max(range(3), key=lambda j: counts[j])] -= 1
      counts[i] += 1
  return counts[0], counts[1], counts[2]


def _case_rank(seed: int, case: str) -> bytes:
  return hashlib.sha256(f"{seed}/{case}".encode()).digest()


def split_slices(folder: folders.LabeledFolder, fractions: Sequence[float],
                 seed: int) -> dict[str, list[folders.Slice]]:
  """TFDS split name -> its slices (sorted by id); splits with no slice are left out.

  Explicit split folders are used as they are. Otherwise each class's cases
  are ordered by a seeded hash of their id and cut by `case_counts`: a case's
  side depends only on the set of ids and the seed, never on listing order,
  and no case is on two sides.
  """
  splits: dict[str, list[folders.Slice]] = {name: [] for name in SPLITS.values()}
  if folder.explicit_splits:
    for s in folder.slices:
      splits[SPLITS[s.split]].append(s)
    return {name: sorted(items, key=lambda s: s.id) for name, items in splits.items() if items}
  for label, class_name in enumerate(folder.class_names):
    cases: dict[str, list[folders.Slice]] = {}
    for s in folder.slices:
      if s.label == label:
        cases.setdefault(s.case, []).append(s)
    order = sorted(cases, key=lambda c: (_case_rank(seed, c), c))
    n_train, n_val, _ = case_counts(len(order), fractions, class_name)
    for rank, case in enumerate(order):
      name = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
      splits[name].extend(cases[case])
  return {name: sorted(items, key=lambda s: s.id) for name, items in splits.items() if items}


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A labeled folder of CT slices. Labels: config.class_names, else the sorted folder names.

  Files under the class folders that are no slice (by extension or content) fail the
  build with a DatasetError naming them, rather than being skipped: a
  silently dropped scan (a .nii, a zipped DICOM) would bias the data.
  """

  name = "image_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  COVID_CLASS = None  # The input pipeline finds the minority class by name (config.minority_class).

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return common.dataset_info(self, f"Labeled CT slices from {cfg.manual_dir}, split by case.", cfg.class_names,
                               cases=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The folder is the config's: its path is part of the config's name.
    cfg = self.builder_config
    folder = folders.scan(cfg.manual_dir, cfg.class_names)
    if _files_digest(folder) != cfg.files:
      raise common.DatasetError(
          f"{cfg.manual_dir} changed (files added, removed or moved) since this run listed it. "
          "Run again once it is complete; the new listing gets its own dataset directory.")
    if folder.skipped:
      shown = "\n".join(f"  {cfg.manual_dir}/{path}: {reason}" for path, reason in folder.skipped[:10])
      raise common.DatasetError(
          f"{len(folder.skipped)} file(s) under the class folders are not slices:\n{shown}\n"
          "Convert them to PNG or DICOM, or move them out of the folder.")
    splits = split_slices(folder, cfg.split_fractions, cfg.split_seed)
    return {name: self._generate_examples(items) for name, items in splits.items()}

  def _generate_examples(self, items: list[folders.Slice]):
    for s in items:
      yield s.id, {"image": common.read_slice(s.path, self.builder_config.lung_mask),
                   "label": s.label, "id": s.id, "case": s.case}
