"""rdrop_lab.stats against hand-computed values."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rdrop_lab.stats import (
    PairedDifference,
    bootstrap_interval,
    format_interval,
    format_mean_std,
    format_signed,
    gain_kept,
    mean_std,
    paired_difference,
    t_interval,
)

# Student-t quantiles (two-sided 95%), from tables: t_{0.975, df}.
T975_DF1 = 12.706205
T975_DF2 = 4.302653
T975_DF4 = 2.776445


def test_mean_std_hand_computed() -> None:
    # mean 2; squared deviations 1, 0, 1 -> variance 2 / (3 - 1) = 1
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    # 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32, sample variance 32 / 7
    mean, std = mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert mean == 5.0
    assert std == pytest.approx(math.sqrt(32 / 7), rel=1e-12)


def test_mean_std_single_value_and_errors() -> None:
    assert mean_std([0.75]) == (0.75, 0.0)
    assert mean_std(np.array([3.0])) == (3.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        mean_std([])
    with pytest.raises(ValueError, match="NaN"):
        mean_std([1.0, float("nan")])
    with pytest.raises(ValueError, match="one-dimensional"):
        mean_std([[1.0, 2.0]])


def test_t_interval_hand_computed() -> None:
    # 2 ± 4.302653 * 1 / sqrt(3) = 2 ± 4.302653 * 0.577350 = 2 ± 2.484138
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 2.484138, abs=1e-5)
    assert high == pytest.approx(2 + 2.484138, abs=1e-5)
    assert (high - low) / 2 == pytest.approx(T975_DF2 * 0.5773503, abs=1e-5)
    # two values 0 and 2: mean 1, std sqrt(2), half width 12.706205 * sqrt(2) / sqrt(2)
    low, high = t_interval([0.0, 2.0])
    assert (low, high) == pytest.approx((1 - T975_DF1, 1 + T975_DF1), abs=1e-5)
    # 90% interval of [1, 2, 3]: t_{0.95, 2} = 2.919986
    low, high = t_interval([1.0, 2.0, 3.0], confidence=0.90)
    assert high - 2 == pytest.approx(2.919986 * 0.5773503, abs=1e-5)
    assert all(math.isnan(v) for v in t_interval([1.0]))
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.5)


def test_paired_difference_hand_computed() -> None:
    treatment = [2.0, 4.0, 6.0]
    control = [1.0, 2.0, 3.0]  # differences 1, 2, 3
    d = paired_difference(treatment, control)
    assert isinstance(d, PairedDifference)
    assert d.n == 3
    assert d.mean == 2.0
    assert d.std == 1.0
    assert d.t_low == pytest.approx(-0.484138, abs=1e-5)
    assert d.t_high == pytest.approx(4.484138, abs=1e-5)
    assert (d.wins, d.ties, d.losses) == (3, 0, 0)
    assert d.confidence == 0.95
    # bootstrap interval contains the mean and stays within [min, max] of the differences
    assert 1.0 <= d.boot_low <= 2.0 <= d.boot_high <= 3.0
    assert d.boot_low < d.boot_high
    assert not d.t_excludes_zero()
    assert d.bootstrap_excludes_zero()


def test_paired_difference_five_pairs_wins_ties_losses() -> None:
    # differences +0.02, 0, -0.01, +0.03, +0.01: mean 0.01, squared deviations
    # 1e-4, 1e-4, 4e-4, 4e-4, 0 -> variance 1e-3 / 4 = 2.5e-4, std 0.0158114
    treatment = [0.82, 0.80, 0.79, 0.83, 0.81]
    control = [0.80, 0.80, 0.80, 0.80, 0.80]
    d = paired_difference(treatment, control)
    assert d.mean == pytest.approx(0.01, abs=1e-12)
    assert d.std == pytest.approx(0.0158114, abs=1e-7)
    half = T975_DF4 * 0.0158114 / math.sqrt(5)  # 2.776445 * 0.0158114 / 2.236068 = 0.019632
    assert half == pytest.approx(0.019632, abs=1e-6)
    assert (d.t_low, d.t_high) == pytest.approx((0.01 - half, 0.01 + half), abs=1e-6)
    assert (d.wins, d.ties, d.losses) == (3, 1, 1)


def test_paired_difference_interval_excludes_zero() -> None:
    # differences 0.05, 0.06, 0.07: 0.06 ± 4.302653 * 0.01 / sqrt(3) = 0.06 ± 0.024841
    d = paired_difference([0.85, 0.86, 0.87], [0.80, 0.80, 0.80])
    assert (d.t_low, d.t_high) == pytest.approx((0.035159, 0.084841), abs=1e-6)
    assert d.t_excludes_zero()


def test_paired_difference_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(123)
    treatment, control = rng.normal(size=7), rng.normal(size=7)
    first = paired_difference(treatment, control, seed=7)
    again = paired_difference(treatment, control, seed=7)
    other = paired_difference(treatment, control, seed=8)
    assert first == again
    assert (first.boot_low, first.boot_high) != (other.boot_low, other.boot_high)
    assert first.t_low == other.t_low  # the t-interval does not depend on the seed
    diffs = treatment - control
    assert diffs.min() <= first.boot_low <= diffs.mean() <= first.boot_high <= diffs.max()


def test_bootstrap_interval_matches_direct_resampling() -> None:
    values = np.array([0.1, 0.4, 0.2, 0.9])
    low, high = bootstrap_interval(values, n_bootstrap=500, seed=3)
    rng = np.random.default_rng(3)
    means = values[rng.integers(0, 4, size=(500, 4))].mean(axis=1)
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    # constant differences: degenerate intervals at the value
    d = paired_difference([1.5, 2.5], [1.0, 2.0])
    assert (d.t_low, d.t_high, d.boot_low, d.boot_high) == pytest.approx((0.5,) * 4)
    with pytest.raises(ValueError, match="n_bootstrap"):
        bootstrap_interval(values, n_bootstrap=0)


def test_paired_difference_single_pair_has_nan_intervals() -> None:
    d = paired_difference([0.9], [0.8])
    assert d.n == 1 and d.mean == pytest.approx(0.1) and d.std == 0.0
    assert all(math.isnan(v) for v in (d.t_low, d.t_high, d.boot_low, d.boot_high))
    assert (d.wins, d.ties, d.losses) == (1, 0, 0)
    assert not d.t_excludes_zero() and not d.bootstrap_excludes_zero()


def test_paired_difference_validation() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1.0, float("inf")], [1.0, 2.0])


def test_paired_difference_is_frozen() -> None:
    d = paired_difference([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.mean = 0.0  # type: ignore[misc]


def test_formatting() -> None:
    assert format_mean_std(0.81234, 0.0123, 3) == "0.812 ± 0.012"
    assert format_mean_std(float("nan"), 0.0) == "—"
    assert format_signed(0.02) == "+0.0200"
    assert format_signed(-0.004841, 4) == "-0.0048"
    assert format_interval(-0.484138, 4.484138, 3) == "[-0.484, +4.484]"
    assert format_interval(float("nan"), float("nan")) == "—"


def test_gain_kept_hand_computed() -> None:
    # Gains over the baseline per seed: variant 0.01, 0.00, 0.02; full 0.02, 0.02, 0.04.
    variant, full, base = [0.81, 0.80, 0.82], [0.82, 0.82, 0.84], [0.80, 0.80, 0.80]
    kept, low, high = gain_kept(variant, full, base, n_bootstrap=2000, seed=3)
    assert kept == pytest.approx(0.03 / 0.08)
    # The interval resamples the seeds jointly: the same draws, by hand.
    draws = np.random.default_rng(3).integers(0, 3, size=(2000, 3))
    v, f = np.array([0.01, 0.0, 0.02]), np.array([0.02, 0.02, 0.04])
    ratios = v[draws].mean(axis=1) / f[draws].mean(axis=1)
    assert (low, high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
    assert low <= kept <= high


def test_gain_kept_interval_leaves_out_draws_where_the_full_method_lost() -> None:
    # Full gains 0.04, 0.02, -0.03 (mean +0.01): draws whose mean full gain is <= 0 would
    # turn a share of a gain into a share of a loss; they are left out, by hand.
    variant, full, base = [0.82, 0.81, 0.79], [0.84, 0.82, 0.77], [0.80, 0.80, 0.80]
    kept, low, high = gain_kept(variant, full, base, n_bootstrap=4000, seed=5)
    v, f = np.array([0.02, 0.01, -0.01]), np.array([0.04, 0.02, -0.03])
    assert kept == pytest.approx(v.mean() / f.mean())
    draws = np.random.default_rng(5).integers(0, 3, size=(4000, 3))
    keep = f[draws].mean(axis=1) > 0
    assert 0 < keep.sum() < 4000
    ratios = v[draws[keep]].mean(axis=1) / f[draws[keep]].mean(axis=1)
    assert (low, high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
    # Two seeds: no interval (it would be about the two per-seed ratios).
    _, low, high = gain_kept(variant[:2], full[:2], base[:2])
    assert math.isnan(low) and math.isnan(high)


def test_gain_kept_does_not_depend_on_the_metric_direction() -> None:
    variant, full, base = [2.9, 3.0, 2.8], [2.7, 2.8, 2.6], [3.1, 3.1, 3.0]  # losses
    lower = gain_kept(variant, full, base)
    flipped = gain_kept(*([-x for x in values] for values in (variant, full, base)))
    assert lower == pytest.approx(flipped)


def test_gain_kept_without_a_full_gain_and_with_bad_input() -> None:
    kept, low, high = gain_kept([0.8, 0.9], [0.8, 0.9], [0.8, 0.9])
    assert math.isnan(kept) and math.isnan(low) and math.isnan(high)
    kept, low, high = gain_kept([0.81], [0.82], [0.80])
    assert kept == pytest.approx(0.5) and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="equal lengths, got 2, 2 and 3"):
        gain_kept([0.8, 0.9], [0.8, 0.9], [0.8, 0.9, 1.0])
    with pytest.raises(ValueError, match="variant"):
        gain_kept([math.nan], [0.8], [0.8])
