"""The sweep: grid, per-run workdirs, skip-on-rerun, aggregated table."""

import json
import os

import pytest

from dsn_saal_jax import config_lib, sweep


def test_sweep_trains_each_run_once_and_writes_the_table(tmp_path):
  base = config_lib.base_config()
  runs = sweep.plan([("baseline", "ce"), ("dsn", "saal")], [1.0, 0.1], seeds=[0, 1], folds=[0])
  assert len(runs) == 8
  calls = []

  def fake_train(config, workdir):
    calls.append((config.model.dsn, config.loss, config.covid_fraction, config.seed, workdir))
    acc = 0.9 if config.model.dsn else 0.8
    acc -= 0.1 * (config.covid_fraction < 1) + 0.01 * config.seed
    os.makedirs(os.path.join(workdir, "report", "test"))
    with open(os.path.join(workdir, "report", "test", "metrics.json"), "w") as f:
      json.dump({"accuracy": acc, "macro_f1": acc, "g_mean": acc, "macro_sensitivity": acc,
                 "macro_specificity": 0.95}, f)

  md, js = sweep.run_sweep(base, str(tmp_path), runs, "table6", fake_train)
  assert len(calls) == 8 and len({c[-1] for c in calls}) == 8
  assert base.model.dsn and base.seed == 0  # the base config is not mutated
  table = json.load(open(js))
  cell = table["rows"]["0.1"]["DSN-SAAL"]["ACC"]
  assert abs(cell["mean"] - 0.795) < 1e-9 and cell["n"] == 2
  assert abs(table["rows"]["0.1"]["VGG-16 + CE"]["SEN"]["delta"] + 0.1) < 1e-9
  assert "10% of COVID-19" in open(md).read()
  # A rerun skips every finished run.
  sweep.run_sweep(base, str(tmp_path), runs, "table6", fake_train)
  assert len(calls) == 8
  # Aggregating alone (train_fn=None) rebuilds the same table, and refuses a grid with unfinished runs.
  os.remove(js)
  sweep.run_sweep(base, str(tmp_path), runs, "table6", None)
  assert json.load(open(js)) == table
  more = runs + sweep.plan([("dsn", "ce")], [1.0], seeds=[0], folds=[0])
  with pytest.raises(FileNotFoundError, match=r"1 of 9 runs have no test report.*dsn_ce/covid1_seed0_fold0"):
    sweep.run_sweep(base, str(tmp_path), more, "table6", None)
  assert len(calls) == 8


def test_table4_trains_each_backbone_with_and_without_side_heads(tmp_path):
  base = config_lib.base_config()
  runs = sweep.plan(sweep.TABLE_DEFAULTS["table4"]["methods"], [1.0], seeds=[0, 1], folds=[0])
  seen = []

  def fake_train(config, workdir):
    seen.append((config.backbone, config.model.dsn, config.loss))
    acc = {"vgg16_bn": 0.8, "resnet50": 0.7, "densenet169": 0.6, "resnext50_32x4d": 0.5}[config.backbone]
    acc += 0.05 * config.model.dsn + 0.01 * config.seed
    os.makedirs(os.path.join(workdir, "report", "test"))
    with open(os.path.join(workdir, "report", "test", "metrics.json"), "w") as f:
      json.dump({"accuracy": acc, "macro_f1": acc, "g_mean": acc,
                 "num_params": 23_590_000 if config.model.dsn else 23_510_000}, f)

  md, js = sweep.run_sweep(base, str(tmp_path), runs, "table4", fake_train)
  assert sorted(set(seen)) == sorted((b, m, "ce") for b in ("vgg16_bn", "resnet50", "densenet169", "resnext50_32x4d")
                                     for m in (False, True))
  assert base.backbone == "vgg16_bn"  # the base config is not mutated
  assert os.path.isdir(tmp_path / "resnet50" / "dsn_ce" / "covid1_seed1_fold0")
  table = json.load(open(js))
  assert list(table["rows"])[:3] == ["VGG-16 Baseline", "VGG-16 DSN", "ResNet-50 Baseline"]
  assert abs(table["rows"]["ResNet-50 DSN"][""]["ACC"]["mean"] - 0.755) < 1e-9
  assert "| ResNet-50 DSN | 0.755 ± 0.007 | 0.755 ± 0.007 | 0.755 ± 0.007 | 23.59 M |" in open(md).read()
  with pytest.raises(ValueError, match=r"\(backbone, model, loss\), got \('dsn',\)"):
    sweep.plan([("dsn",)], [1.0], [0], [0])
