"""Regenerates results/covid19_ct_meta from saved runs, without training.

  python results/covid19_ct_meta/collect.py --runs=/tmp/dsn_saal_meta

1. Copies each run's small files (config.json, history.jsonl, report/test/metrics.json) from --runs
   (run_study.sh's output; skipped if absent) into results/covid19_ct_meta/runs/.
2. Writes tables.md: per COVID fraction, Table 8's columns (ACC, F1, AUC, COVID SEN, COVID SPE), one
   row per arm, mean ± std over seeds; the paired differences (same seed) of every arm from each of
   the first four (CE, CB, LA, the paper's SAAL; paired_stats); then what each learned weighting ended
   at (alpha, w_covid / w_non-covid, mean beta_i; MW-Net's mean weight per class). DSN + CE and the
   paper's DSN-SAAL (joint, sigmoid alpha) are results/covid19_ct_cpu's runs: the same config and seeds.
   The paired differences are printed as well.
3. Plots alpha, beta_i and the class weights over training, joint vs meta (reporting.plot_saal_history).
"""

import functools
import glob
import json
import os
import shutil

import numpy as np
from absl import app, flags

from dsn_saal_jax import paired_stats, reporting, runtime, tables

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "/tmp/dsn_saal_meta", "run_study.sh's RUNS directory (skipped if absent).")

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
CPU_STUDY = os.path.join(os.path.dirname(HERE), "covid19_ct_cpu", "runs", "main")
SMALL_FILES = ("config.json", "history.jsonl", os.path.join("report", "test", "metrics.json"))
FRACTIONS = ("0.1", "1")
SEEDS = (0, 1, 2)

# (row label, run directory of the method (or candidates, first found wins), whether it trains on the
# training split minus the meta set). covid19_ct_cpu has DSN + CE on the official split only.
ARMS = (
    ("DSN + CE", (os.path.join(RUNS, "fixed", "dsn_ce"), os.path.join(CPU_STUDY, "dsn_ce")), False),
    ("DSN + CB", os.path.join(RUNS, "fixed", "dsn_cb"), False),
    ("DSN + LA", os.path.join(RUNS, "fixed", "dsn_la"), False),
    ("DSN-SAAL joint, sigmoid alpha (paper)", os.path.join(CPU_STUDY, "dsn_saal"), False),
    ("DSN-SAAL joint, log10 alpha", os.path.join(RUNS, "joint_log10", "dsn_saal"), False),
    ("DSN-SAAL meta, sigmoid alpha", os.path.join(RUNS, "meta_sigmoid", "dsn_saal"), True),
    ("DSN-SAAL meta, log10 alpha", os.path.join(RUNS, "meta_log10", "dsn_saal"), True),
    ("DSN + MW-Net (meta)", os.path.join(RUNS, "meta_mwn", "dsn_mwn"), True),
)


