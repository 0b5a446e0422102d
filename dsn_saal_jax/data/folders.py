"""Labeled folders of CT slices: `<root>/<class>/...`, the layout users' own data comes in.

One scan serves the `image_folder` TFDS builder (training on your own data)
and `launch/evaluate.py --data` (measuring a checkpoint on another
hospital's labeled set), so both agree on what a class, a case and a split
are:

  <root>/<class>/<slice>                 every slice is its own case
  <root>/<class>/<case>/.../<slice>      slices grouped by case (patient/scan)
  <root>/{train,val,test}/<class>/...    explicit splits, used as they are

Slices are PNG, JPEG, BMP, TIFF or DICOM (see `common.is_slice`), mixed
freely. Class order is `class_names` when given, else the sorted folder
names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from etils import epath

from dsn_saal_jax.data.builders import common
from dsn_saal_jax.data.builders.common import DatasetError

# Explicit split folders and the names they may go by.
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One slice file: its class index, its case (the group that never straddles splits) and split."""
  path: epath.Path
  label: int
  case: str     # "<class folder>/<case folder>" or, for a slice directly in its class folder, its own id
  id: str       # path relative to the root, "/"-separated: stable across machines
  split: str | None = None  # "train" / "val" / "test" under explicit split folders, else None


@dataclasses.dataclass(frozen=True)
class LabeledFolder:
  root: epath.Path
  class_names: tuple[str, ...]
  slices: tuple[Slice, ...]
  skipped: tuple[tuple[str, str], ...]  # (file, reason): files under class folders that are no slice
  has_cases: bool                       # some class folder holds case sub-folders
  explicit_splits: bool

  def counts(self, split: str | None = None) -> list[int]:
    """Slices per class (in one explicit split when `split` is given)."""
    counts = [0] * len(self.class_names)
    for s in self.slices:
      if split is None or s.split == split:
        counts[s.label] += 1
    return counts


def _split_folders(root: epath.Path, require_train: bool) -> dict[str, epath.Path]:
  """{split: folder} when the root holds explicit split folders, else {}."""
  found = {}
  for entry in common.visible(root):
    for split, aliases in SPLIT_FOLDERS.items():
      if entry.is_dir() and entry.name.lower() in aliases:
        if split in found:
          raise DatasetError(f"{root} holds two folders for the {split} split: {found[split].name} and "
                             f"{entry.name}. Keep one.")
        found[split] = entry
  if found and require_train and "train" not in found:
    raise DatasetError(f"{root} has split folders {sorted(f.name for f in found.values())} but no train/ "
                       "folder. Add train/, or lay the data out as <root>/<class>/... for a seeded split.")
  return found


def _class_folders(folder: epath.Path) -> dict[str, epath.Path]:
  classes = {e.name: e for e in common.visible(folder) if e.is_dir()}
  if not classes:
    raise DatasetError(f"{folder} holds no class folders. Lay the data out as {folder}/<class>/<slices> "
                       "(for example covid/ and non_covid/).")
  return classes


def _resolve_classes(folders: Sequence[str], where: epath.Path, class_names: Sequence[str] | None,
                     class_map: Mapping[str, str] | None) -> dict[str, str]:
  """{folder name: class name}, refusing unmapped folders and unknown classes by name."""
  if class_map is not None:
    if class_names is None:
      raise ValueError("A class map needs the class names it maps to.")
    unmapped = [f for f in folders if f not in class_map]
    unknown = sorted({c for f, c in class_map.items() if c not in class_names})
    if unmapped or unknown:
      raise DatasetError(
          f"Class map {dict(class_map)} does not fit {where}: "
          + (f"folders {unmapped} are not mapped" if unmapped else "")
          + ("; " if unmapped and unknown else "")
          + (f"classes {unknown} are not among the run's classes {list(class_names)}" if unknown else "")
          + ". Map every folder to one of the run's classes, e.g. --class_map=Healthy:non_covid,Covid:covid.")
    return {f: class_map[f] for f in folders}
  if class_names is not None:
    unknown = [f for f in folders if f not in class_names]
    if unknown:
      raise DatasetError(f"Class folders {unknown} in {where} are not among the classes {list(class_names)}. "
                         "Rename them, or give a class map (evaluate.py --class_map=Folder:class,...).")
  return {f: f for f in folders}


def _scan_class(folder: epath.Path, root: epath.Path, label: int, split: str | None,
                slices: list[Slice], skipped: list[tuple[str, str]]) -> bool:
  """Appends the class folder's slices; True when it holds case sub-folders."""
  rel = lambda p: os.path.relpath(os.fspath(p), os.fspath(root)).replace(os.sep, "/")
  entries = common.visible(folder)
  has_cases = False
  for entry in entries:
    if entry.is_dir():
      has_cases = True
      found = 0
      for path in common.slice_files(entry, skipped=skipped, relative_to=root):
        slices.append(Slice(path, label, rel(entry), rel(path), split))
        found += 1
      if not found:
        raise DatasetError(f"Case folder {entry} holds no slices (PNG, JPEG, BMP, TIFF or DICOM). "
                           "Add its slices, or remove the folder.")
    elif common.is_slice(entry):
      slices.append(Slice(entry, label, rel(entry), rel(entry), split))
    else:
      skipped.append((rel(entry), "not an image or DICOM file (by its extension)"))
  if not any(s.label == label and s.split == split for s in slices):
    raise DatasetError(f"Class folder {folder} holds no slices (PNG, JPEG, BMP, TIFF or DICOM). Add "
                       "slices, or remove the folder if the class does not exist in your data.")
  return has_cases


def scan(root: str | os.PathLike, class_names: Sequence[str] | None = None,
         class_map: Mapping[str, str] | None = None, require_train: bool = True) -> LabeledFolder:
  """Lists every slice under `root` with its class, case and explicit split.

  `class_names` fixes the class order (folders must be among them; a class
  with no folder is allowed only with `class_map`, for evaluation sets that
  lack a class); `class_map` renames folders to those classes. Errors name
  the folder or file and the fix: no class folders, one class, an empty
  class or case folder, an unknown or unmapped folder. Training needs a
  train/ folder among explicit split folders; evaluation sets
  (`require_train=False`) may hold only val/ or test/.
  """
  root = epath.Path(root)
  if not root.is_dir():
    raise DatasetError(f"{root} is not a folder. Give the folder that holds one sub-folder per class.")
  splits = _split_folders(root, require_train)
  per_split = {s: _class_folders(f) for s, f in splits.items()} or {None: _class_folders(root)}
  folder_names = sorted({name for classes in per_split.values() for name in classes})
  mapping = _resolve_classes(folder_names, root, class_names, class_map)
  names = tuple(class_names) if class_names is not None else tuple(folder_names)
  if len(names) < 2:
    raise DatasetError(f"{root} holds a single class folder ({folder_names[0]}); a classifier needs at "
                       "least two classes, each in its own folder.")
  if class_map is None:
    missing = [c for c in names if c not in folder_names]
    if missing:
      raise DatasetError(f"{root} has no folder for the classes {missing}. Add them, or leave them out of "
                         "config.class_names.")
  slices: list[Slice] = []
  skipped: list[tuple[str, str]] = []
  has_cases = False
  for split, classes in per_split.items():
    for folder_name, folder in sorted(classes.items()):
      has_cases |= _scan_class(folder, root, names.index(mapping[folder_name]), split, slices, skipped)
  return LabeledFolder(root, names, tuple(slices), tuple(skipped), has_cases, bool(splits))
