"""Data layer: CT preprocessing (`ct`), TFDS builders (`builders`), the input pipeline.

Importing this package hides accelerators from TensorFlow first, so that TF
(used only to decode and resize, once per prepared variant) never claims memory that JAX needs.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were initialised before this import; too late to hide them.
  pass

# pylint: disable=wrong-import-position
from dsn_saal_jax.data.input_pipeline import DataInfo, Dataset, create_dataset, preprocess

__all__ = ["DataInfo", "Dataset", "create_dataset", "preprocess"]
