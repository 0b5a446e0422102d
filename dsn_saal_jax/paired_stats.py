"""Paired comparisons of two arms over seeds, for the sweep tables and the results/ READMEs.

Runs with the same seed share their initialization, data order and subsample, so two arms compare
by their per-seed differences: mean and sample std of the differences, a Student-t interval for the
mean difference, the paired t-test, and two exact tests that assume no normality, the sign test and
the sign-flip permutation test. With n pairs neither exact test can give a two-sided p below
2 / 2**n (0.25 for 3 seeds); `min_exact_p` says so in the tables.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats


def paired_difference(a: Sequence[float | None], b: Sequence[float | None],
                      confidence: float = 0.95) -> dict[str, Any]:
  """Statistics of the differences a[i] - b[i]; pairs where either value is missing or non-finite are dropped.

  Returns n, mean, std (ddof=1), ci (the t interval at `confidence`; None below 2 pairs or at zero
  spread), t_p (paired t-test, two-sided; None where undefined), wins / losses (pairs with a ahead /
  behind), sign_p (exact two-sided sign test, ties dropped) and permutation_p (exact two-sided
  sign-flip test on the mean difference, ties kept).
  """
  if len(a) != len(b):
    raise ValueError(f"A paired comparison needs as many values in each arm, got {len(a)} and {len(b)}.")
  ok = lambda x: x is not None and np.isfinite(x)
  # Rounded so that equal metrics computed along different float paths tie instead of winning by 1e-17.
  d = np.round(np.asarray([x - y for x, y in zip(a, b) if ok(x) and ok(y)], np.float64), 12)
  n = int(d.size)
  out: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci": None, "t_p": None, "wins": 0, "losses": 0,
                         "sign_p": None, "permutation_p": None}
  if n == 0:
    return out
  mean = float(d.mean())
  std = float(d.std(ddof=1)) if np.ptp(d) > 0 else 0.0  # not ~1e-17 from the mean's rounding
  wins, losses = int((d > 0).sum()), int((d < 0).sum())
  out.update(mean=mean, std=std, wins=wins, losses=losses,
             sign_p=float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0,
             permutation_p=_sign_flip_p(d))
  if n > 1 and std > 0:  # At zero spread the t statistic is 0/0 or infinite: no test, no interval.
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / np.sqrt(n)
    out.update(ci=[mean - half, mean + half], t_p=float(stats.ttest_1samp(d, 0.0).pvalue))
  return out


def _sign_flip_p(d: np.ndarray) -> float | None:
  """Exact two-sided p of the mean difference under random signs (all 2**n flips; None above 20 pairs)."""
  if d.size > 20:
    return None
  flips = np.asarray(list(itertools.product((1.0, -1.0), repeat=d.size)))
  means = np.abs(flips @ d) / d.size
  return float(np.mean(means >= abs(d.mean()) - 1e-12))


def min_exact_p(n: int) -> float:
  """The smallest two-sided p an exact sign or sign-flip test can give with n pairs: 2 / 2**n."""
  return min(1.0, 2.0 * 0.5**n)


def format_difference(d: Mapping[str, Any]) -> str:
  """One table cell: mean [ci], t-test p, pairs ahead; e.g. '-0.020 [-0.064, +0.024] p 0.19, 0/3 ahead, 1 tied'."""
  if d["mean"] is None:
    return "-"
  ci = f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] is not None else ""
  p = f"p {d['t_p']:.2f}" if d["t_p"] is not None else "p -"
  ties = d["n"] - d["wins"] - d["losses"]
  return f"{d['mean']:+.3f}{ci} {p}, {d['wins']}/{d['n']} ahead" + (f", {ties} tied" if ties else "")


def paired_markdown(entries: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A Markdown table of paired differences, one row per entry {'label', 'columns': {name: stats}}, and its key."""
  if not entries:
    return ""
  n = sorted({s["n"] for e in entries for s in e["columns"].values() if s["n"]}) or [0]
  lines = ["| Paired difference | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
  for e in entries:
    cells = [format_difference(e["columns"][c]) if c in e["columns"] else "-" for c in columns]
    lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
  lines += ["", f"Paired by seed ({'/'.join(map(str, n))} pairs): mean difference [95% t interval], paired t-test "
            "p (two-sided; '-' where the differences have no spread), and in how many pairs the first arm is "
            f"ahead (tied: equal values). With {n[0]} pairs no exact sign or sign-flip test can give p below "
            f"{min_exact_p(n[0]):.2g}."]
  return "\n".join(lines) + "\n"
