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
names. Which files a folder holds is one rule (`walk_files`, `count_once`),
shared with predict.py: each real file is counted once, under the class
folder it really lives in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from absl import logging
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


# ----------------------------------------------------------------------------- which files a folder holds


def _within(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk_files(top: str | os.PathLike, root: str | os.PathLike | None = None,
               walked: dict[str, str] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
  """(files, passed-over folder links) under `top`, recursively and sorted, without hidden files and litter.

  A link to a folder is followed only when its real path lies outside `root`
  (default `top`), does not hold it, and neither holds nor lies in a folder
  already walked (`walked`: {real path: the `top` it was walked from}, shared
  across the calls of one scan): a
  link back into the tree (`covid/up -> ..`) or to a folder listed elsewhere
  would count its slices twice, possibly under another class. A folder link
  leading outside the root (data kept on another disk) is followed. Links
  to files are listed; `count_once` keeps one path per real file.
  """
  top = os.fspath(top)
  real_root = os.path.realpath(os.fspath(root) if root is not None else top)
  walked = {} if walked is None else walked
  walked[os.path.realpath(top)] = top
  files: list[str] = []
  passed: list[tuple[str, str]] = []

  def visit(folder: str) -> None:
    for name in sorted(os.listdir(folder)):
      if common._ignored(name):  # pylint: disable=protected-access
        continue
      path = os.path.join(folder, name)
      if not os.path.isdir(path):
        files.append(path)
        continue
      real = os.path.realpath(path)
      if os.path.islink(path) and (_within(real, real_root) or _within(real_root, real)
                                   or any(_within(real, w) or _within(w, real) for w in walked)):
        passed.append((path, f"a link to the folder {real}, which lies in (or holds) the data folder or a "
                             "folder already listed: not followed, so no slice is counted twice"))
        continue
      walked[real] = top
      visit(path)

  visit(top)
  return sorted(files), passed


def count_once(paths: Sequence[str], root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
  """(`paths` with one path per real file, in their order; (path, reason) for the others).

  A real file that lies under `root` is counted at its own place when that is
  among `paths`; otherwise (a link to a file outside the root) at its first
  path in sorted order. The other paths to it are links: passed over.
  """
  root = os.fspath(root)
  real_root = os.path.realpath(root)
  real = {p: os.path.realpath(p) for p in paths}
  own = lambda p: real[p] == os.path.join(real_root, os.path.relpath(p, root))
  chosen: dict[str, str] = {}
  for p in sorted(paths, key=lambda p: (not own(p), p)):
    chosen.setdefault(real[p], p)
  kept = [p for p in paths if chosen[real[p]] == p]
  passed = [(p, f"a link to {chosen[real[p]]}, which is counted there") for p in paths if chosen[real[p]] != p]
  return kept, passed


_WARNED: set[str] = set()  # warnings given in this process: a folder is scanned more than once per run


def warn_passed_over(passed: Sequence[tuple[str, str]], where: str | os.PathLike) -> None:
  """One warning (once per process) naming the links `walk_files` and `count_once` passed over (the first ten)."""
  if passed:
    shown = "\n".join(f"  {path}: {reason}" for path, reason in passed[:10])
    message = (f"Passing over {len(passed)} link(s) under {where}, so that each file is counted once:\n{shown}"
               + ("\n  ..." if len(passed) > 10 else ""))
    if message not in _WARNED:
      _WARNED.add(message)
      logging.warning("%s", message)


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
                walked: set[str]) -> tuple[list[Slice], list[str], list[tuple[str, str]], list[tuple[str, str]]]:
  """(the class folder's slices, its case folders, its non-slice files, its passed-over folder links)."""
  rel = lambda p: os.path.relpath(os.fspath(p), os.fspath(root)).replace(os.sep, "/")
  files, passed = walk_files(folder, root, walked)
  slices, skipped = [], []
  for path in files:
    if not common.is_slice(path):
      skipped.append((rel(path), common.NOT_A_SLICE))
      continue
    inner = os.path.relpath(path, os.fspath(folder)).split(os.sep)
    case = rel(os.path.join(os.fspath(folder), inner[0]))  # a slice directly in the class folder: its own case
    slices.append(Slice(epath.Path(path), label, case, rel(path), split))
  skipped_links = {p for p, _ in passed}
  cases = [rel(e) for e in common.visible(folder) if e.is_dir() and os.fspath(e) not in skipped_links]
  return slices, cases, skipped, passed


def _refuse_links_across_classes(root: epath.Path, found: Sequence[Slice], kept: Sequence[str],
                                 duplicates: Sequence[tuple[str, str]],
                                 links: Sequence[tuple[str, tuple[int, str | None]]], walked: Mapping[str, str],
                                 class_folders: Sequence[tuple[epath.Path, int, str | None]]) -> None:
  """A DatasetError when two class (or split) folders link to the same files outside the root.

  Inside the root a file belongs to the class folder it lies in; outside it
  nothing says which of the two labels (or splits) is right, so neither is
  guessed.
  """
  real_root = os.path.realpath(root)
  where = {os.fspath(s.path): (s.label, s.split) for s in found}
  chosen = {os.path.realpath(p): p for p in kept}
  pairs = [(p, chosen[os.path.realpath(p)], where[p], where[chosen[os.path.realpath(p)]]) for p, _ in duplicates]
  class_of = {os.fspath(folder): (label, split) for folder, label, split in class_folders}
  for p, key in links:
    real = os.path.realpath(p)
    pairs += [(p, top, key, class_of[top]) for w, top in walked.items()
              if (_within(real, w) or _within(w, real)) and top in class_of]
  for p, other, key, other_key in pairs:
    real = os.path.realpath(p)
    if key != other_key and not _within(real, real_root) and not _within(real_root, real):
      raise DatasetError(f"{p} and {other} lead to the same files ({real}) from two class or split folders, "
                         "so their label or split would be a guess. Keep the link in one of them.")


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
      fix = ("leave them out of config.class_names" if require_train else "evaluate on the classes present "
             f"with a class map (evaluate.py --class_map={','.join(f'{f}:{f}' for f in folder_names)})")
      raise DatasetError(f"{root} has no folder for the classes {missing}. Add them, or {fix}.")
  found: list[Slice] = []
  skipped: list[tuple[str, str]] = []
  passed: list[tuple[str, str]] = []
  cases: list[tuple[str, epath.Path]] = []
  walked: dict[str, str] = {}
  class_folders = []
  links: list[tuple[str, tuple[int, str | None]]] = []  # passed-over folder links, with their class and split
  for split, classes in per_split.items():
    for folder_name, folder in sorted(classes.items()):
      label = names.index(mapping[folder_name])
      class_slices, class_cases, class_skipped, class_passed = _scan_class(folder, root, label, split, walked)
      found += class_slices
      skipped += class_skipped
      passed += class_passed
      links += [(p, (label, split)) for p, _ in class_passed]
      cases += [(c, folder) for c in class_cases]
      class_folders.append((folder, label, split))
  kept, duplicates = count_once([os.fspath(s.path) for s in found], root)
  _refuse_links_across_classes(root, found, kept, duplicates, links, walked, class_folders)
  kept = set(kept)
  slices = [s for s in found if os.fspath(s.path) in kept]
  warn_passed_over(passed + duplicates, root)
  counted_cases = {s.case for s in slices}
  for case, folder in cases:
    if case not in counted_cases:
      raise DatasetError(f"Case folder {root / case} holds no slices (PNG, JPEG, BMP, TIFF or DICOM). "
                         "Add its slices, or remove the folder.")
  for folder, label, split in class_folders:
    if not any(s.label == label and s.split == split for s in slices):
      raise DatasetError(f"Class folder {folder} holds no slices (PNG, JPEG, BMP, TIFF or DICOM). Add "
                         "slices, or remove the folder if the class does not exist in your data.")
  return LabeledFolder(root, names, tuple(slices), tuple(skipped), bool(cases), bool(splits))
