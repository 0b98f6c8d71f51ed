"""Statistics for comparing training methods over seeds (numpy + scipy only).

Everything here is a pure function of its inputs; the bootstrap is seeded, so a report built
twice from the same run records is identical.

Example:
    >>> from rdrop_lab.stats import mean_std, paired_difference
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    >>> d = paired_difference([0.85, 0.86, 0.88], [0.84, 0.84, 0.85])
    >>> round(d.mean, 4), d.wins, d.ties, d.losses
    (0.02, 3, 0, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit  # type: ignore[import-untyped]

__all__ = [
    "GAIN_KEPT_MIN_SEEDS",
    "PairedDifference",
    "bootstrap_interval",
    "format_interval",
    "format_mean_std",
    "format_signed",
    "gain_kept",
    "mean_std",
    "paired_difference",
    "t_interval",
]

_BOOTSTRAP_BLOCK = 1 << 20  # resampled values drawn per block; bounds memory for large n


def _as_vector(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    """Validate ``values`` as a non-empty, finite, one-dimensional float64 array."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values: {array.tolist()}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values``.

    ``mean = sum(x) / n`` and ``std = sqrt(sum((x - mean)^2) / (n - 1))`` (``ddof=1``, the
    unbiased-variance convention used for "mean ± std over seeds"). With a single value the
    std is reported as ``0.0``.

    Args:
        values: one or more finite numbers (e.g. one metric value per seed).

    Returns:
        ``(mean, std)`` as Python floats.

    Raises:
        ValueError: if ``values`` is empty, not one-dimensional, or not finite.

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
        >>> mean_std([5.0])
        (5.0, 0.0)
    """
    array = _as_vector(values)
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return mean, std


def t_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``values``.

    ``mean ± t_{(1 + confidence) / 2, n - 1} · std / sqrt(n)`` with the sample std (``ddof=1``).
    It assumes the values are independent draws from a roughly normal distribution.

    Args:
        values: at least one finite number.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when there is a single value (no spread estimate).
        When all values are equal the sample std is 0 and the interval is the point
        ``(mean, mean)``: the formula has nothing to widen it with, and a handful of equal
        values does not prove the spread is 0, so read it with ``n``.

    Example:
        >>> low, high = t_interval([1.0, 2.0, 3.0])   # 2 ± 4.302653 · 1 / sqrt(3)
        >>> round(low, 4), round(high, 4)
        (-0.4841, 4.4841)
        >>> t_interval([0.5, 0.5, 0.5])
        (0.5, 0.5)
    """
    _check_confidence(confidence)
    array = _as_vector(values)
    n = array.size
    if n < 2:
        return math.nan, math.nan
    mean, std = mean_std(array)
    quantile = float(stdtrit(n - 1, 0.5 + confidence / 2.0))  # Student-t quantile
    half_width = quantile * std / math.sqrt(n)
    return mean - half_width, mean + half_width


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    Draws ``n_bootstrap`` resamples of size ``n`` with replacement
    (``numpy.random.default_rng(seed)``), takes the mean of each, and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means (linear
    interpolation). The interval always lies within ``[min(values), max(values)]``; with few
    values it is narrower than the t-interval and under-covers, so read both.

    Args:
        values: at least one finite number.
        confidence: coverage of the interval, in (0, 1).
        n_bootstrap: number of resamples (>= 1).
        seed: seed of the numpy ``Generator``; the same inputs and seed give the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when there is a single value.

    Example:
        >>> low, high = bootstrap_interval([1.0, 2.0, 3.0], seed=0)
        >>> 1.0 <= low <= 2.0 <= high <= 3.0
        True
    """
    _check_confidence(confidence)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    array = _as_vector(values)
    n = array.size
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BOOTSTRAP_BLOCK // n)
    means = np.empty(n_bootstrap, dtype=np.float64)
    for start in range(0, n_bootstrap, rows_per_block):
        stop = min(start + rows_per_block, n_bootstrap)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = array[indices].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifference:
    """Summary of per-seed differences ``treatment - control``.

    Attributes:
        n: number of pairs (seeds present in both methods).
        mean: mean of the differences.
        std: sample std of the differences (``ddof=1``; ``0.0`` when ``n == 1``).
        t_low, t_high: Student-t interval of the mean difference (``df = n - 1``);
            NaN when ``n == 1``.
        boot_low, boot_high: percentile-bootstrap interval of the mean difference;
            NaN when ``n == 1``.
        wins: pairs with ``treatment > control``.
        ties: pairs with ``treatment == control``.
        losses: pairs with ``treatment < control``.
        confidence: coverage of both intervals.

    "Wins" means a larger value; for a lower-is-better metric the caller swaps wins and losses.
    """

    n: int
    mean: float
    std: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    wins: int
    ties: int
    losses: int
    confidence: float = 0.95

    def t_excludes_zero(self) -> bool:
        """True if the t-interval is defined and does not contain 0."""
        return _excludes_zero(self.t_low, self.t_high)

    def bootstrap_excludes_zero(self) -> bool:
        """True if the bootstrap interval is defined and does not contain 0."""
        return _excludes_zero(self.boot_low, self.boot_high)


def _excludes_zero(low: float, high: float) -> bool:
    if math.isnan(low) or math.isnan(high):
        return False
    return low > 0.0 or high < 0.0


def paired_difference(
    treatment: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison of two methods run on the same seeds.

    With ``d_i = treatment_i - control_i`` (pair ``i`` = one seed):
    ``mean = mean(d)``, ``std = std(d, ddof=1)``, the t-interval is
    ``mean ± t_{(1 + confidence) / 2, n - 1} · std / sqrt(n)`` (see :func:`t_interval`) and
    the bootstrap interval is the percentile bootstrap of ``mean(d)`` (see
    :func:`bootstrap_interval`). Pairing removes the seed-to-seed variance shared by both
    methods (same data subsample, same initialisation).

    Args:
        treatment: one value per seed for the method under test.
        control: one value per seed for the reference method, in the same seed order.
        confidence: coverage of both intervals, in (0, 1).
        n_bootstrap: number of bootstrap resamples.
        seed: seed of the bootstrap's numpy ``Generator``.

    Returns:
        A :class:`PairedDifference`. With a single pair (``n == 1``) the std is ``0.0`` and all
        four interval bounds are NaN: one seed says nothing about the spread.

    Raises:
        ValueError: if the sequences differ in length, are empty, or contain non-finite values.

    Example:
        >>> d = paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])   # differences 1, 2, 3
        >>> d.mean, d.std, round(d.t_low, 4), round(d.t_high, 4)
        (2.0, 1.0, -0.4841, 4.4841)
        >>> (d.wins, d.ties, d.losses)
        (3, 0, 0)
    """
    treated = _as_vector(treatment, "treatment")
    controlled = _as_vector(control, "control")
    if treated.shape != controlled.shape:
        raise ValueError(
            f"treatment and control must have equal lengths, got {treated.size} and "
            f"{controlled.size}"
        )
    diffs = treated - controlled
    mean, std = mean_std(diffs)
    t_low, t_high = t_interval(diffs, confidence)
    boot_low, boot_high = bootstrap_interval(diffs, confidence, n_bootstrap, seed)
    return PairedDifference(
        n=int(diffs.size),
        mean=mean,
        std=std,
        t_low=t_low,
        t_high=t_high,
        boot_low=boot_low,
        boot_high=boot_high,
        wins=int(np.sum(treated > controlled)),
        ties=int(np.sum(treated == controlled)),
        losses=int(np.sum(treated < controlled)),
        confidence=confidence,
    )


