"""CT slice preprocessing of the paper's section 3.1: HU, windowing, lung mask.

Everything works on 2-D numpy arrays so that TFDS builders (at build time) and
users (at inference time) share one implementation.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
from scipy import ndimage
from skimage import exposure, measure, morphology

WINDOW_LEVEL = -400.0
WINDOW_WIDTH = 1500.0
LUNG_THRESHOLD = 170


class CTReadError(ValueError):
  """A CT file that cannot be read; the message names the file and the fix."""


def read_dicom_hu(path: str | os.PathLike) -> np.ndarray:
  """Returns the CT slice in Hounsfield units (stored value * RescaleSlope + RescaleIntercept).

  Anything else is refused with a CTReadError rather than windowed as if it
  were HU: another modality (MR, PET, a secondary capture...; Modality must be
  CT), and a CT file without a usable rescale (both tags, a finite non-zero
  slope, RescaleType absent or HU).
  """
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise CTReadError(f"{path}: empty file (0 bytes). Re-export or re-copy it, or delete it.")
  try:
    ds = pydicom.dcmread(path)
  except Exception as e:  # pydicom raises many types for bad files.
    raise CTReadError(
        f"{path}: not a readable DICOM file ({type(e).__name__}: {e}). If it is truncated, "
        "re-export it; if it is not a CT slice, remove it.") from e
  if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    kind = getattr(ds.get("SOPClassUID"), "name", "unknown SOP class")
    raise CTReadError(
        f"{path}: DICOM file without pixel data ({kind}): a plan, report or DICOMDIR rather than an "
        "image slice. Remove it, or pass the image slices.")
  modality = str(ds.get("Modality", "") or "").strip().upper()
  if modality != "CT":
    raise CTReadError(
        f"{path}: {f'Modality {modality}' if modality else 'no Modality tag'}, not CT: its values are not "
        "Hounsfield units, and the CT window (WL -400 / WW 1500) would make a meaningless input. "
        "Pass CT slices only, or remove the file.")
  try:
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
  except (AttributeError, TypeError, ValueError):
    slope = intercept = float("nan")
  rescale_type = str(ds.get("RescaleType", "") or "HU").strip().upper()
  if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0 and rescale_type == "HU"):
    raise CTReadError(
        f"{path}: CT slice without a usable rescale to Hounsfield units (RescaleSlope "
        f"{ds.get('RescaleSlope')!s}, RescaleIntercept {ds.get('RescaleIntercept')!s}, RescaleType "
        f"{ds.get('RescaleType', '(none)')!s}). Re-export it from the scanner or PACS with them, or remove it.")
  try:
    pixels = ds.pixel_array
  except Exception as e:  # pydicom raises many types for bad/compressed pixel data.
    raise CTReadError(
        f"{path}: cannot read DICOM pixel data ({type(e).__name__}: {e}). If the file is "
        "truncated or not DICOM, re-export it; if it uses a compressed transfer syntax, "
        "`pip install pylibjpeg pylibjpeg-libjpeg` (or gdcm) so pydicom can decode it.") from e
  if pixels.ndim != 2:
    raise CTReadError(
        f"{path}: expected one 2-D slice, got pixel data of shape {pixels.shape}. "
        "Split multi-frame or colour files into single grayscale slices first.")
  return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def window(hu: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
  """Maps HU linearly from [level - width/2, level + width/2] to uint8 [0, 255], clipping outside."""
  lo, hi = level - width / 2.0, level + width / 2.0
  scaled = exposure.rescale_intensity(
      np.asarray(hu, dtype=np.float32), in_range=(lo, hi), out_range=(0.0, 255.0))
  return np.round(scaled).astype(np.uint8)


def lung_mask(image: np.ndarray, threshold: int = LUNG_THRESHOLD, max_regions: int = 2,
              min_area_fraction: float = 0.002) -> np.ndarray:
  """Lung-parenchyma mask of a windowed uint8 slice (the paper's section 3.1).

  Steps: binarize (dark = air or lung, value < `threshold`); erosion then
  dilation (opening) removes speckle and thin bridges; dark regions that touch
  three or more image edges are air outside the body and are dropped (a flood
  fill from the border that still keeps lungs touching one or two edges of a
  cropped slice); holes (vessels, nodules) are filled; the `max_regions`
  largest remaining regions are kept; each gets its own convex hull, so dense
  lesions on the pleura are taken back in without bridging the mediastinum.
  Returns a bool array, all False when no lung-like region exists.
  """
  image = np.asarray(image)
  if image.ndim != 2:
    raise ValueError(f"lung_mask expects a 2-D slice, got shape {image.shape}.")
  radius = max(1, round(min(image.shape) / 256))
  dark = ndimage.binary_opening(image < threshold, structure=morphology.disk(radius))
  labels = measure.label(dark, connectivity=1)
  edges = [labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]]
  edge_count = np.zeros(labels.max() + 1, dtype=np.int64)
  for edge in edges:
    edge_count[np.unique(edge)] += 1
  outside = np.flatnonzero(edge_count >= 3)
  candidates = dark & ~np.isin(labels, outside)
  candidates = ndimage.binary_fill_holes(candidates)
  regions = sorted(measure.regionprops(measure.label(candidates, connectivity=1)),
                   key=lambda r: r.area, reverse=True)
  min_area = min_area_fraction * image.size
  keep = np.zeros(image.shape, dtype=bool)
  for region in regions[:max_regions]:
    if region.area >= min_area:
      r0, c0, r1, c1 = region.bbox
      keep[r0:r1, c0:c1] |= region.image
  return morphology.convex_hull_object(keep, connectivity=1)


def apply_lung_mask(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Multiplies the slice by its lung mask; an empty mask leaves the slice unchanged.

  Keeping an unmaskable slice whole (instead of producing a black image) is the
  safer default for the already-windowed public sets, whose crops and windows
  vary; callers that care can test `lung_mask(image).any()` themselves.
  """
  if mask is None:
    mask = lung_mask(image)
  if not mask.any():
    return image
  return (image * mask).astype(image.dtype)


def preprocess_hu(hu: np.ndarray, mask: bool = True) -> np.ndarray:
  """HU slice -> windowed uint8 slice, lung-masked when `mask` (the paper's input)."""
  windowed = window(hu)
  return apply_lung_mask(windowed) if mask else windowed


def preprocess_dicom(path: str | os.PathLike, mask: bool = True) -> np.ndarray:
  """DICOM file -> windowed (and lung-masked) uint8 slice."""
  return preprocess_hu(read_dicom_hu(path), mask=mask)
