"""TFDS builders of the CT datasets; importing this package registers them with TFDS."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from dsn_saal_jax.data.builders import duplicates, image_folder
from dsn_saal_jax.data.builders.common import DatasetError
from dsn_saal_jax.data.builders.covid19_ct import Covid19Ct
from dsn_saal_jax.data.builders.covid19_diag import Covid19Diag
from dsn_saal_jax.data.builders.covidx_ct import CovidxCt
from dsn_saal_jax.data.builders.sars_cov2_ct import SarsCov2Ct
from dsn_saal_jax.data.builders.synthetic_ct import SyntheticCt, make_config

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    cls.name: cls for cls in (SyntheticCt, Covid19Ct, SarsCov2Ct, CovidxCt, Covid19Diag,
                              image_folder.ImageFolder)}

# Where `covid19_ct` looks when config.manual_dir is unset: <repo>/../shared/data/covid19_ct,
# overridable with this environment variable.
COVID19_CT_ENV = "DSN_SAAL_COVID19_CT"


def default_manual_dir(dataset: str) -> str | None:
  """The shared checkout's COVID-CT copy for `covid19_ct` when it exists, else None."""
  if dataset != "covid19_ct":
    return None
  if os.environ.get(COVID19_CT_ENV):
    return os.environ[COVID19_CT_ENV]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  path = os.path.join(os.path.dirname(repo), "shared", "data", "covid19_ct")
  return path if os.path.isdir(path) else None


def make_builder(config: Any) -> tfds.core.GeneratorBasedBuilder:
  """The TFDS builder that `config` (dataset, data_dir, lung_mask, synthetic_*, image_folder's fields) selects."""
  name = config.dataset
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(BUILDERS)}.")
  if name == "synthetic_ct":
    builder_config = make_config(config.get("synthetic_scale", 0.1),
                                 config.get("synthetic_image_size", 64),
                                 config.get("synthetic_seed", 0))
    if builder_config.name in SyntheticCt.builder_configs:  # TFDS wants the registered object.
      builder_config = builder_config.name
  elif name == "image_folder":
    builder_config = image_folder.make_config(
        config.get("manual_dir", ""), tuple(config.get("class_names", ())),
        tuple(config.get("split_fractions", image_folder.DEFAULT_FRACTIONS)),
        config.get("split_seed", 0), config.get("lung_mask", False))
  else:
    builder_config = "lung_mask" if config.get("lung_mask", False) else "original"
  return BUILDERS[name](data_dir=config.get("data_dir") or None, config=builder_config)


def prepare(builder: tfds.core.GeneratorBasedBuilder, manual_dir: str | None) -> None:
  """Builds the dataset unless it is already complete, then warns about slices shared by splits.

  TFDS writes into a temporary directory and renames it when every split is
  written, so an interrupted or failed build never looks finished. Files are
  ArrayRecord, which the input pipeline reads by index for exact global shuffles.
  `duplicates.json` is then written beside them (or computed now for a build that
  predates it), and its cross-split groups are logged on every run (near copies of
  generated slices, independent draws, only at --verbosity=1).
  """
  if not builder.is_prepared():
    # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout: one line of ours instead.
    logging.info("Building %s/%s into %s (once: later runs reuse it).", builder.name, builder.builder_config.name
                 if builder.builder_config else "", builder.data_dir)
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  near_level = logging.DEBUG if isinstance(builder, SyntheticCt) else logging.INFO
  duplicates.warn(duplicates.ensure(builder), duplicates.report_path(builder), near_level)


__all__ = ["BUILDERS", "DatasetError", "default_manual_dir", "make_builder", "prepare"]
