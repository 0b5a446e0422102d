"""Metrics against hand computation, report figures, Grad-CAM and the sweep tables."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from dsn_saal_jax import metrics, paired_stats, reporting, runtime, tables
from dsn_saal_jax.models import DSNVGG16BN

NAMES = ("normal", "pneumonia", "covid")


def test_three_class_metrics_by_hand():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
  preds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
  probs = np.full((10, 3), 0.1)
  probs[np.arange(10), preds] = 0.8
  m = metrics.compute_metrics(labels, probs, NAMES)
  assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
  assert m["accuracy"] == pytest.approx(0.7)
  sen = np.array([3 / 4, 2 / 3, 2 / 3])
  pre = np.array([3 / 4, 2 / 3, 2 / 3])
  spe = np.array([5 / 6, 6 / 7, 6 / 7])
  f1 = 2 * pre * sen / (pre + sen)
  assert m["macro_sensitivity"] == pytest.approx(sen.mean())
  assert m["macro_precision"] == pytest.approx(pre.mean())
  assert m["macro_specificity"] == pytest.approx(spe.mean())
  assert m["macro_f1"] == pytest.approx(f1.mean())
  assert m["g_mean"] == pytest.approx(math.sqrt(sen.mean() * spe.mean()))
  assert m["per_class"]["covid"]["specificity"] == pytest.approx(6 / 7)
  assert m["per_class"]["normal"]["support"] == 4
  assert 0.5 < m["auc"] <= 1.0


def test_binary_auc_and_undefined_values():
  labels = np.array([0, 0, 1, 1])
  probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.35, 0.65], [0.2, 0.8]])
  m = metrics.compute_metrics(labels, probs, ("non-covid", "covid"))
  assert m["auc"] == pytest.approx(0.75)  # one of four (neg, pos) pairs mis-ordered: 0.7 > 0.65
  one_class = metrics.compute_metrics(np.zeros(3, int), np.tile([0.7, 0.2, 0.1], (3, 1)), NAMES)
  assert math.isnan(one_class["auc"]) and math.isnan(one_class["per_class"]["covid"]["auc"])
  assert json.loads(json.dumps(metrics.to_json_safe(one_class)))["auc"] is None
  with pytest.raises(ValueError, match=r"probs must be \(N, 3\)"):
    metrics.compute_metrics(labels, probs, NAMES)


def test_a_class_absent_from_the_labels_is_named_and_left_out_of_the_macro_values(caplog):
  """Macro values over the classes present, as scikit-learn's with labels=present; never a silent 0 for the rest."""
  labels = np.array([0, 0, 0, 1, 1, 1])  # no covid
  probs = np.array([[.8, .1, .1], [.1, .2, .7], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1], [.7, .2, .1]])
  with caplog.at_level("WARNING"):
    m = metrics.compute_metrics(labels, probs, NAMES)
  preds, present = probs.argmax(1), [0, 1]
  assert m["macro_sensitivity"] == pytest.approx(skm.recall_score(labels, preds, labels=present, average="macro"))
  assert m["macro_precision"] == pytest.approx(skm.precision_score(labels, preds, labels=present, average="macro"))
  assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, labels=present, average="macro"))
  spe = [np.mean(preds[labels != n] != n) for n in present]
  assert m["macro_specificity"] == pytest.approx(np.mean(spe))
  assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(labels == n, probs[:, n]) for n in present]))
  assert m["absent_classes"] == ["covid"] and "No examples of covid" in caplog.text
  text = metrics.dumps(m)  # strict JSON: undefined values are null
  covid = json.loads(text)["per_class"]["covid"]
  assert (covid["sensitivity"], covid["f1"], covid["auc"], covid["support"]) == (None, None, None, 0)
  assert covid["precision"] == 0.0  # predicted once, wrongly: defined
  assert metrics.compute_metrics(np.array([0, 1, 2]), np.eye(3), NAMES)["absent_classes"] == []


