"""Sweeps of the paper's experiments: methods x COVID fractions x seeds (Tables 3-6, 8) or x folds (Table 9).

Each run trains in its own sub-workdir, so an interrupted sweep resumes where
it stopped (finished runs are skipped, an unfinished one resumes from its
checkpoint); the table is then aggregated from the runs' metrics.json files.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
from typing import Callable, Sequence

import ml_collections
from absl import logging

from dsn_saal_jax import tables

_BACKBONES = ("vgg16_bn", "resnet50", "densenet169", "resnext50_32x4d")  # Table 4's, in its order

# Defaults per table: which methods and which axis the paper varies. A method is (model, loss) on the
# config's backbone, or (backbone, model, loss).
TABLE_DEFAULTS = {
    "table3": dict(methods=tuple((b, "baseline", "ce") for b in ("vgg16_bn", "resnet50", "densenet169",
                                                                  "mobilenet_v2", "resnext50_32x4d"))
                   + (("vgg16_bn", "dsn", "saal"),), covid_fractions=(1.0,), folds=(0,), seeds=(0, 1, 2)),
    "table4": dict(methods=tuple((b, m, "ce") for b in _BACKBONES for m in ("baseline", "dsn")),
                   covid_fractions=(1.0,), folds=(0,), seeds=(0, 1, 2)),
    "table5": dict(methods=(("baseline", "ce"), ("baseline", "focal"), ("baseline", "cb"), ("baseline", "sce"),
                            ("baseline", "saal")), covid_fractions=(1.0,), folds=(0,), seeds=(0, 1, 2)),
    "table6": dict(methods=(("baseline", "ce"), ("dsn", "saal")), covid_fractions=(1.0, 0.25, 0.1, 0.05, 0.01),
                   folds=(0,), seeds=(0, 1, 2)),
    "table8": dict(methods=(("baseline", "ce"), ("dsn", "ce"), ("baseline", "saal"), ("dsn", "saal")),
                   covid_fractions=(1.0,), folds=(0,), seeds=(0, 1, 2)),
    "table9": dict(methods=(("dsn", "saal"),), covid_fractions=(1.0,), folds=(0, 1, 2, 3, 4), seeds=(0,)),
}


@dataclasses.dataclass(frozen=True)
class Run:
  model: str
  loss: str
  covid_fraction: float
  seed: int
  fold: int
  backbone: str = ""  # "" = the base config's

  @property
  def name(self) -> str:
    prefix = f"{self.backbone}/" if self.backbone else ""
    return f"{prefix}{self.model}_{self.loss}/covid{self.covid_fraction:g}_seed{self.seed}_fold{self.fold}"

  def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = copy.deepcopy(base)
    c.loss, c.covid_fraction, c.seed, c.fold = self.loss, self.covid_fraction, self.seed, self.fold
    c.model.dsn = self.model == "dsn"
    if self.backbone:
      c.backbone = self.backbone
    return c


def plan(methods: Sequence[tuple[str, ...]], covid_fractions: Sequence[float], seeds: Sequence[int],
         folds: Sequence[int]) -> list[Run]:
  """Every method x fraction x seed x fold; a method is (model, loss) or (backbone, model, loss)."""
  runs = []
  for method, f, s, k in itertools.product(methods, covid_fractions, seeds, folds):
    if len(method) not in (2, 3):
      raise ValueError(f"A method is (model, loss) or (backbone, model, loss), got {method!r}.")
    *backbone, model, loss = method
    runs.append(Run(model, loss, f, s, k, backbone[0] if backbone else ""))
  return runs


def metrics_path(root: str, run: Run) -> str:
  return os.path.join(root, run.name, "report", "test", "metrics.json")


def run_sweep(base: ml_collections.ConfigDict, root: str, runs: Sequence[Run], table: str,
              train_fn: Callable[[ml_collections.ConfigDict, str], object] | None) -> tuple[str, str]:
  """Trains every run not yet finished, then writes `table` (.md and .json) into `root`.

  With `train_fn=None` nothing trains: the table is aggregated from saved runs, and
  a run without its metrics.json is an error that lists every missing one.
  """
  if train_fn is None:
    missing = [metrics_path(root, r) for r in runs if not os.path.exists(metrics_path(root, r))]
    if missing:
      raise FileNotFoundError(f"{len(missing)} of {len(runs)} runs have no test report, so the table would be "
                              f"incomplete: {', '.join(missing)}. Train them first (without --aggregate_only).")
  for i, run in enumerate(runs, start=1):
    if os.path.exists(metrics_path(root, run)):
      logging.info("[%d/%d] %s: done, skipped.", i, len(runs), run.name)
      continue
    logging.info("[%d/%d] %s: training.", i, len(runs), run.name)
    train_fn(run.config(base), os.path.join(root, run.name))
  records = []
  for run in runs:
    with open(metrics_path(root, run)) as f:
      records.append({**dataclasses.asdict(run), "backbone": run.backbone or base.backbone, "metrics": json.load(f)})
  return tables.write_table(tables.aggregate(records, table), root)
