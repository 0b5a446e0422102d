"""A tiny config and data for the trainer tests, in process and in tests/train_worker.py's subprocesses."""

from __future__ import annotations

import numpy as np

from dsn_saal_jax import config_lib
from dsn_saal_jax.array_dataset import ArrayDataset

CLASSES = ("normal", "pneumonia", "covid")


def tiny_config(**overrides) -> config_lib.ml_collections.ConfigDict:
  """The tiny test config (models' vgg16_bn_tiny); a dotted override key 'meta.update_rule' sets a nested field.

  A VGG shape of its own (model.widths, model.stages, model.hidden) needs backbone='vgg16_bn': the tiny
  variant takes none.
  """
  c = config_lib.base_config()
  c.backbone, c.image_size = "vgg16_bn_tiny", 32
  c.batch_size = c.eval_batch_size = 16
  c.learning_rate, c.num_train_steps, c.log_every_steps = 0.02, 12, 4
  c.checkpoint_every_steps, c.gradcam_per_class = 4, 2
  c.tensorboard = False  # in-memory data: TensorFlow is not loaded otherwise (+4 s a process); test_console checks it
  for k, v in overrides.items():
    *parents, leaf = k.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = v
  shape = {"model.widths", "model.stages", "model.hidden"} & set(overrides)
  assert not shape or c.backbone != "vgg16_bn_tiny", f"{shape} need backbone='vgg16_bn'"
  return c


def blobs(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Images whose mean brightness and a bright square encode the class; imbalanced 3:2:1."""
  rng = np.random.default_rng(seed)
  y = rng.choice(3, size=n, p=[0.5, 1 / 3, 1 / 6])
  x = rng.normal(0, 0.5, size=(n, size, size, 1)).astype(np.float32)
  for i, label in enumerate(y):
    x[i, 4 + 8 * label:12 + 8 * label, 8:16] += 2.0
  return x, y.astype(np.int32)


def tiny_dataset(config) -> ArrayDataset:
  meta = config.meta.update_rule == "meta"
  return ArrayDataset(blobs(64, 0), {"validation": blobs(24, 1), "test": blobs(29, 2)}, CLASSES,
                      config.batch_size, config.eval_batch_size, seed=config.seed,
                      meta_fraction=config.meta.fraction if meta else 0.0, meta_balanced=config.meta.balanced)
