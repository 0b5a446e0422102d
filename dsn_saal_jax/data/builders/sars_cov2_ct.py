"""SARS-CoV-2 CT-scan dataset (Soares et al. 2020): 1252 COVID / 1229 non-COVID slices, 5 folds."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dsn_saal_jax.data.builders import common, duplicates
from dsn_saal_jax.data.builders.covid19_ct import PNG_CONFIGS

CLASS_NAMES = ("non_covid", "covid")
CLASS_DIRS = ("non-COVID", "COVID")
NUM_FOLDS = 5
# Fixed, so that the folds (the paper's 5-fold cross-validation) never depend on the run.
FOLD_SEED = 0

INSTRUCTIONS = """\
The Kaggle "SARS-COV-2 Ct-Scan Dataset" extracted as-is (class folder names are
matched case-insensitively; images may sit in sub-folders):
  <manual_dir>/COVID/*.png
  <manual_dir>/non-COVID/*.png
"""


def fold_name(fold: int) -> str:
  return f"fold{fold}"


def assign_folds(names_per_class: list[list[str]], hashes: Mapping[str, str] | None = None,
                 num_folds: int = NUM_FOLDS, seed: int = FOLD_SEED) -> list[dict[str, int]]:
  """Stratified fold of every file, keeping files with equal `hashes` (identical slices) in one fold.

  Each class's groups, in a seeded permutation of their sorted first names and then
  largest first, go to the fold with the fewest examples of that class (the lowest
  such fold on ties). Groups that mix classes (a labelling conflict) are placed first,
  on the fold with the fewest examples. Without duplicates this deals each class
  round-robin, as version 1.0.0 did, so those folds are unchanged. The result depends
  only on the names and hashes, not on listing order or the run; per class, fold sizes
  differ by at most the largest group (one without duplicates).
  """
  hashes = hashes or {}
  by_key: dict[str, list[tuple[int, str]]] = {}
  for label, names in enumerate(names_per_class):
    for name in names:
      by_key.setdefault(hashes.get(name, f"file:{name}"), []).append((label, name))
  groups = sorted((sorted(g, key=lambda m: m[1]) for g in by_key.values()), key=lambda g: g[0][1])
  counts = np.zeros((num_folds, len(names_per_class)), np.int64)
  folds: list[dict[str, int]] = [{} for _ in names_per_class]

  def place(group: list[tuple[int, str]], fold: int) -> None:
    for label, name in group:
      folds[label][name] = fold
      counts[fold, label] += 1

  mixed = [g for g in groups if len({label for label, _ in g}) > 1]
  for i in np.random.default_rng([seed, len(names_per_class)]).permutation(len(mixed)):
    place(mixed[i], int(np.argmin(counts.sum(1))))
  for label in range(len(names_per_class)):
    own = [g for g in groups if {lb for lb, _ in g} == {label}]
    order = np.random.default_rng([seed, label]).permutation(len(own))
    for i in sorted(order, key=lambda i: -len(own[i])):  # stable: the permutation within a size
      place(own[i], int(np.argmin(counts[:, label])))
  return folds


class SarsCov2Ct(tfds.core.GeneratorBasedBuilder):
  """SARS-CoV-2 CT-scan. Labels: 0 = non_covid, 1 = covid. Splits fold0..fold4 (stratified)."""

  name = "sars_cov2_ct"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Identical slices share one fold (no copy in both train and test); folds without "
               "duplicates are unchanged.",
  }
  BUILDER_CONFIGS = PNG_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  COVID_CLASS = 1

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(
        self, "SARS-CoV-2 CT-scan dataset; no official split, 5 deterministic folds.", CLASS_NAMES,
        homepage="https://www.kaggle.com/datasets/plameneduardo/sarscov2-ctscan-dataset")

  def _class_files(self, root: epath.Path) -> list[list[epath.Path]]:
    folders = {}
    for entry in common.visible(root):
      if not entry.is_dir():
        continue
      matches = [d for d in CLASS_DIRS if d.lower() == entry.name.lower()]
      if not matches:
        raise common.unknown_folder_error(entry, CLASS_DIRS)
      folders[matches[0]] = entry
    files = []
    for name in CLASS_DIRS:
      if name not in folders:
        raise common.DatasetError(f"Missing class folder {root / name}. Expected layout:\n"
                                  f"{INSTRUCTIONS}")
      found = common.slice_files(folders[name])
      if not found:
        raise common.DatasetError(f"Class folder {folders[name]} holds no images "
                                  f"({', '.join(common.IMAGE_EXTENSIONS)}).")
      files.append(found)
    return files

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.manual_dir(dl_manager, self.name, INSTRUCTIONS)
    files = self._class_files(root)
    rel = [[f.relative_to(root).as_posix() for f in class_files] for class_files in files]
    folds = assign_folds(rel, self._hashes(files, rel))
    per_fold: list[list[tuple[int, epath.Path, str]]] = [[] for _ in range(NUM_FOLDS)]
    for label, (class_files, class_rel) in enumerate(zip(files, rel)):
      for path, key in zip(class_files, class_rel):
        per_fold[folds[label][key]].append((label, path, key))
    return {fold_name(k): self._generate_examples(items) for k, items in enumerate(per_fold)}

  @staticmethod
  def _hashes(files: list[list[epath.Path]], rel: list[list[str]]) -> dict[str, str]:
    """Exact hash of every decoded source slice, by relative name, for `assign_folds`.

    Taken before the lung mask, so both configs get the same folds (equal slices stay
    equal once masked).
    """
    paths = [p for class_files in files for p in class_files]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      hashes = pool.map(lambda p: duplicates.slice_hash(common.read_image(p)), paths)
      return dict(zip((name for names in rel for name in names), hashes))

  def _generate_examples(self, items: list[tuple[int, epath.Path, str]]):
    for label, path, key in items:
      yield key, {"image": common.read_image(path, self.builder_config.lung_mask),
                  "label": label, "id": key}
