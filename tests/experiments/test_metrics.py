"""GLUE metrics against scikit-learn and SciPy."""

from __future__ import annotations

import numpy as np
import pytest

from rdrop_lab import metrics

sk = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def test_classification_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        true = rng.integers(0, 2, 50)
        pred = np.where(rng.random(50) < 0.7, true, 1 - true)
        assert metrics.accuracy(pred, true) == pytest.approx(sk.accuracy_score(true, pred))
        assert metrics.f1_binary(pred, true) == pytest.approx(sk.f1_score(true, pred))
        assert metrics.matthews_corrcoef(pred, true) == pytest.approx(
            sk.matthews_corrcoef(true, pred)
        )
    assert metrics.matthews_corrcoef(np.ones(5), np.ones(5)) == 0.0


def test_correlations_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(1)
    true = rng.integers(0, 6, 40).astype(float)
    pred = true + rng.normal(0, 1.5, 40).round(0)
    assert metrics.pearson(pred, true) == pytest.approx(stats.pearsonr(pred, true)[0])
    assert metrics.spearman(pred, true) == pytest.approx(stats.spearmanr(pred, true)[0])
    assert metrics.pearson(np.ones(4), np.arange(4.0)) == 0.0


def test_compute_rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.compute(["bleu"], np.zeros(2), np.zeros(2))
