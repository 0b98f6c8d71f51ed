"""Evaluation metrics (GLUE's): accuracy, F1, Matthews correlation, Pearson, Spearman.

Plain NumPy, written from the definitions, tested against scikit-learn / SciPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "f1_binary", "matthews_corrcoef", "pearson", "spearman", "compute"]


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(pred) == np.asarray(true)))


def f1_binary(pred: np.ndarray, true: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0 when there is no positive."""
    pred, true = np.asarray(pred) == positive, np.asarray(true) == positive
    tp = float(np.sum(pred & true))
    denominator = 2 * tp + float(np.sum(pred & ~true)) + float(np.sum(~pred & true))
    return 0.0 if denominator == 0 else 2 * tp / denominator


def matthews_corrcoef(pred: np.ndarray, true: np.ndarray) -> float:
    """Binary Matthews correlation (TP TN - FP FN) / sqrt(...); 0 when undefined."""
    pred, true = np.asarray(pred).astype(bool), np.asarray(true).astype(bool)
    tp = float(np.sum(pred & true))
    tn = float(np.sum(~pred & ~true))
    fp = float(np.sum(pred & ~true))
    fn = float(np.sum(~pred & true))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else float((tp * tn - fp * fn) / denominator)


def pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return 0.0 if denominator == 0 else float(np.sum(x * y) / denominator)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman needs."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return ranks


def spearman(pred: np.ndarray, true: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the average ranks."""
    return pearson(_ranks(pred), _ranks(true))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(
    names: list[str] | tuple[str, ...], pred: np.ndarray, true: np.ndarray
) -> dict[str, float]:
    """``{name: metric(pred, true)}`` for the named metrics."""
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(_METRICS)}")
    return {name: _METRICS[name](pred, true) for name in names}
