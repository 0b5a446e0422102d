"""The sweep tables of the paper's Tables 3-6, 8 and 9: runs' metrics.json aggregated per method and group.

Each cell is mean +/- sample std over seeds (or folds); rows that share seeds with their
reference row also get paired per-seed differences (`paired_stats`). Written as
markdown and JSON by `write_table` (`launch/sweep.py`, results/*/collect.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from dsn_saal_jax import metrics as metrics_lib
from dsn_saal_jax import paired_stats

# (metric key in metrics.json, column name in the paper).
TABLE_COLUMNS = {
    "table3": (("accuracy", "ACC"), ("macro_f1", "F1-score"), ("g_mean", "G-mean")),
    "table4": (("accuracy", "ACC"), ("macro_f1", "F1-score"), ("g_mean", "G-mean"), ("num_params", "Params")),
    "table5": (("accuracy", "ACC"), ("macro_f1", "F1-score"), ("g_mean", "G-mean")),
    "table6": (("accuracy", "ACC"), ("macro_f1", "F1-score"), ("g_mean", "G-mean"),
               ("macro_sensitivity", "SEN"), ("macro_specificity", "SPE"), ("per_class/covid/sensitivity", "COVID SEN")),
    "table8": (("accuracy", "ACC"), ("macro_f1", "F1-score"), ("auc", "AUC"),
               ("per_class/covid/sensitivity", "COVID SEN"), ("per_class/covid/specificity", "COVID SPE")),
    "table9": (("accuracy", "ACC"), ("macro_f1", "F1-score"), ("auc", "AUC"), ("macro_precision", "PRE"),
               ("macro_sensitivity", "SEN")),
}
# Columns whose change from the full training set Table 6 reports.
DELTA_COLUMNS = ("SEN", "COVID SEN")


BACKBONE_NAMES = {"vgg16_bn": "VGG-16", "resnet50": "ResNet-50", "resnext50_32x4d": "ResNeXt-50",
                  "densenet169": "DenseNet-169", "mobilenet_v2": "MobileNet-V2"}


def method_name(model: str, loss: str, backbone: str = "vgg16_bn", table: str = "") -> str:
  """A row's name as the paper writes it: 'VGG-16 + CE', 'DSN-SAAL', Table 3's 'ResNet-50', Table 4's 'ResNet-50 DSN'."""
  name = BACKBONE_NAMES.get(backbone, backbone)
  if table == "table4":
    return f"{name} {'DSN' if model == 'dsn' else 'Baseline'}"
  if model == "dsn" and loss == "saal":
    return "DSN-SAAL" if backbone == "vgg16_bn" else f"DSN-SAAL ({name})"
  if table == "table3" and model == "baseline" and loss == "ce":
    return name
  return {"baseline": name, "dsn": "DSN" if backbone == "vgg16_bn" else f"{name} DSN"}[model] + f" + {loss.upper()}"


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def aggregate(runs: Sequence[Mapping[str, Any]], table: str) -> dict[str, Any]:
  """Mean +/- std (sample std over seeds or folds) per row of the paper's `table` layout, and paired differences.

  `runs` items: {'model', 'loss', 'covid_fraction', 'seed', 'fold', 'metrics': metrics.json dict}.
  Rows: Tables 5, 8 and 9 one per method; Table 6 one per COVID fraction (descending), with
  one column group per method and the sensitivities' change from the full training set.
  COVID SEN/SPE are the COVID class's own (for two classes macro SEN = macro SPE = balanced accuracy).
  'paired' compares, run by run of the same seed and fold, every method with the first method of its
  backbone in `runs` (`--methods` order; Table 6: within each fraction).
  """
  if table not in TABLE_COLUMNS:
    raise ValueError(f"Unknown table {table!r}; choose one of {', '.join(TABLE_COLUMNS)}.")
  columns = TABLE_COLUMNS[table]
  name = lambda r: method_name(r["model"], r["loss"], r.get("backbone") or "vgg16_bn", table)
  row_key = (lambda r: f"{r['covid_fraction']:g}") if table == "table6" else name
  rows: dict[str, dict[str, dict[str, list]]] = {}
  by_run: dict[tuple[str, str], dict[tuple[Any, Any], Mapping[str, Any]]] = {}
  reference: dict[str, str] = {}  # backbone -> its first method's name
  arms: dict[tuple[str, str], str] = {}  # (row, group) -> backbone
  for r in runs:
    group = name(r) if table == "table6" else ""
    cell = rows.setdefault(row_key(r), {}).setdefault(group, {k: [] for k, _ in columns})
    for k, _ in columns:
      cell[k].append(_lookup(r["metrics"], k))
    by_run.setdefault((row_key(r), group), {})[(r.get("seed"), r.get("fold"))] = r["metrics"]
    reference.setdefault(r.get("backbone") or "vgg16_bn", name(r))
    arms.setdefault((row_key(r), group), r.get("backbone") or "vgg16_bn")
  if table == "table6":
    rows = dict(sorted(rows.items(), key=lambda kv: -float(kv[0])))
  out = {"table": table, "columns": [name for _, name in columns],
         "rows": {row: {group: {name: _mean_std(cell[k]) for k, name in columns} for group, cell in groups.items()}
                  for row, groups in rows.items()}}
  if table == "table6":
    full = out["rows"].get("1")
    for groups in out["rows"].values():
      for group, cell in groups.items():
        for name in DELTA_COLUMNS:
          ref = (full or {}).get(group, {}).get(name, {}).get("mean")
          if ref is not None and cell[name]["mean"] is not None:
            cell[name]["delta"] = cell[name]["mean"] - ref
  out["paired"] = []
  for (row, group), backbone in arms.items():
    ref = (row, reference[backbone]) if table == "table6" else (reference[backbone], group)
    if (row, group) != ref and ref in by_run:
      out["paired"].append(_paired(row, group, by_run[(row, group)], ref, by_run[ref],
                                   [k for k in columns if k[1] != "Params"], table))
  if table == "table6":  # the rows' order; then whether the sensitivities' drop from the full set differs
    out["paired"].sort(key=lambda p: -float(p["row"]))
    out["paired"] += _paired_drops(by_run, arms, reference, [k for k in columns if k[1] in DELTA_COLUMNS])
  return out


