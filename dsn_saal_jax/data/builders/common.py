"""Helpers shared by the TFDS builders: manual-dir checks, image decoding, errors."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
import pydicom
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from dsn_saal_jax.data import ct

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# Slices smaller than this on a side are refused; longer than MAX_ASPECT times their width (or height) warned
# about: resizing either to the run's square input invents or squashes the anatomy.
MIN_SLICE_SIZE = 16
MAX_ASPECT = 2.0
NOT_A_SLICE = "not an image or DICOM file (by its extension; DICOM also by its content)"
# Entries that archivers and file browsers add; never data.
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


class DatasetError(ValueError):
  """Bad manual data; the message names the offending path and how to fix it."""


def image_feature() -> tfds.features.Image:
  """Grayscale uint8 slices of any size, stored losslessly as PNG."""
  return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")


def dataset_info(builder: tfds.core.DatasetBuilder, description: str, class_names, cases: bool = False,
                 homepage: str | None = None) -> tfds.core.DatasetInfo:
  """What every builder stores: a grayscale `image`, its `label` and `id` (and `case`, where slices have one)."""
  features = {"image": image_feature(), "label": tfds.features.ClassLabel(names=class_names),
              "id": tfds.features.Text(), **({"case": tfds.features.Text()} if cases else {})}
  return tfds.core.DatasetInfo(builder=builder, description=description,
                               features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label"),
                               homepage=homepage)


def manual_dir(dl_manager: tfds.download.DownloadManager, dataset: str,
               instructions: str) -> epath.Path:
  """The manual directory, or a DatasetError that says where it should be and what goes in it."""
  try:
    return dl_manager.manual_dir
  except AssertionError as e:
    path = getattr(dl_manager, "_manual_dir", None)  # TFDS's message ends mid-sentence; ours names it.
    state = "does not exist" if path is None or not epath.Path(path).exists() else "is empty"
    raise DatasetError(
        f"{dataset}: the manual data directory {path} {state}. Put the dataset there, laid out "
        f"as below, or point config.manual_dir at where it is:\n{instructions}") from e


def _ignored(name: str) -> bool:
  return name.startswith(".") or name in _IGNORED_NAMES


def visible(path: epath.Path) -> list[epath.Path]:
  """Sorted children of a directory, without hidden files and archiver litter."""
  return sorted(p for p in path.iterdir() if not _ignored(p.name))


def check_dir(path: epath.Path, what: str, instructions: str) -> epath.Path:
  """Raises a DatasetError naming `path` unless it is a directory."""
  if not path.is_dir():
    raise DatasetError(f"Expected {what} at {path}, but it does not exist. Expected layout:\n"
                       f"{instructions}")
  return path


def decode_image(data: bytes, name: str, mask: bool = False) -> np.ndarray:
  """Encoded 8-bit image -> (H, W, 1) uint8 grayscale, lung-masked when `mask`.

  Colour and alpha are dropped: the public sets store windowed grayscale
  slices, some as RGB(A) screenshots.
  """
  if not data:
    raise DatasetError(f"{name}: empty file (0 bytes). Re-export or re-copy it, or delete it.")
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise DatasetError(
            f"{name}: {im.mode} image with more than 8 bits per pixel. These builders expect "
            "8-bit windowed slices; convert it, or provide the DICOM file (HU) to a builder that "
            "reads DICOM (covid19_diag, image_folder).")
      gray = np.asarray(im.convert("L"), dtype=np.uint8)
  except DatasetError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files.
    raise DatasetError(
        f"{name}: cannot decode image ({type(e).__name__}: {e}). The file is corrupt or "
        "truncated: re-download or re-extract it, or delete it (and its line in any split "
        "list).") from e
  if mask:
    gray = ct.apply_lung_mask(gray)
  return gray[:, :, None]


def read_image(path: epath.Path, mask: bool = False) -> np.ndarray:
  """Reads and decodes one image file, see `decode_image`."""
  return decode_image(path.read_bytes(), os.fspath(path), mask)


_WARNED_SHAPES: set[str] = set()


def check_slice_shape(image: np.ndarray, name: str) -> np.ndarray:
  """`image` (H, W, ...) unchanged; a DatasetError below MIN_SLICE_SIZE px a side, a warning beyond MAX_ASPECT."""
  h, w = image.shape[:2]
  if min(h, w) < MIN_SLICE_SIZE:
    raise DatasetError(f"{name}: a {h}x{w} image, smaller than {MIN_SLICE_SIZE} px on a side, is no CT slice "
                       "(a thumbnail or icon?). Pass the full slice, or remove the file.")
  if max(h, w) > MAX_ASPECT * min(h, w) and name not in _WARNED_SHAPES:  # once: evaluate reads a file twice
    _WARNED_SHAPES.add(name)
    logging.warning("%s: a %dx%d image is resized to a square input, distorting it %.1fx; crop it to the "
                    "body first if it is not a CT slice laid out that way.", name, h, w, max(h, w) / min(h, w))
  return image


def read_slice(path: epath.Path, mask_images: bool) -> np.ndarray:
  """A DICOM slice (windowed and lung-masked) or an 8-bit image (masked if `mask_images`), size-checked."""
  if is_dicom(path):
    try:
      return check_slice_shape(ct.preprocess_dicom(path)[:, :, None], os.fspath(path))
    except ct.CTReadError as e:
      raise DatasetError(str(e)) from e
  return check_slice_shape(read_image(path, mask_images), os.fspath(path))


def is_dicom(path: str | os.PathLike) -> bool:
  """DICOM by extension (.dcm, .dicom); any other file without an image extension by its content.

  Content is DICOM's 'DICM' marker at byte 128, which scanners' extension-less
  exports carry; a stray README or a DICOM file without the marker is no slice
  (name the latter .dcm).
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix in DICOM_EXTENSIONS:
    return True
  try:
    return suffix not in IMAGE_EXTENSIONS and pydicom.misc.is_dicom(path)
  except OSError:  # Unreadable or a folder: reading it reports why.
    return False


def is_slice(path: str | os.PathLike) -> bool:
  return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS or is_dicom(path)


def slice_files(folder: epath.Path, skipped: list[tuple[str, str]] | None = None,
                relative_to: epath.Path | None = None) -> list[epath.Path]:
  """All slice files under `folder` (recursively), sorted.

  Other files are logged and skipped, or, given a `skipped` list, appended
  to it as (path relative to `relative_to`, reason) for the caller to report.
  """
  found, others = [], []
  for dirpath, dirnames, filenames in folder.walk():
    dirnames[:] = [d for d in dirnames if not _ignored(d)]
    for name in filenames:
      if not _ignored(name):
        path = dirpath / name
        (found if is_slice(path) else others).append(path)
  found.sort()
  if skipped is not None:
    base = os.fspath(relative_to or folder)
    skipped.extend((os.path.relpath(os.fspath(p), base).replace(os.sep, "/"),
                    NOT_A_SLICE) for p in sorted(others))
  elif others:
    logging.warning("Skipping %d non-image files under %s, e.g. %s", len(others), folder, others[0])
  return found


def unknown_folder_error(folder: epath.Path, expected: Iterable[str]) -> DatasetError:
  return DatasetError(
      f"Unknown class folder {folder}. Expected only these class folders: "
      f"{', '.join(sorted(expected))}. Rename it to one of them, or move it out of the manual "
      "directory.")
