"""The GLUE / SuperGLUE metrics (accuracy, F1, macro-F1, Matthews correlation, Pearson, Spearman)."""

from __future__ import annotations

import numpy as np


def _f1(pred: np.ndarray, gold: np.ndarray, positive: int) -> float:
    tp = float(np.sum((pred == positive) & (gold == positive)))
    fp = float(np.sum((pred == positive) & (gold != positive)))
    fn = float(np.sum((pred != positive) & (gold == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def task_metrics(
    preds: list[float], golds: list[float], regression: bool, num_labels: int
) -> dict[str, float]:
    """All metrics that apply (classification: predictions are class ids, -1 for unparseable)."""
    pred, gold = np.asarray(preds, dtype=float), np.asarray(golds, dtype=float)
    if regression:
        return {"pearson": _pearson(pred, gold), "spearman": _pearson(_ranks(pred), _ranks(gold))}
    out = {"accuracy": float(np.mean(pred == gold))}
    if num_labels == 2:
        out["f1"] = _f1(pred, gold, 1)
        out["matthews"] = _matthews(pred, gold)
    else:
        out["macro_f1"] = float(np.mean([_f1(pred, gold, c) for c in range(num_labels)]))
    return out