def _paired(row: str, group: str, mine: Mapping[tuple[Any, Any], Mapping[str, Any]], ref: tuple[str, str],
            theirs: Mapping[tuple[Any, Any], Mapping[str, Any]], columns: Sequence[tuple[str, str]],
            table: str) -> dict[str, Any]:
  """`paired_stats.paired_difference` of a (row, group) with its reference `ref`, run by run of a (seed, fold)."""
  keys = [k for k in mine if k in theirs]
  label = f"{group or row} minus {ref[1] or ref[0]}"
  if table == "table6":
    label = ("Stand. split" if row == "1" else f"{float(row):.0%} of COVID-19") + f": {label}"
  return {"label": label, "row": row, "group": group, "minus": list(ref), "columns": {
      col: paired_stats.paired_difference([_lookup(mine[k], key) for k in keys],
                                          [_lookup(theirs[k], key) for k in keys]) for key, col in columns}}


def _paired_drops(by_run: Mapping[tuple[str, str], Mapping[tuple[Any, Any], Mapping[str, Any]]],
                  arms: Mapping[tuple[str, str], str], reference: Mapping[str, str],
                  columns: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
  """Table 6: each method's change from the full training set minus its reference's, run by run of one seed."""
  def change(row, group):
    full = by_run.get(("1", group), {})
    return {k: {name: None if None in (_lookup(m, key), _lookup(full[k], key)) else
                _lookup(m, key) - _lookup(full[k], key) for key, name in columns}
            for k, m in by_run[(row, group)].items() if k in full}
  out = []
  for (row, group), backbone in arms.items():
    ref = (row, reference[backbone])
    if row != "1" and group != ref[1] and ref in by_run:
      pair = _paired(row, group, change(row, group), ref, change(*ref), [(n, n) for _, n in columns], "table6")
      pair["label"] = pair["label"].replace(": ", ": change from the stand. split, ", 1)
      out.append(dict(pair, change_from_full=True))
  return sorted(out, key=lambda p: -float(p["row"]))


def _lookup(metrics: Mapping[str, Any], key: str) -> Any:
  """metrics.json value at `key`; '/' descends into nested dicts (per-class values); None if absent."""
  value: Any = metrics
  for part in key.split("/"):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  return value


def to_markdown(table: Mapping[str, Any]) -> str:
  """The aggregated table as Markdown, `mean ± std` per cell (Table 6: SEN's change in brackets)."""
  groups = sorted({g for row in table["rows"].values() for g in row})

  def cell(stat, column):
    if stat["mean"] is None:
      return "-"
    if column == "Params":  # the same in every run of a row
      return f"{stat['mean'] / 1e6:.2f} M"
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return text + (f" ({stat['delta']:+.3f})" if "delta" in stat else "")

  first = "COVID-19 fraction" if table["table"] == "table6" else "Method"
  header = [first] + [f"{c} ({g})" if g else c for c in table["columns"] for g in groups]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row, cells in table["rows"].items():
    label = ("Stand. split" if row == "1" else f"{float(row):.0%} of COVID-19") if table["table"] == "table6" else row
    values = [cell(cells[g][c], c) if g in cells else "-" for c in table["columns"] for g in groups]
    lines.append("| " + " | ".join([label] + values) + " |")
  # Runs per cell, leaving out columns no run recorded (e.g. Params in reports older than num_params).
  n = sorted({s["n"] for row in table["rows"].values() for c in row.values() for s in c.values() if s["n"]})
  lines.append("")
  lines.append(f"Mean ± sample std over {'/'.join(map(str, n))} runs per cell.")
  paired = paired_stats.paired_markdown(table.get("paired", []), [c for c in table["columns"] if c != "Params"])
  return "\n".join(lines) + "\n" + ("\n" + paired if paired else "")


def write_table(table: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  md, js = os.path.join(out_dir, f"{table['table']}.md"), os.path.join(out_dir, f"{table['table']}.json")
  with open(md, "w") as f:
    f.write(to_markdown(table))
  with open(js, "w") as f:
    f.write(metrics_lib.dumps(table, indent=2))
  return md, js