def test_report_figures_are_written(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 30)
  probs = rng.dirichlet(np.ones(3), 30)
  m = metrics.compute_metrics(labels, probs, NAMES)
  reporting.plot_confusion_matrix(np.asarray(m["confusion_matrix"]), NAMES, tmp_path / "cm.png")
  reporting.plot_roc(labels, probs, NAMES, tmp_path / "roc.png")
  images = rng.normal(size=(5, 32, 32, 1)).astype(np.float32)
  reporting.plot_gradcam_grid(images, rng.random((5, 32, 32)), labels[:5], probs[:5], NAMES, tmp_path / "cam.png")
  for name in ("cm.png", "roc.png", "cam.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_grad_cam_leaves_the_model_unchanged_and_follows_the_evidence():
  model = DSNVGG16BN(3, widths=(8, 16, 16, 32, 32), hidden=32, dropout_rate=0.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 1)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  cams, probs = reporting.grad_cam(model, variables, x)
  heads = model.apply(variables, x)
  np.testing.assert_allclose(probs, jax.nn.softmax(heads[-1]), rtol=1e-5, atol=1e-6)
  assert cams.shape == (4, 32, 32) and np.all(cams >= 0) and np.all(cams <= 1 + 1e-6)
  assert np.all(cams.max(axis=(1, 2)) > 0.99)  # normalized per image
  # The perturbation must reach the logits: a CAM for another class differs.
  other = (np.argmax(probs, -1) + 1) % 3
  cams_other, _ = reporting.grad_cam(model, variables, x, target=other)
  assert not np.allclose(cams, cams_other)


def run(model, loss, fraction, seed, acc, sen):
  return {"model": model, "loss": loss, "covid_fraction": fraction, "seed": seed, "fold": 0,
          "metrics": {"accuracy": acc, "macro_f1": acc - 0.1, "g_mean": acc - 0.05, "macro_sensitivity": sen,
                      "macro_specificity": 0.9, "auc": 0.95, "macro_precision": 0.8,
                      "per_class": {"covid": {"sensitivity": sen - 0.1, "specificity": 0.97}}}}


def test_table6_layout_mean_std_and_sensitivity_change(tmp_path):
  runs = [run("dsn", "saal", 1.0, 0, 0.90, 0.90), run("dsn", "saal", 1.0, 1, 0.92, 0.92),
          run("dsn", "saal", 0.25, 0, 0.80, 0.80), run("dsn", "saal", 0.25, 1, 0.84, 0.82),
          run("baseline", "ce", 1.0, 0, 0.80, 0.82), run("baseline", "ce", 0.25, 0, 0.70, 0.70)]
  table = tables.aggregate(runs, "table6")
  assert list(table["rows"]) == ["1", "0.25"]
  cell = table["rows"]["0.25"]["DSN-SAAL"]
  assert cell["ACC"]["mean"] == pytest.approx(0.82) and cell["ACC"]["std"] == pytest.approx(np.std([0.8, 0.84], ddof=1))
  assert cell["SEN"]["delta"] == pytest.approx(0.81 - 0.91)
  assert table["rows"]["0.25"]["VGG-16 + CE"]["SEN"]["delta"] == pytest.approx(-0.12)
  md, js = tables.write_table(table, tmp_path)
  text = open(md).read()
  assert "| 25% of COVID-19 |" in text and "0.820 ± 0.028 " in text and "(-0.100)" in text
  assert "| Stand. split |" in text
  assert json.load(open(js))["columns"] == ["ACC", "F1-score", "G-mean", "SEN", "SPE", "COVID SEN"]
  assert cell["COVID SEN"]["mean"] == pytest.approx(0.71) and cell["COVID SEN"]["delta"] == pytest.approx(-0.1)


def test_paired_difference_by_hand():
  # d = (1, 2, 3): mean 2, std 1, t = 2 / (1 / sqrt 3) with 2 df, whose two-sided p is 1 - t / sqrt(2 + t^2) =
  # 1 - sqrt(6/7); the 97.5% quantile of t(2) is 0.95 / sqrt(2 * 0.975 * 0.025); 3 of 3 ahead: sign p = 2 / 8.
  d = paired_stats.paired_difference([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
  half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
  assert (d["n"], d["wins"], d["losses"]) == (3, 3, 0)
  assert d["mean"] == pytest.approx(2) and d["std"] == pytest.approx(1)
  assert d["t_p"] == pytest.approx(1 - math.sqrt(6 / 7)) and d["ci"] == pytest.approx([2 - half, 2 + half])
  assert d["sign_p"] == pytest.approx(0.25) and d["permutation_p"] == pytest.approx(0.25)
  assert paired_stats.min_exact_p(3) == 0.25
  # d = (3, -1, 2): 2 of 3 ahead (sign p 1); sign flips give |sum| >= 4 in 4 of 8 (6, 4, -4, -6).
  d = paired_stats.paired_difference([3, -1, 2], [0, 0, 0])
  assert d["sign_p"] == pytest.approx(1.0) and d["permutation_p"] == pytest.approx(0.5)
  # A missing value drops its pair; ties count as neither: d = (0, 0, 1), t = 1, p = 1 - 1 / sqrt 3.
  d = paired_stats.paired_difference([0.7, None, 0.6, 0.9], [0.7, 0.5, 0.6, 0.8])
  assert (d["n"], d["wins"], d["losses"]) == (3, 1, 0) and d["t_p"] == pytest.approx(1 - 1 / math.sqrt(3))
  assert paired_stats.format_difference(d) == "+0.033 [-0.110, +0.177] p 0.42, 1/3 ahead, 2 tied"
  # No spread: no t-test and no interval, only the counts.
  d = paired_stats.paired_difference([0.8, 0.7, 0.6], [0.7, 0.6, 0.5])
  assert d["t_p"] is None and d["ci"] is None and d["wins"] == 3
  with pytest.raises(ValueError, match="as many values"):
    paired_stats.paired_difference([1, 2], [1])


def test_tables_pair_runs_by_seed():
  # DSN is 0.01 ahead of the baseline at every seed; listed in reverse seed order, pairing by position would
  # give differences of +0.05, +0.01, -0.03.
  base = [run("baseline", "ce", 1.0, s, 0.70 + 0.02 * s, 0.8) for s in range(3)]
  dsn = [run("dsn", "ce", 1.0, s, 0.71 + 0.02 * s, 0.8) for s in (2, 1, 0)]
  (pair,) = tables.aggregate(base + dsn, "table8")["paired"]
  assert pair["label"] == "DSN + CE minus VGG-16 + CE" and pair["columns"]["ACC"]["wins"] == 3
  assert pair["columns"]["ACC"]["mean"] == pytest.approx(0.01) and pair["columns"]["ACC"]["ci"] is None
  assert "| DSN + CE minus VGG-16 + CE | +0.010 p -, 3/3 ahead |" in tables.to_markdown(
      tables.aggregate(base + dsn, "table8"))
  # Table 6 compares within each fraction; Table 4 within each backbone, never across.
  # Table 6 also pairs the sensitivities' drop from the full set: DSN's 0.8 -> 0.7 minus the baseline's 0.8 -> 0.6.
  quarter = [run("baseline", "ce", 0.25, 0, 0.6, 0.6), run("dsn", "ce", 0.25, 0, 0.5, 0.7)]
  t6 = tables.aggregate(base + dsn + quarter, "table6")
  assert [p["label"] for p in t6["paired"]] == [
      "Stand. split: DSN + CE minus VGG-16 + CE", "25% of COVID-19: DSN + CE minus VGG-16 + CE",
      "25% of COVID-19: change from the stand. split, DSN + CE minus VGG-16 + CE"]
  assert t6["paired"][1]["columns"]["ACC"]["mean"] == pytest.approx(-0.1)
  drop = t6["paired"][2]["columns"]
  assert drop["COVID SEN"]["mean"] == pytest.approx(0.1) and "ACC" not in drop
  t4 = tables.aggregate(base + dsn + [dict(r, backbone="resnet50") for r in base + dsn], "table4")
  assert [p["label"] for p in t4["paired"]] == ["VGG-16 DSN minus VGG-16 Baseline",
                                               "ResNet-50 DSN minus ResNet-50 Baseline"]
  assert "Params" not in t4["paired"][0]["columns"]


def test_table5_and_table9_rows_are_methods():
  runs = [run("baseline", loss, 1.0, s, 0.8 + 0.01 * s, 0.8) for loss in ("ce", "focal") for s in range(3)]
  t5 = tables.aggregate(runs, "table5")
  assert set(t5["rows"]) == {"VGG-16 + CE", "VGG-16 + FOCAL"}
  assert t5["rows"]["VGG-16 + CE"][""]["ACC"]["n"] == 3
  t9 = tables.aggregate([run("dsn", "saal", 1.0, 0, 0.99, 0.99)], "table9")
  assert t9["columns"] == ["ACC", "F1-score", "AUC", "PRE", "SEN"]
  assert t9["rows"]["DSN-SAAL"][""]["AUC"]["mean"] == pytest.approx(0.95)
  t8 = tables.aggregate(runs + [run("dsn", "saal", 1.0, 0, 0.9, 0.9)], "table8")
  assert t8["columns"] == ["ACC", "F1-score", "AUC", "COVID SEN", "COVID SPE"]
  assert t8["rows"]["DSN-SAAL"][""]["COVID SEN"]["mean"] == pytest.approx(0.8)
  spe = t8["rows"]["VGG-16 + CE"][""]["COVID SPE"]
  assert spe["mean"] == pytest.approx(0.97) and spe["std"] == pytest.approx(0.0) and spe["n"] == 3
  no_per_class = dict(runs[0], metrics={k: v for k, v in runs[0]["metrics"].items() if k != "per_class"})
  assert tables.aggregate([no_per_class], "table8")["rows"]["VGG-16 + CE"][""]["COVID SEN"]["n"] == 0
  # Reports older than num_params: the Params column is "-" and the footer counts the runs that are there.
  t4 = tables.to_markdown(tables.aggregate(runs[:3], "table4"))
  assert "| VGG-16 Baseline |" in t4 and t4.count(" - |") == 1
  assert t4.rstrip().endswith("Mean ± sample std over 3 runs per cell.")
  with pytest.raises(ValueError, match="Unknown table"):
    tables.aggregate(runs, "table7")


def test_saal_history_plot_from_history_files(tmp_path):
  runs = []
  for seed in range(2):
    work = tmp_path / f"seed{seed}"
    work.mkdir()
    records = []
    # Step 20 is logged twice, as by a run resumed from step 10: the later record wins.
    for step, f1 in ((10, 0.25), (20, 0.5), (30, 0.75), (20, 0.9)):
      records.append({"step": step, "train/alpha": 0.5 + step / 100 + seed / 10, "validation/macro_f1": f1,
                      "train/saal_weight_covid": 1 / step, "train/saal_weight_non_covid": 0.5 / step,
                      **{f"train/beta_{i}": 0.1 * i for i in range(1, 7)}})
    (work / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs.append(runtime.read_history(str(work)))
  steps, f1 = runs[0]["validation/macro_f1"]
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(f1, [0.25, 0.9, 0.75])
  reporting.plot_saal_history({"normalized": runs, "as written": runs[:1]}, tmp_path / "saal.png")
  assert (tmp_path / "saal.png").stat().st_size > 10_000
  with pytest.raises(ValueError, match="not a SAAL run"):
    reporting.plot_saal_history({"ce": [{"validation/macro_f1": (steps, f1)}]}, tmp_path / "ce.png")
  with pytest.raises(FileNotFoundError, match="history.jsonl does not exist"):
    runtime.read_history(str(tmp_path))