#: The fewest seeds for which :func:`gain_kept` gives an interval.
GAIN_KEPT_MIN_SEEDS = 3


def gain_kept(
    variant: Sequence[float] | np.ndarray,
    full: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The share of a method's gain over the baseline that a cheaper variant keeps.

    With one value per seed for each of the three methods (same seeds, same order):
    ``kept = mean(variant - baseline) / mean(full - baseline)``, and its percentile
    bootstrap interval from resampling the seeds jointly (``n_bootstrap`` draws of ``n``
    seed indices, ``numpy.random.default_rng(seed).integers``), leaving out the draws
    whose denominator is 0 or of the other sign than ``mean(full - baseline)`` (there the
    full method lost, and a ratio would flip meaning). The ratio does not depend on the
    metric's direction. When the full method's own gain is small the interval is wide:
    read it next to that gain.

    Args:
        variant: the cheaper variant's score per seed.
        full: the full method's score per seed.
        baseline: the baseline's score per seed.
        confidence: coverage of the interval, in (0, 1).
        n_bootstrap: number of resamples (>= 1).
        seed: seed of the bootstrap's numpy ``Generator``.

    Returns:
        ``(kept, low, high)``; ``kept`` is NaN when ``mean(full - baseline) == 0``, and the
        bounds are NaN with fewer than :data:`GAIN_KEPT_MIN_SEEDS` seeds (with two, the
        percentile interval would be little more than the two per-seed ratios).

    Raises:
        ValueError: if the sequences differ in length, are empty, or hold non-finite values.

    Example:
        >>> kept, low, high = gain_kept([0.81, 0.82], [0.82, 0.84], [0.80, 0.80])
        >>> round(kept, 4)   # (0.01 + 0.02) / (0.02 + 0.04)
        0.5

    References:
        Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13 (percentile
        intervals).
    """
    _check_confidence(confidence)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    arrays = [_as_vector(v, name) for v, name in ((variant, "variant"), (full, "full"))]
    base = _as_vector(baseline, "baseline")
    if any(a.shape != base.shape for a in arrays):
        raise ValueError(
            "variant, full and baseline must have equal lengths, got "
            f"{arrays[0].size}, {arrays[1].size} and {base.size}"
        )
    kept_gain, full_gain = arrays[0] - base, arrays[1] - base
    denominator = full_gain.mean()
    kept = float(kept_gain.mean() / denominator) if denominator != 0 else math.nan
    if base.size < GAIN_KEPT_MIN_SEEDS or denominator == 0:
        return kept, math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, base.size, size=(n_bootstrap, base.size))
    denominators = full_gain[draws].mean(axis=1)
    usable = np.sign(denominators) == np.sign(denominator)
    if not usable.any():
        return kept, math.nan, math.nan
    ratios = kept_gain[draws[usable]].mean(axis=1) / denominators[usable]
    alpha = 1.0 - confidence
    low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    return kept, float(low), float(high)


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """Format ``mean ± std`` with ``digits`` decimals (``"—"`` for a NaN mean).

    Example:
        >>> format_mean_std(0.81234, 0.0123, 3)
        '0.812 ± 0.012'
    """
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_signed(value: float, digits: int = 4) -> str:
    """Format a difference with an explicit sign (``"—"`` for NaN).

    Example:
        >>> format_signed(0.0123, 3), format_signed(-0.5, 1)
        ('+0.012', '-0.5')
    """
    if math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}"


def format_interval(low: float, high: float, digits: int = 4) -> str:
    """Format an interval as ``[low, high]`` with signs (``"—"`` if undefined).

    Example:
        >>> format_interval(-0.48414, 4.48414, 2)
        '[-0.48, +4.48]'
    """
    if math.isnan(low) or math.isnan(high):
        return "—"
    return f"[{format_signed(low, digits)}, {format_signed(high, digits)}]"
