"""COVID19-Diag (the paper's clinical set, on request from its authors): case folders per class."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dsn_saal_jax.data.builders import common

CLASS_NAMES = ("normal", "bacterial_pneumonia", "covid19")
# Accepted class-folder names after lower-casing and dropping non-alphanumerics.
CLASS_ALIASES = {"normal": 0, "bacterialpneumonia": 1, "bacterial": 1, "covid19": 2, "covid": 2}
TEST_FRACTION = 0.3

INSTRUCTIONS = """\
One folder per class, one sub-folder per case (patient/scan), slices inside:
  <manual_dir>/normal/<case id>/<slice>.dcm
  <manual_dir>/bacterial_pneumonia/<case id>/<slice>.dcm
  <manual_dir>/covid19/<case id>/<slice>.dcm
Class folders may also be named Normal, Bacterial, COVID-19, ... (case and punctuation
are ignored). Slices are DICOM (.dcm, .dicom or no extension; converted to HU, windowed
WL -400 / WW 1500 and lung-masked) or 8-bit windowed images (.png, .jpg, ...). The
train/test split is 7:3 by case within each class, seeded by the builder config.
"""


@dataclasses.dataclass(eq=False)
class DiagConfig(tfds.core.BuilderConfig):
  """`lung_mask`: also mask 8-bit images (DICOM is always masked); `split_seed`: the case split."""
  lung_mask: bool = False
  split_seed: int = 0


def split_cases(cases: list[str], seed: int, label: int,
                test_fraction: float = TEST_FRACTION) -> tuple[set[str], set[str]]:
  """(train, test) sets of case ids: a seeded permutation of the sorted ids, cut at round(f * n).

  With two or more cases both sides get at least one, so every class is evaluated.
  """
  ordered = sorted(cases)
  n_test = round(test_fraction * len(ordered))
  if len(ordered) >= 2:
    n_test = min(max(n_test, 1), len(ordered) - 1)
  order = np.random.default_rng([seed, label]).permutation(len(ordered))
  test = {ordered[i] for i in order[:n_test]}
  return set(ordered) - test, test


class Covid19Diag(tfds.core.GeneratorBasedBuilder):
  """COVID19-Diag. Labels: 0 = normal, 1 = bacterial_pneumonia, 2 = covid19. Splits train/test by case."""

  name = "covid19_diag"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      DiagConfig(name="original", description="DICOM lung-masked, images as given."),
      DiagConfig(name="lung_mask", lung_mask=True, description="Images lung-masked as well."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  COVID_CLASS = 2

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(
        self, "COVID19-Diag clinical CT slices (Hu et al. 2021), split 7:3 by case.", CLASS_NAMES,
        cases=True, homepage="https://github.com/MLMIP/COVID19-Diag")

  def _cases(self, root: epath.Path) -> list[dict[str, list[epath.Path]]]:
    """Per label: case id -> its slice files."""
    cases: list[dict[str, list[epath.Path]]] = [{} for _ in CLASS_NAMES]
    seen_folder: dict[int, epath.Path] = {}
    for entry in common.visible(root):
      if not entry.is_dir():
        continue
      label = CLASS_ALIASES.get(re.sub(r"[^a-z0-9]", "", entry.name.lower()))
      if label is None:
        raise common.unknown_folder_error(entry, CLASS_NAMES)
      if label in seen_folder:
        raise common.DatasetError(
            f"{seen_folder[label]} and {entry} both name class {CLASS_NAMES[label]}; merge them.")
      seen_folder[label] = entry
      for case_dir in common.visible(entry):
        if not case_dir.is_dir():
          raise common.DatasetError(
              f"{case_dir} sits directly in a class folder; put every slice in a case folder "
              f"({entry}/<case id>/...), so that the split can keep each case on one side.")
        slices = common.slice_files(case_dir)
        if slices:
          cases[label][case_dir.name] = slices
    for label, name in enumerate(CLASS_NAMES):
      if not cases[label]:
        raise common.DatasetError(f"No cases with slices for class {name} under {root}. "
                                  f"Expected layout:\n{INSTRUCTIONS}")
    return cases

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.manual_dir(dl_manager, self.name, INSTRUCTIONS)
    splits: dict[str, list[tuple[int, str, epath.Path]]] = {"train": [], "test": []}
    for label, by_case in enumerate(self._cases(root)):
      train, test = split_cases(list(by_case), self.builder_config.split_seed, label)
      for case, slices in sorted(by_case.items()):
        splits["test" if case in test else "train"].extend((label, case, s) for s in slices)
    return {split: self._generate_examples(root, items) for split, items in splits.items()}

  def _generate_examples(self, root: epath.Path, items):
    for label, case, path in items:
      key = path.relative_to(root).as_posix()
      yield key, {"image": common.read_slice(path, self.builder_config.lung_mask),
                  "label": label, "id": key, "case": f"{CLASS_NAMES[label]}/{case}"}
