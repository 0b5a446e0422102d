"""Data layer: CT preprocessing (`ct`), TFDS builders (`builders`), the input pipeline.

TensorFlow (used only to decode and resize, once per prepared variant) should see no accelerator, so that
it never claims memory that JAX needs: `dsn_saal_jax.setup_host()` hides them, before TF starts.
"""

from dsn_saal_jax.data.input_pipeline import DataInfo, Dataset, create_dataset, preprocess  # DataInfo: data_info's

__all__ = ["DataInfo", "Dataset", "create_dataset", "preprocess"]