def copy_small_files(src: str, dst: str) -> None:
  for path in glob.glob(os.path.join(src, "*", "*", "covid*_seed*_fold*")):
    for name in SMALL_FILES:
      if os.path.exists(os.path.join(path, name)):
        out = os.path.join(dst, os.path.relpath(path, src), name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(os.path.join(path, name), out)


def finished(method_dirs: str | tuple[str, ...], fraction: str) -> list[str]:
  """The arm's finished runs at `fraction`, one per seed, from the first directory that has it."""
  out = []
  for seed in SEEDS:
    for d in (method_dirs,) if isinstance(method_dirs, str) else method_dirs:
      run = os.path.join(d, f"covid{fraction}_seed{seed}_fold0")
      if os.path.exists(os.path.join(run, SMALL_FILES[2])):
        out.append(run)
        break
  return out


def results_table(fraction: str) -> str:
  rows, columns = {}, None
  for label, method_dir, meta_set in ARMS:
    runs = [dict(model="dsn", loss="ce", covid_fraction=float(fraction), seed=0, fold=0,
                 metrics=read_json(os.path.join(r, SMALL_FILES[2]))) for r in finished(method_dir, fraction)]
    if not runs:
      continue
    table = tables.aggregate(runs, "table8")
    columns = table["columns"]
    rows[label + (" *" if meta_set else "")] = next(iter(table["rows"].values()))
  return tables.to_markdown({"table": "table8", "columns": columns, "rows": rows}) if rows else ""


def paired_table(fraction: str) -> str:
  """Each arm minus each of the first four arms (the fixed losses and the paper's SAAL), run by run of one seed."""
  metrics = {}
  for label, method_dir, _ in ARMS:
    runs = finished(method_dir, fraction)
    metrics[label] = {int(r.rsplit("_seed", 1)[1].split("_")[0]): read_json(os.path.join(r, SMALL_FILES[2]))
                      for r in runs}
  columns = tables.TABLE_COLUMNS["table8"]
  value = lambda arm, s, key: functools.reduce(lambda d, k: (d or {}).get(k), key.split("/"), metrics[arm][s])
  entries = []
  for i, (ref, _, _) in enumerate(ARMS[:4]):
    for label, _, _ in ARMS[i + 1:]:
      seeds = [s for s in metrics[label] if s in metrics[ref]]
      if seeds:
        entries.append({"label": f"{label} minus {ref}", "columns": {
            name: paired_stats.paired_difference([value(label, s, key) for s in seeds],
                                                 [value(ref, s, key) for s in seeds]) for key, name in columns}})
  return paired_stats.paired_markdown(entries, [name for _, name in columns])


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _final(history: dict, name: str) -> float:
  """The last logged value of `name`; NaN for a run that does not log it (e.g. alpha for MW-Net)."""
  return float(history[name][1][-1]) if name in history else np.nan


def learned_table(fraction: str) -> str:
  """Where each learned weighting ended: mean ± std over seeds of the last logged value."""
  lines = ["| Arm | alpha | w_covid / w_non-covid | mean beta_i | MW-Net weight covid / non-covid |",
           "|---|---|---|---|---|"]
  for label, method_dir, _ in ARMS[3:]:
    hists = [runtime.read_history(r) for r in finished(method_dir, fraction)]
    if not hists:
      continue
    cols = []
    for value in (lambda h: _final(h, "train/alpha"),
                  lambda h: _final(h, "train/saal_weight_covid") / _final(h, "train/saal_weight_non_covid"),
                  lambda h: np.mean([_final(h, f"train/beta_{i}") for i in range(1, 7)]),
                  lambda h: _final(h, "train/mwn_weight_covid") / _final(h, "train/mwn_weight_non_covid")):
      v = np.array([value(h) for h in hists], np.float64)
      cols.append("-" if np.isnan(v).all() else f"{np.nanmean(v):.4g} ± {np.nanstd(v, ddof=1) if len(v) > 1 else 0:.2g}")
    lines.append(f"| {label} | " + " | ".join(cols) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if os.path.isdir(FLAGS.runs):
    copy_small_files(FLAGS.runs, RUNS)
  parts = ["# Issue 16 study: tables (written by collect.py)\n",
           "Arms marked * train on the training split minus their meta set (10%, stratified); the others on "
           "all of it.\n"]
  for fraction in FRACTIONS:
    title = "Official split" if fraction == "1" else f"{float(fraction):.0%} of the COVID training slices"
    paired = paired_table(fraction)
    print(f"{title}: paired differences\n{paired}")
    parts += [f"## {title}: test metrics\n", results_table(fraction),
              f"## {title}: paired differences of the test metrics\n", paired,
              f"## {title}: where the learned weights ended (last logged step)\n", learned_table(fraction)]
    groups = {label.replace("DSN-SAAL ", ""): [runtime.read_history(r) for r in finished(d, fraction)]
              for label, d, _ in ARMS[3:7]}
    groups = {k: v for k, v in groups.items() if v}
    if groups:
      reporting.plot_saal_history(groups, os.path.join(HERE, f"saal_covid{fraction}.png"))
  with open(os.path.join(HERE, "tables.md"), "w") as f:
    f.write("\n".join(parts))
  print(f"Wrote {os.path.join(HERE, 'tables.md')}")


if __name__ == "__main__":
  app.run(main)
