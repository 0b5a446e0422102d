"""Regenerates results/covid19_ct_selftrans from saved runs, without training.

  python results/covid19_ct_selftrans/collect.py --runs=/work/studies/selftrans

1. Copies each run's small files (config.json, history.jsonl, report/test/metrics.json) from --runs
   (run_study.sh's output; skipped if absent) into results/covid19_ct_selftrans/runs/, and each
   pretraining run's history.jsonl into runs/ssl/seed<N>/.
2. Writes tables.md: Table 8's columns (ACC, F1, AUC, COVID SEN, COVID SPE) per arm, mean ± std over
   seeds, then the paired differences (same seed) the README's reading rests on (paired_stats). The
   random-init arms are results/covid19_ct_cpu's runs: the same config and seeds.
3. Plots test ACC and AUC per seed and arm (selftrans.png), and the pretraining loss per seed.
"""

import functools
import glob
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from dsn_saal_jax import paired_stats, runtime, tables  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "/work/studies/selftrans", "run_study.sh's RUNS directory (skipped if absent).")

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
CPU_STUDY = os.path.join(os.path.dirname(HERE), "covid19_ct_cpu", "runs", "main")
SMALL_FILES = ("config.json", "history.jsonl", os.path.join("report", "test", "metrics.json"))
SEEDS = (0, 1, 2)

ARMS = (  # (row label, the arm's method directory)
    ("VGG-16 + CE, random init", os.path.join(CPU_STUDY, "baseline_ce")),
    ("DSN-SAAL, random init", os.path.join(CPU_STUDY, "dsn_saal")),
    ("VGG-16 + CE, SimCLR init", os.path.join(RUNS, "ssl_init", "baseline_ce")),
    ("DSN-SAAL, SimCLR init", os.path.join(RUNS, "ssl_init", "dsn_saal")),
    ("DSN-SAAL + augmentation, random init", os.path.join(RUNS, "augment", "dsn_saal")),
)
SHORT = ("CE\nrandom", "DSN-SAAL\nrandom", "CE\nSimCLR", "DSN-SAAL\nSimCLR", "DSN-SAAL\n+ augment")  # plot labels
COMPARISONS = (  # (arm, minus arm): the questions the README asks
    (2, 0), (3, 1), (4, 1), (3, 2), (1, 0),
)


def copy_small_files(src: str) -> None:
  for path in glob.glob(os.path.join(src, "*", "*", "covid*_seed*_fold*")):
    for name in SMALL_FILES:
      if os.path.exists(os.path.join(path, name)):
        out = os.path.join(RUNS, os.path.relpath(path, src), name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(os.path.join(path, name), out)
  for path in glob.glob(os.path.join(src, "ssl", "seed*", "history.jsonl")):
    out = os.path.join(RUNS, os.path.relpath(path, src))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copyfile(path, out)


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def arm_metrics(method_dir: str) -> dict[int, dict]:
  """{seed: metrics.json} of the arm's finished runs on the official split."""
  out = {}
  for seed in SEEDS:
    path = os.path.join(method_dir, f"covid1_seed{seed}_fold0", SMALL_FILES[2])
    if os.path.exists(path):
      out[seed] = read_json(path)
  return out


def results_table(metrics: dict[str, dict[int, dict]]) -> str:
  rows, columns = {}, None
  for label, _ in ARMS:
    runs = [dict(model="dsn", loss="ce", covid_fraction=1.0, seed=s, fold=0, metrics=m)
            for s, m in metrics[label].items()]
    if runs:
      table = tables.aggregate(runs, "table8")
      columns = table["columns"]
      rows[f"{label} (n={len(runs)})"] = next(iter(table["rows"].values()))
  return tables.to_markdown({"table": "table8", "columns": columns, "rows": rows}) if rows else ""


def paired_table(metrics: dict[str, dict[int, dict]]) -> str:
  columns = tables.TABLE_COLUMNS["table8"]
  value = lambda m, key: functools.reduce(lambda d, k: (d or {}).get(k), key.split("/"), m)
  entries = []
  for i, j in COMPARISONS:
    (arm, _), (ref, _) = ARMS[i], ARMS[j]
    seeds = [s for s in metrics[arm] if s in metrics[ref]]
    if seeds:
      entries.append({"label": f"{arm} minus {ref}", "columns": {
          name: paired_stats.paired_difference([value(metrics[arm][s], key) for s in seeds],
                                               [value(metrics[ref][s], key) for s in seeds])
          for key, name in columns}})
  return paired_stats.paired_markdown(entries, [name for _, name in columns])


def plot(metrics: dict[str, dict[int, dict]], path: str) -> None:
  """Test ACC and AUC of every run, an arm per column, seeds joined by colour; pretraining loss per seed."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  labels = [label for label, _ in ARMS]
  for ax, key, name in ((axes[0], "accuracy", "test ACC"), (axes[1], "auc", "test AUC (macro)")):
    for seed, colour in zip(SEEDS, ("C0", "C1", "C2")):
      xs = [i for i, label in enumerate(labels) if seed in metrics[label]]
      ax.plot(xs, [metrics[labels[i]][seed][key] for i in xs], "o-", color=colour, label=f"seed {seed}", alpha=0.8)
    ax.set_xticks(range(len(labels)), SHORT, fontsize=8)
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for seed, colour in zip(SEEDS, ("C0", "C1", "C2")):
    run = os.path.join(RUNS, "ssl", f"seed{seed}")
    if os.path.exists(os.path.join(run, "history.jsonl")):
      steps, loss = runtime.read_history(run)["pretrain/loss"]
      axes[2].plot(steps, loss, color=colour, label=f"seed {seed}")
  axes[2].set_xlabel("pretraining step")
  axes[2].set_ylabel("SimCLR loss (NT-Xent)")
  axes[2].grid(alpha=0.3)
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  if os.path.isdir(FLAGS.runs):
    copy_small_files(FLAGS.runs)
  metrics = {label: arm_metrics(d) for label, d in ARMS}
  text = ("# Self-Trans study: tables (written by collect.py)\n\n"
          "COVID19-CT official split, configs/covid19_ct_cpu.py, test split, best checkpoint by validation "
          "macro F1; n = seeds finished.\n\n" + results_table(metrics) + "\n## Paired differences (same seed)\n\n"
          + paired_table(metrics))
  with open(os.path.join(HERE, "tables.md"), "w") as f:
    f.write(text)
  print(text)
  plot(metrics, os.path.join(HERE, "selftrans.png"))


if __name__ == "__main__":
  app.run(main)
