"""`DataInfo`: what the trainer, the loss and inference know about a dataset, whatever its source.

One interface for the prepared-data reader (`prepared_dataset.Dataset`) and
the in-memory `array_dataset.ArrayDataset`; here, apart from both, so that
neither (nor a reader of `info`) imports the other or TensorFlow for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the trainer, the loss and inference need to know about the data."""
  class_names: tuple[str, ...]
  class_counts: np.ndarray  # k_n the network trains on (train_per_class, covid_fraction, less the meta set), int64 (C,)
  num_train: int
  num_eval: dict[str, int]  # examples each eval split evaluates (after config.dedup)
  image_shape: tuple[int, int, int]
  steps_per_epoch: int
  normalization: dict[str, Any]  # JSON-serializable, see `input_pipeline.preprocess`; {} for in-memory arrays
  # Copies of earlier splits' slices left out of each eval split by config.dedup (none for in-memory arrays).
  duplicates_removed: dict[str, int] = dataclasses.field(default_factory=dict)
  meta_counts: np.ndarray | None = None  # examples per class of the meta set; None: no meta set
