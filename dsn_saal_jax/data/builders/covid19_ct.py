"""UCSD COVID-CT (Zhao et al. 2020), 349 COVID / 397 non-COVID slices with the official split."""

from __future__ import annotations

import dataclasses
import zipfile

import tensorflow_datasets as tfds
from etils import epath

from dsn_saal_jax.data.builders import common

CLASS_NAMES = ("non_covid", "covid")
# Upstream folder (or zip) names of the images and of the split lists, per label.
IMAGE_DIRS = ("CT_NonCOVID", "CT_COVID")
LIST_DIRS = ("NonCOVID", "COVID")
# TFDS split name -> upstream list prefix: Data-split/<LIST_DIR>/<prefix>CT_<LIST_DIR>.txt
SPLITS = {"train": "train", "validation": "val", "test": "test"}

INSTRUCTIONS = """\
The upstream repository layout (https://github.com/UCSD-AI4H/COVID-CT):
  <manual_dir>/Images-processed/CT_COVID/      (or CT_COVID.zip, as in the repository)
  <manual_dir>/Images-processed/CT_NonCOVID/   (or CT_NonCOVID.zip)
  <manual_dir>/Data-split/COVID/{train,val,test}CT_COVID.txt
  <manual_dir>/Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt
Each list names one image file (basename) per line.
"""


@dataclasses.dataclass(eq=False)
class PngConfig(tfds.core.BuilderConfig):
  """`lung_mask`: also apply the paper's lung mask to these already-windowed images."""
  lung_mask: bool = False


PNG_CONFIGS = [
    PngConfig(name="original", lung_mask=False,
              description="The images as published (grayscale)."),
    PngConfig(name="lung_mask", lung_mask=True,
              description="The images multiplied by the section 3.1 lung mask."),
]


class _ImageStore:
  """Reads class images from an extracted folder or, failing that, the upstream zip."""

  def __init__(self, images_root: epath.Path):
    common.check_dir(images_root, "the Images-processed folder", INSTRUCTIONS)
    expected = set(IMAGE_DIRS) | {f"{d}.zip" for d in IMAGE_DIRS}
    for entry in common.visible(images_root):
      if entry.name not in expected and entry.is_dir():
        raise common.unknown_folder_error(entry, IMAGE_DIRS)
    self._sources: dict[str, dict[str, epath.Path] | tuple[epath.Path, dict[str, str]]] = {}
    for name in IMAGE_DIRS:
      folder, archive = images_root / name, images_root / f"{name}.zip"
      if folder.is_dir():
        self._sources[name] = {p.name: p for p in common.visible(folder) if p.is_file()}
      elif archive.is_file():
        self._sources[name] = (archive, self._zip_members(archive))
      else:
        raise common.DatasetError(
            f"Neither {folder} nor {archive} exists. Expected layout:\n{INSTRUCTIONS}")

  @staticmethod
  def _zip_members(archive: epath.Path) -> dict[str, str]:
    try:
      with zipfile.ZipFile(archive) as zf:
        return {m.rsplit("/", 1)[-1]: m for m in zf.namelist()
                if not m.endswith("/") and "__MACOSX" not in m}
    except zipfile.BadZipFile as e:
      raise common.DatasetError(
          f"{archive}: not a valid zip file ({e}). Re-download it or extract it into "
          f"{archive.with_suffix('')}/.") from e

  def where(self, folder: str, filename: str) -> str | None:
    """Human-readable location of one image, None when absent."""
    source = self._sources[folder]
    if isinstance(source, dict):
      return str(source[filename]) if filename in source else None
    archive, members = source
    return f"{archive}:{members[filename]}" if filename in members else None

  def read(self, folder: str, filename: str) -> bytes:
    source = self._sources[folder]
    if isinstance(source, dict):
      return source[filename].read_bytes()
    archive, members = source
    try:
      with zipfile.ZipFile(archive) as zf:
        return zf.read(members[filename])
    except (zipfile.BadZipFile, OSError) as e:  # CRC errors and truncation.
      raise common.DatasetError(
          f"{archive}:{members[filename]}: cannot read from the zip ({e}). Re-download the "
          f"zip or extract it into {archive.with_suffix('')}/.") from e


def read_split_lists(root: epath.Path) -> dict[str, list[tuple[int, str]]]:
  """Split -> [(label, filename)] from Data-split, with clear errors for bad lists."""
  lists_root = common.check_dir(root / "Data-split", "the Data-split folder", INSTRUCTIONS)
  for entry in common.visible(lists_root):
    if entry.is_dir() and entry.name not in LIST_DIRS:
      raise common.unknown_folder_error(entry, LIST_DIRS)
  splits: dict[str, list[tuple[int, str]]] = {}
  seen: dict[tuple[int, str], str] = {}
  for split, prefix in SPLITS.items():
    items = []
    for label, list_dir in enumerate(LIST_DIRS):
      path = lists_root / list_dir / f"{prefix}CT_{list_dir}.txt"
      if not path.is_file():
        raise common.DatasetError(f"Missing split list {path}. Expected layout:\n{INSTRUCTIONS}")
      for line in path.read_text().splitlines():
        name = line.strip()
        if not name:
          continue
        if (label, name) in seen:
          raise common.DatasetError(
              f"{name} is listed in both {seen[label, name]} and {path}; each image must be in "
              "exactly one split. Remove one of the two lines.")
        seen[label, name] = str(path)
        items.append((label, name))
    splits[split] = items
  return splits


class Covid19Ct(tfds.core.GeneratorBasedBuilder):
  """UCSD COVID-CT. Labels: 0 = non_covid, 1 = covid. Images stored as 8-bit grayscale."""

  name = "covid19_ct"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = PNG_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  COVID_CLASS = 1

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(
        self, "COVID-CT: chest CT slices from COVID-19 preprints and controls.", CLASS_NAMES,
        homepage="https://github.com/UCSD-AI4H/COVID-CT")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = common.manual_dir(dl_manager, self.name, INSTRUCTIONS)
    store = _ImageStore(root / "Images-processed")
    splits = read_split_lists(root)
    missing = [(split, IMAGE_DIRS[label], name) for split, items in splits.items()
               for label, name in items if store.where(IMAGE_DIRS[label], name) is None]
    if missing:
      shown = "\n".join(f"  {root}/Images-processed/{folder}/{name} (listed for {split})"
                        for split, folder, name in missing[:10])
      raise common.DatasetError(
          f"{len(missing)} image(s) named in the Data-split lists are absent:\n{shown}\n"
          "Restore the files (re-extract the upstream zips) or delete their lines from the lists.")
    return {split: self._generate_examples(store, items) for split, items in splits.items()}

  def _generate_examples(self, store: _ImageStore, items: list[tuple[int, str]]):
    for label, name in items:
      folder = IMAGE_DIRS[label]
      key = f"{folder}/{name}"
      yield key, {
          "image": common.decode_image(store.read(folder, name), store.where(folder, name),
                                       self.builder_config.lung_mask),
          "label": label,
          "id": key,
      }
