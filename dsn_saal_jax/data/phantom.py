"""Synthetic axial chest CT slices in Hounsfield units, with known lungs.

Three classes mirror COVID19-Diag: normal, bacterial pneumonia (dense lobar
consolidation in one lung) and COVID-19 (bilateral, peripheral ground-glass
opacities). The geometry is randomised per slice so that only the lesions,
not the anatomy, tell the classes apart.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASS_NAMES = ("normal", "bacterial_pneumonia", "covid19")
NORMAL, BACTERIAL, COVID = range(3)

AIR_HU = -1000.0
FAT_HU = -80.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 500.0
LUNG_HU = -850.0
GGO_HU = -450.0
CONSOLIDATION_HU = 30.0


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
  """Normalised elliptic radius (< 1 inside) of a rotated ellipse on the grid."""
  c, s = np.cos(angle), np.sin(angle)
  u = (x - cx) * c + (y - cy) * s
  v = -(x - cx) * s + (y - cy) * c
  return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)


def _peripheral_point(rng, lung, depth):
  """A point inside a lung at normalised radius `depth`, at a random angle."""
  cx, cy, ax, ay, angle = lung
  theta = rng.uniform(0, 2 * np.pi)
  u, v = depth * ax * np.cos(theta), depth * ay * np.sin(theta)
  c, s = np.cos(angle), np.sin(angle)
  return cx + u * c - v * s, cy + u * s + v * c


def chest_slice(rng: np.random.Generator, size: int, label: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (HU float32 (size, size), true lung mask bool (size, size)) for one class."""
  if label not in (NORMAL, BACTERIAL, COVID):
    raise ValueError(f"label must be one of 0..2 ({CLASS_NAMES}), got {label}.")
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
  x, y = np.meshgrid(coords, coords)
  hu = np.full((size, size), AIR_HU, dtype=np.float32)

  body = (rng.uniform(-0.03, 0.03), rng.uniform(0.0, 0.08), rng.uniform(0.82, 0.9),
          rng.uniform(0.6, 0.68))
  r_body = _ellipse(x, y, *body)
  hu[r_body < 1.0] = FAT_HU
  hu[r_body < 0.92] = SOFT_TISSUE_HU
  spine = _ellipse(x, y, body[0], body[1] + body[3] * 0.7, 0.1, 0.09)
  hu[spine < 1.0] = BONE_HU

  lungs = []
  lung_mask = np.zeros((size, size), dtype=bool)
  for side in (-1.0, 1.0):
    lung = (body[0] + side * rng.uniform(0.36, 0.42), body[1] + rng.uniform(-0.08, -0.02),
            rng.uniform(0.22, 0.27), rng.uniform(0.34, 0.4), side * rng.uniform(-0.15, 0.15))
    lungs.append(lung)
    lung_mask |= _ellipse(x, y, *lung) < 1.0
  hu[lung_mask] = LUNG_HU

  lesion = np.zeros((size, size), dtype=np.float32)
  if label == COVID:
    for lung in lungs:
      for _ in range(rng.integers(2, 5)):
        cx, cy = _peripheral_point(rng, lung, rng.uniform(0.7, 0.95))
        radius = rng.uniform(0.07, 0.13)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))
        lesion = np.maximum(lesion, blob * rng.uniform(0.7, 1.0))
    hu = np.where(lung_mask, hu + lesion * (GGO_HU - LUNG_HU), hu)
  elif label == BACTERIAL:
    lung = lungs[rng.integers(2)]
    cx, cy = _peripheral_point(rng, lung, rng.uniform(0.5, 0.75))
    r = _ellipse(x, y, cx, cy, rng.uniform(0.1, 0.16), rng.uniform(0.12, 0.2), rng.uniform(0, np.pi))
    lesion = (r < 1.0) & lung_mask
    hu[lesion] = CONSOLIDATION_HU

  # Vessels: small soft-tissue disks, denser towards the hila.
  for lung in lungs:
    for _ in range(rng.integers(8, 16)):
      vx, vy = _peripheral_point(rng, lung, rng.uniform(0.1, 0.8) ** 1.5)
      vessel = ((x - vx) ** 2 + (y - vy) ** 2) < rng.uniform(0.008, 0.02) ** 2
      hu[vessel & lung_mask] = SOFT_TISSUE_HU

  hu = ndimage.gaussian_filter(hu, sigma=0.6 * size / 128)
  hu += rng.normal(0.0, 20.0, size=hu.shape).astype(np.float32)
  return hu.astype(np.float32), lung_mask
