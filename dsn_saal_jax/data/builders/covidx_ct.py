"""COVIDx-CT (Gunraj et al.): slices with a body bounding box; normal / pneumonia / COVID-19."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dsn_saal_jax.data import ct
from dsn_saal_jax.data.builders import common
from dsn_saal_jax.data.builders.covid19_ct import PNG_CONFIGS

CLASS_NAMES = ("normal", "pneumonia", "covid19")
# TFDS split name -> upstream prefix of {prefix}_COVIDx_CT-<version>.txt
SPLITS = {"train": "train", "validation": "val", "test": "test"}

INSTRUCTIONS = """\
COVIDx-CT (https://github.com/haydengunraj/COVIDNet-CT), one version (e.g. 2A or 3A):
  <manual_dir>/train_COVIDx_CT-<version>.txt
  <manual_dir>/val_COVIDx_CT-<version>.txt
  <manual_dir>/test_COVIDx_CT-<version>.txt
  <manual_dir>/<image folder, e.g. 2A_images>/<filename>.png   (or the images directly in <manual_dir>)
Each list line: `filename class xmin ymin xmax ymax` with class 0 = normal,
1 = pneumonia, 2 = COVID-19; images are cropped to the box when the dataset is built.
"""


def _split_list(root: epath.Path, prefix: str) -> epath.Path:
  found = sorted(root.glob(f"{prefix}_COVIDx_CT-*.txt"))
  if len(found) != 1:
    what = "No" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
    raise common.DatasetError(
        f"{what} split list {root}/{prefix}_COVIDx_CT-*.txt found; exactly one dataset version "
        f"must be in the manual directory. Expected layout:\n{INSTRUCTIONS}")
  return found[0]


def parse_list(path: epath.Path) -> list[tuple[str, int, tuple[int, int, int, int]]]:
  """[(filename, label, (xmin, ymin, xmax, ymax))] with errors naming file:line."""
  items = []
  for lineno, line in enumerate(path.read_text().splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    try:
      if len(fields) != 6:
        raise ValueError(f"expected 6 fields, got {len(fields)}")
      label, box = int(fields[1]), tuple(int(float(v)) for v in fields[2:])
    except ValueError as e:
      raise common.DatasetError(
          f"{path}:{lineno}: cannot parse {line!r} ({e}); expected "
          "`filename class xmin ymin xmax ymax`. Fix or delete the line.") from e
    if not 0 <= label < len(CLASS_NAMES):
      raise common.DatasetError(
          f"{path}:{lineno}: unknown class {label} for {fields[0]}; expected 0 (normal), "
          "1 (pneumonia) or 2 (COVID-19). Fix or delete the line.")
    items.append((fields[0], label, box))
  return items


def crop(image: np.ndarray, box: tuple[int, int, int, int], name: str) -> np.ndarray:
  """The bounding-box crop, clipped to the image; an empty box is an error naming the file."""
  h, w = image.shape[:2]
  xmin, ymin, xmax, ymax = max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)
  if xmin >= xmax or ymin >= ymax:
    raise common.DatasetError(
        f"{name}: bounding box {box} is empty inside the {w}x{h} image. Fix its line in the "
        "split list.")
  return image[ymin:ymax, xmin:xmax]


class CovidxCt(tfds.core.GeneratorBasedBuilder):
  """COVIDx-CT. Labels: 0 = normal, 1 = pneumonia, 2 = covid19. Stored cropped to the body box."""

  name = "covidx_ct"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = PNG_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  COVID_CLASS = 2

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(
        self, "COVIDx-CT chest CT slices, cropped to the given body bounding boxes.", CLASS_NAMES,
        homepage="https://github.com/haydengunraj/COVIDNet-CT")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.manual_dir(dl_manager, self.name, INSTRUCTIONS)
    # Images live in the manual dir itself or in one of its sub-folders.
    listings = [(d, {p.name for p in d.iterdir()})
                for d in [root] + [p for p in common.visible(root) if p.is_dir()]]
    splits = {}
    for split, prefix in SPLITS.items():
      list_path = _split_list(root, prefix)
      items, missing = [], []
      for name, label, box in parse_list(list_path):
        folder = next((d for d, names in listings if name in names), None)
        if folder is None:
          missing.append(name)
        else:
          items.append((folder / name, label, box))
      if missing:
        raise common.DatasetError(
            f"{len(missing)} image(s) named in {list_path} are absent from {root} and its "
            f"sub-folders, e.g. {', '.join(missing[:5])}. Extract the matching image archive "
            "there, or delete those lines from the list.")
      splits[split] = self._generate_examples(items)
    return splits

  def _generate_examples(self, items):
    for path, label, box in items:
      image = crop(common.read_image(path), box, str(path))
      if self.builder_config.lung_mask:
        image = ct.apply_lung_mask(image[:, :, 0])[:, :, None]
      yield path.name, {"image": image, "label": label, "id": path.name}
