"""Classification metrics of the paper (Sec. 4.3): ACC, macro PRE/SEN/SPE/F1, G-mean, AUC.

G-mean follows Eq. 13 on the macro values, sqrt(SEN * SPE). AUC is the macro
one-vs-rest ROC AUC (for two classes, the AUC of class 1, which equals it).
Macro values average the classes present in the labels: a class without
examples (e.g. a folder evaluated without one class) has no sensitivity, F1
or AUC, is named in `absent_classes` and a warning, and is left out of the
averages. A value that is undefined on the given labels is NaN in Python and
`null` in JSON (`to_json_safe`, `dumps`), never a silent 0.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
from absl import logging
from sklearn import metrics as skm

SUMMARY_KEYS = ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "g_mean",
                "auc")


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a / b, 0 where b is 0 (scikit-learn's zero_division=0); b may be below 1 (F1 of small P and R)."""
  return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
  if y.min() == y.max():
    return math.nan
  return float(skm.roc_auc_score(y, score))


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
  """All metrics of one split from integer labels (N,) and class probabilities (N, C)."""
  labels = np.asarray(labels).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  num_classes = len(class_names)
  if probs.ndim != 2 or probs.shape != (labels.shape[0], num_classes):
    raise ValueError(f"probs must be (N, {num_classes}) for {labels.shape[0]} labels, got {probs.shape}.")
  if labels.size == 0:
    raise ValueError("No examples to evaluate: the split is empty.")
  preds = probs.argmax(-1)
  cm = skm.confusion_matrix(labels, preds, labels=np.arange(num_classes))
  tp = np.diag(cm).astype(np.float64)
  fp = cm.sum(0) - tp
  fn = cm.sum(1) - tp
  tn = cm.sum() - tp - fp - fn
  present = cm.sum(1) > 0
  absent = [name for name, p in zip(class_names, present) if not p]
  if absent:
    logging.warning("No examples of %s among the %d evaluated: macro metrics average the %d classes present; "
                    "their per-class sensitivity, F1 and AUC are undefined (null).", ", ".join(absent), labels.size,
                    int(present.sum()))
  undefined = lambda values: np.where(present, values, math.nan)
  precision = _safe_div(tp, tp + fp)
  precision = np.where(present | (tp + fp > 0), precision, math.nan)  # an absent class never predicted: 0/0
  sensitivity = undefined(_safe_div(tp, tp + fn))
  specificity = _safe_div(tn, tn + fp)
  f1 = undefined(_safe_div(2 * precision * sensitivity, precision + sensitivity))
  auc = np.array([_auc((labels == n).astype(int), probs[:, n]) for n in range(num_classes)])
  if num_classes == 2:
    macro_auc = auc[1]
  else:
    macro_auc = float(np.mean(auc[present])) if np.all(np.isfinite(auc[present])) else math.nan
  macro = lambda values: float(np.mean(values[present]))
  sen, spe = macro(sensitivity), macro(specificity)
  return {
      "num_examples": int(labels.size),
      "accuracy": float(tp.sum() / cm.sum()),
      "macro_precision": macro(precision),
      "macro_sensitivity": sen,
      "macro_specificity": spe,
      "macro_f1": macro(f1),
      "g_mean": math.sqrt(sen * spe),
      "auc": float(macro_auc),
      "absent_classes": absent,
      "per_class": {
          name: {"precision": float(precision[n]), "sensitivity": float(sensitivity[n]),
                 "specificity": float(specificity[n]), "f1": float(f1[n]), "auc": float(auc[n]),
                 "support": int(cm[n].sum())}
          for n, name in enumerate(class_names)},
      "confusion_matrix": cm.tolist(),
      "class_names": list(class_names),
  }


def to_json_safe(obj: Any) -> Any:
  """NaN/inf -> None recursively, so `json.dump` writes valid JSON."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: to_json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json_safe(v) for v in obj]
  if isinstance(obj, np.generic):
    return to_json_safe(obj.item())
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """`obj` as strict JSON: NaN/inf as null (`to_json_safe`); anything else non-finite raises."""
  return json.dumps(to_json_safe(obj), allow_nan=False, **kwargs)
