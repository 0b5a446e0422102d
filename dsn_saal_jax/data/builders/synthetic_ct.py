"""Generated chest CT slices (see `phantom`): the embedded default dataset, no download needed."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from dsn_saal_jax.data import ct, phantom
from dsn_saal_jax.data.builders import common

CLASS_NAMES = phantom.CLASS_NAMES
# COVID19-Diag training proportions normal : bacterial : COVID-19 (the paper's Table 2).
PAPER_COUNTS = (2674, 980, 1256)
# Validation and test each get 3/7 of the training counts: the paper's 7:3 train/test ratio.
EVAL_RATIO = 3 / 7
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """`scale` multiplies PAPER_COUNTS; `image_size` is the generated slice side; `seed` the data."""
  scale: float = 0.1
  image_size: int = 64
  seed: int = 0


def make_config(scale: float, image_size: int, seed: int = 0) -> SyntheticConfig:
  """A config whose name encodes its parameters, so each variant gets its own TFDS directory."""
  if scale <= 0 or image_size < 32:
    raise ValueError(f"synthetic_ct needs synthetic_scale > 0 and synthetic_image_size >= 32, "
                     f"got {scale} and {image_size}.")
  return SyntheticConfig(name=f"scale{scale:g}_px{image_size}_seed{seed}", scale=scale,
                         image_size=image_size, seed=seed,
                         description="Synthetic slices with the given scale/size/seed.")


def split_counts(scale: float, split: str) -> tuple[int, ...]:
  """Per-class example counts of a split (at least one per class)."""
  ratio = 1.0 if split == "train" else EVAL_RATIO
  return tuple(max(1, round(n * scale * ratio)) for n in PAPER_COUNTS)


class SyntheticCt(tfds.core.GeneratorBasedBuilder):
  """Synthetic CT. Labels: 0 = normal, 1 = bacterial_pneumonia, 2 = covid19.

  Each slice is generated in HU, windowed (WL -400 / WW 1500) and lung-masked,
  exactly like a DICOM source.
  """

  name = "synthetic_ct"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config(0.1, 64)]
  COVID_CLASS = phantom.COVID

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(
        self, "Synthetic axial chest CT: normal, lobar consolidation, peripheral GGO.", CLASS_NAMES)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, index) for index, split in enumerate(SPLITS)}

  def _generate_examples(self, split: str, split_index: int):
    cfg = self.builder_config
    labels = np.repeat(np.arange(len(CLASS_NAMES)), split_counts(cfg.scale, split))
    for i, label in enumerate(labels):
      rng = np.random.default_rng([cfg.seed, split_index, i])
      hu, _ = phantom.chest_slice(rng, cfg.image_size, int(label))
      key = f"{split}/{i:06d}"
      yield key, {"image": ct.preprocess_hu(hu)[:, :, None], "label": int(label), "id": key}
