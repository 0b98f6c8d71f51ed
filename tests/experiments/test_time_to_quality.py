"""Time-to-quality statistics against values computed by hand, and the report built on
them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from rdrop_lab.report import write_report
from rdrop_lab.report._convergence import (
    common_pairs,
    converged_marks,
    paired_at_budget,
    stopped_before_equal_epochs,
    time_budgets,
)
from rdrop_lab.store import ResultStore
from rdrop_lab.time_to_quality import (
    best_so_far,
    crossing_time,
    mean_best_so_far,
    selected_test,
    time_to_best,
)

# (training seconds, validation accuracy, test accuracy of a best-so-far checkpoint)
CURVES: dict[tuple[str, int], list[tuple[float, float, float | None]]] = {
    ("baseline", 0): [(10, 0.60, 0.58), (20, 0.70, 0.66), (30, 0.68, None), (40, 0.69, None)],
    ("baseline", 1): [(10, 0.62, 0.60), (20, 0.66, 0.64), (30, 0.72, 0.70), (40, 0.71, None)],
    ("rdrop", 0): [(20, 0.55, 0.50), (40, 0.72, 0.71), (60, 0.75, 0.74), (80, 0.74, None)],
    ("rdrop", 1): [(20, 0.58, 0.52), (40, 0.70, 0.69), (60, 0.76, 0.75), (80, 0.75, None)],
}


def record(method: str, seed: int) -> dict[str, Any]:
    evals = []
    for seconds, validation, test in CURVES[(method, seed)]:
        entry: dict[str, Any] = {
            "step": int(seconds),  # one second per step
            "epoch": seconds / 10,
            "train_seconds": float(seconds),
            "validation": {"accuracy": validation},
            "scheduled": True,
        }
        if test is not None:
            entry["test"] = {"accuracy": test}
        evals.append(entry)
    best = max(range(len(evals)), key=lambda i: (evals[i]["validation"]["accuracy"], -i))
    selection = {**evals[best], "eval_index": best}
    last = evals[-1]
    alpha = 1.0 if method == "rdrop" else None
    return {
        "schema": 2,
        "run_id": f"toy__{method}__s{seed}",
        "config": {
            "task": "sst2",
            "method": method,
            "alpha": alpha,
            "seed": seed,
            "patience": 2,
            "max_epochs": 10.0,
            "epochs": 4.0,
        },
        "task": {"name": "sst2", "primary_metric": "accuracy", "metrics": ["accuracy"]},
        "evals": evals,
        "train_curve": [],
        "steps": last["step"],
        "epochs_run": last["epoch"],
        "train_seconds": last["train_seconds"],
        "seconds_per_step": 1.0,
        "converged": not (method == "baseline" and seed == 1),
        "stop_reason": "max_epochs" if (method == "baseline" and seed == 1) else "early_stop",
        "selections": {"converged": selection, "equal_epochs": selection, "equal_time": None},
        "environment": {"torch_threads": 1},
        "finished_at": "2026-12-01T00:00:00",
    }


BASE = [record("baseline", 0), record("baseline", 1)]
RDROP = [record("rdrop", 0), record("rdrop", 1)]


def test_best_so_far_and_selection_by_budget() -> None:
    run = BASE[0]
    assert best_so_far(run, 5, "accuracy") is None
    assert best_so_far(run, 35, "accuracy") == 0.70  # 0.68 at 30 s does not improve
    assert selected_test(run, 35, "accuracy") == 0.66
    assert time_to_best(run, "accuracy") == 20
    assert time_to_best(BASE[1], "accuracy") == 30


def test_mean_best_so_far_is_undefined_until_every_run_has_evaluated() -> None:
    curve = mean_best_so_far(RDROP, [10, 20, 40, 60], "accuracy")
    assert curve[0] is None
    assert curve[1] == pytest.approx((0.565, 0.55, 0.58))
    assert curve[2] == pytest.approx((0.71, 0.70, 0.72))
    assert curve[3] == pytest.approx((0.755, 0.75, 0.76))


def test_crossing_time_is_when_the_treatment_stays_ahead() -> None:
    # Baseline mean: 0.61, 0.68, 0.71 from 30 s on; R-Drop: 0.565 at 20 s, 0.71 at 40 s
    # (a tie, not ahead), 0.755 from 60 s: the crossing is at 60 s = 6 baseline epochs.
    crossing = crossing_time(RDROP, BASE, "accuracy", control_seconds_per_epoch=10.0)
    assert crossing.seconds == 60 and crossing.control_epochs == pytest.approx(6.0)
    never = crossing_time(BASE, RDROP, "accuracy")
    assert never.seconds is None and never.control_epochs is None


def test_lower_is_better_metrics_flip_the_comparisons() -> None:
    flipped = [
        {
            **r,
            "evals": [
                {**e, "validation": {"loss": -e["validation"]["accuracy"]}} for e in r["evals"]
            ],
        }
        for r in RDROP
    ]
    assert best_so_far(flipped[0], 100, "loss", higher=False) == -0.75
    assert time_to_best(flipped[1], "loss", higher=False) == 60


def test_budgets_and_paired_differences_by_hand() -> None:
    budgets = time_budgets(RDROP, BASE, "accuracy")
    assert [seconds for _, seconds in budgets] == [25.0, 60.0, 80.0]
    at_25 = paired_at_budget(RDROP, BASE, 25.0, "accuracy")
    # Selected by 25 s: baseline 0.66 and 0.64 (both at 20 s), R-Drop 0.50 and 0.52.
    assert at_25 is not None and at_25.mean == pytest.approx(-0.14) and at_25.n == 2
    at_60 = paired_at_budget(RDROP, BASE, 60.0, "accuracy")
    # Baseline 0.66 and 0.70, R-Drop 0.74 and 0.75: differences 0.08 and 0.05.
    assert at_60 is not None and at_60.mean == pytest.approx(0.065)
    assert at_60.std == pytest.approx(math.sqrt((0.08 - 0.065) ** 2 + (0.05 - 0.065) ** 2))
    assert paired_at_budget(RDROP, BASE, 15.0, "accuracy") is None  # R-Drop has no model yet


def test_report_shows_time_to_quality_and_marks_unconverged_runs(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for r in BASE + RDROP:
        store.write(r)
    text = write_report(tmp_path).read_text()
    assert "Convergence: 3 of 4 runs converged" in text
    assert "**Not converged:** baseline seed 1 (hit max_epochs)" in text
    assert "| baseline's time to its best | 25.00 s |" not in text  # >= 10 s: whole seconds
    assert "| baseline's time to its best | 25 s | -0.1400 |" in text
    assert "| converged vs converged | — | +0.0650 |" in text
    assert "at 60 s (6.0 baseline epochs)" in text
    assert "needed +35 steps and +35 training seconds" in text
    assert (tmp_path / "plots" / "sst2_time_to_quality.png").is_file()


def test_verdict_table_row_by_hand(tmp_path: Path) -> None:
    from rdrop_lab.report import converged_verdict_table

    table = converged_verdict_table(BASE + RDROP)
    row = next(line for line in table.splitlines() if line.startswith("| sst2"))
    assert "| 4 (3) |" in row and "+0.0650 [-0.1256, +0.2556]" in row and "| 2/0/0 |" in row
    assert "60 s (6.0 baseline epochs)" in row and "1.00×" in row


def test_equal_time_budget_is_rdrops_time_for_the_equal_epochs_point() -> None:
    # planned_steps = 40: R-Drop's last evaluations within 40 steps are at 40 s (seed 0)
    # and 40 s (seed 1), so the equal-time budget is 40 s; the baseline's best by 40 s is
    # 0.66 (seed 0, at 20 s) and 0.70 (seed 1, at 30 s), R-Drop's 0.71 and 0.69.
    rdrop = [{**r, "planned_steps": 40} for r in RDROP]
    budgets = dict(time_budgets(rdrop, BASE, "accuracy"))
    assert budgets["equal time: R-Drop's time for 4.0 epochs"] == 40.0
    at = paired_at_budget(rdrop, BASE, 40.0, "accuracy")
    assert at is not None and at.mean == pytest.approx(((0.71 - 0.66) + (0.69 - 0.70)) / 2)


def test_equal_time_budget_leaves_out_runs_that_stopped_before_it() -> None:
    # Seed 0 stopped at step 80 of 100 planned: it never trained the equal-epochs budget.
    rdrop = [{**RDROP[0], "planned_steps": 100}, {**RDROP[1], "planned_steps": 40}]
    budgets = dict(time_budgets(rdrop, BASE, "accuracy"))
    assert budgets["equal time: R-Drop's time for 4.0 epochs"] == 40.0  # seed 1 only
    stopped = [{**r, "planned_steps": 100} for r in RDROP]
    assert not any(
        name.startswith("equal time") for name, _ in time_budgets(stopped, BASE, "accuracy")
    )


def test_time_to_quality_says_when_no_seed_is_shared(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    other = {**RDROP[0], "run_id": "toy__rdrop__s7", "config": {**RDROP[0]["config"], "seed": 7}}
    for r in [*BASE, other]:
        store.write(r)
    assert "vs baseline: no seed in common." in write_report(tmp_path).read_text()


def test_time_to_quality_uses_the_seeds_both_methods_have(tmp_path: Path) -> None:
    # A third R-Drop seed without a baseline must not move R-Drop's budgets or curve.
    extra = {**record("rdrop", 1), "run_id": "toy__rdrop__s2"}
    extra["config"] = {**extra["config"], "seed": 2}
    extra["evals"] = [{**e, "train_seconds": e["train_seconds"] * 10} for e in extra["evals"]]
    extra["seconds_per_step"] = 10.0
    treatment, control = common_pairs([*RDROP, extra], BASE)
    assert [r["config"]["seed"] for r in treatment] == [0, 1] and len(control) == 2
    store = ResultStore(tmp_path)
    for r in [*BASE, *RDROP, extra]:
        store.write(r)
    text = write_report(tmp_path).read_text()
    assert "over the 2 seed(s) both have" in text
    assert "| R-Drop's time to its best | 60 s | +0.0650 |" in text  # not the 600 s seed
    assert "| converged vs converged | — | +0.0650 | [-0.1256, +0.2556] | 2/0/0 | 2 |" in text
    from rdrop_lab.report import converged_verdict_table

    assert "| 1.00× |" in converged_verdict_table([*BASE, *RDROP, extra])  # shared seeds' cost


def test_convergence_marks_read_the_stop_reason() -> None:
    from rdrop_lab.report._grouping import group_tasks

    diverged = {**record("rdrop", 1), "converged": False, "stop_reason": "diverged"}
    unprotocolled = {**record("baseline", 0), "run_id": "toy__baseline__s0__old"}
    unprotocolled["config"] = {**unprotocolled["config"], "patience": None, "seed": 5}
    (task,) = group_tasks([*BASE, RDROP[0], diverged, unprotocolled])
    done, total, missing = converged_marks(task)
    assert (done, total) == (2, 4)  # the record without patience is not counted
    assert "baseline seed 1 (hit max_epochs)" in missing
    assert any(m.endswith("seed 1 (diverged)") for m in missing)


def test_runs_stopped_before_the_equal_epochs_point_are_flagged(tmp_path: Path) -> None:
    short = {**record("baseline", 0), "planned_steps": 50}  # stopped early at step 40
    assert stopped_before_equal_epochs([short, {**RDROP[0], "planned_steps": 80}]) == [short]
    store = ResultStore(tmp_path)
    for r in [short, BASE[1], *RDROP]:
        store.write(r)
    text = write_report(tmp_path).read_text()
    assert "Stopped early before the equal-epochs point" in text
    assert "baseline seed 0 (step 40 of 50)" in text


def test_report_names_the_training_clock(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for r in [*BASE, *RDROP]:
        store.write({**r, "clock": "process_cpu"})
    text = write_report(tmp_path).read_text()
    assert "process CPU time of the training steps, torch threads: 1" in text
    assert "**Trained to convergence**" in text
    assert "wall-clock time of the training steps" not in text


def test_verdict_table_keeps_each_record_set_apart() -> None:
    from rdrop_lab.report import converged_verdict_table

    # The same task in two suites (two results folders): two rows, never one merged row.
    table = converged_verdict_table(BASE + RDROP, BASE + RDROP, sources=["a", "b"])
    rows = [line for line in table.splitlines() if line.startswith("| sst2")]
    assert len(rows) == 2 and all("| 4 (3) |" in row for row in rows)
    assert rows[0].startswith("| sst2 (accuracy) — a |") and "— b |" in rows[1]
    with pytest.raises(ValueError, match="sources names 1 record sets, got 2"):
        converged_verdict_table(BASE + RDROP, BASE + RDROP, sources=["a"])


def test_verdict_table_says_why_a_converging_task_has_no_verdict() -> None:
    from rdrop_lab.report import converged_verdict_table

    other = {**RDROP[0], "run_id": "toy__rdrop__s7", "config": {**RDROP[0]["config"], "seed": 7}}
    for records, reason in [
        ([*BASE, other], "no seed with both a baseline and an R-Drop run"),
        (BASE, "no R-Drop runs"),
        (RDROP, "no baseline runs"),
        ([*BASE, _variant(RDROP[0], 0, 0.0)], "no plain R-Drop runs"),
    ]:
        table = converged_verdict_table(records)
        (row,) = [line for line in table.splitlines() if line.startswith("| sst2")]
        assert f"— ({reason})" in row


def _variant(full: dict[str, Any], seed: int, shift: float) -> dict[str, Any]:
    """A branch_at variant of a full R-Drop record, its converged test score shifted."""
    variant = {**full, "run_id": f"toy__rdrop__branch__s{seed}", "seconds_per_step": 0.5}
    variant["config"] = {**full["config"], "branch_at": "bert.encoder.layer.3"}
    selected = full["selections"]["converged"]
    shifted = {**selected, "test": {"accuracy": selected["test"]["accuracy"] + shift}}
    variant["selections"] = {**full["selections"], "converged": shifted}
    return variant


def _cheaper_table(text: str) -> str:
    return text[text.index("Cheaper variants against full R-Drop") :]


def test_report_gives_the_gain_a_cheaper_variant_keeps(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for seed, full in enumerate(RDROP):
        store.write(_variant(full, seed, -0.03))
    for r in BASE + RDROP:
        store.write(r)
    text = write_report(tmp_path).read_text()
    # Full R-Drop gains 0.08 and 0.05 (mean 0.065); the variant 0.05 and 0.02 (0.035).
    # Full R-Drop's gain on the seeds, with its t-interval: 0.065 ± t(0.975, 1) * 0.015.
    half = 12.7062 * (0.03 / 2**0.5) / 2**0.5
    full = f"+0.0650 [{0.065 - half:+.4f}, {0.065 + half:+.4f}]"
    assert f"| R-Drop α=1.0 | 2 | +0.0650 | {full} | 100% (reference) | 1.00× | 60 s" in text
    kept = 0.035 / 0.065
    table = _cheaper_table(text)
    row = next(line for line in table.splitlines() if line.startswith("| R-Drop α=1.0 branch@"))
    # Two seeds: no bootstrap interval; the full gain's interval holds 0, which is said.
    assert (
        f"| 2 | +0.0350 | {full} | {kept:.0%} (n=2: no interval); full gain not significant |"
        in row
    )
    assert "| 0.50× |" in row


def test_gain_kept_leaves_out_diverged_variant_seeds_and_a_full_rdrop_without_gain(
    tmp_path: Path,
) -> None:
    store = ResultStore(tmp_path)
    diverged = {**_variant(RDROP[1], 1, -0.03), "diverged": True}
    for r in [*BASE, *RDROP, _variant(RDROP[0], 0, -0.03), diverged]:
        store.write(r)
    table = _cheaper_table(write_report(tmp_path).read_text())
    row = next(line for line in table.splitlines() if line.startswith("| R-Drop α=1.0 branch@"))
    assert "| 1 | +0.0500 | +0.0800 | 62% (n=1: no interval) |" in row  # seed 0: 0.05 / 0.08
    # A full R-Drop that ends below the baseline: no share of a gain to keep.
    worse = tmp_path / "worse"
    store = ResultStore(worse)
    for seed, full in enumerate(RDROP):
        selected = full["selections"]["converged"]
        lowered = {**selected, "test": {"accuracy": selected["test"]["accuracy"] - 0.2}}
        store.write({**full, "selections": {**full["selections"], "converged": lowered}})
        store.write(_variant(full, seed, -0.03))
    for r in BASE:
        store.write(r)
    assert "— (full R-Drop did not gain)" in _cheaper_table(write_report(worse).read_text())


def test_every_cell_of_a_cheaper_variant_row_counts_the_same_seeds(tmp_path: Path) -> None:
    # The variant has seeds 0 and 1 but full R-Drop only seed 0, so the row counts seed 0
    # alone: its crossing is seed 0's (40 s), not the two-seed crossing of 60 s.
    store = ResultStore(tmp_path)
    for r in [*BASE, RDROP[0], _variant(RDROP[0], 0, -0.03), _variant(RDROP[1], 1, -0.03)]:
        store.write(r)
    table = _cheaper_table(write_report(tmp_path).read_text())
    row = next(line for line in table.splitlines() if line.startswith("| R-Drop α=1.0 branch@"))
    assert row.startswith("| R-Drop α=1.0 branch@bert.encoder.layer.3 | 1 |")
    assert row.rstrip(" |").endswith("| 40 s (4.0 baseline epochs)")


def test_report_names_the_arithmetic_of_bf16_tasks(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for r in [*BASE, *RDROP]:
        store.write({**r, "config": {**r["config"], "precision": "bf16"}})
    text = write_report(tmp_path).read_text()
    assert "- **Arithmetic**: sst2 trained and scored under CPU autocast to bfloat16" in text
    mixed = tmp_path / "mixed"
    store = ResultStore(mixed)
    for r in [*BASE, RDROP[0], {**RDROP[1], "config": {**RDROP[1]["config"], "precision": "bf16"}}]:
        store.write(r)
    assert "sst2 mix float32 and bfloat16 runs" in write_report(mixed).read_text()
    plain = tmp_path / "plain"
    store = ResultStore(plain)
    for r in [*BASE, *RDROP]:
        store.write(r)
    assert "**Arithmetic**" not in write_report(plain).read_text()


def test_time_figures_from_two_kinds_of_machine_are_marked(tmp_path: Path) -> None:
    from rdrop_lab.report import converged_verdict_table

    def on(r: dict[str, Any], isa: str) -> dict[str, Any]:
        return {**r, "environment": {"torch_threads": 1, "cpu": "AMD EPYC", "cpu_capability": isa}}

    same = converged_verdict_table([on(r, "AVX2") for r in BASE + RDROP])
    assert "mixed machines" not in same
    mixed = [on(r, "AVX2") for r in BASE] + [on(r, "AVX512") for r in RDROP]
    row = next(line for line in converged_verdict_table(mixed).splitlines() if "| sst2" in line)
    assert "60 s (6.0 baseline epochs) (mixed machines)" in row
    assert "1.00× (mixed machines)" in row
    store = ResultStore(tmp_path)
    for r in mixed:
        store.write(r)
    text = write_report(tmp_path).read_text()
    assert (
        "on 2 kinds of machine (AMD EPYC (AVX2); AMD EPYC (AVX512)), whose seconds do not "
        "compare" in text
    )
    # the main table's step-cost ratio and the extra seconds to reach the best, too
    main_row = next(line for line in text.splitlines() if line.startswith("| R-Drop"))
    assert main_row.rstrip(" |").endswith("× (mixed machines)")
    assert "relative to the baseline (mean over seeds) (mixed machines)." in text
    same_store = ResultStore(tmp_path / "same")
    for r in BASE + RDROP:
        same_store.write(on(r, "AVX2"))
    assert "mixed machines" not in write_report(tmp_path / "same").read_text()
    # A record without cpu_capability never passes for a machine that has one.
    old = converged_verdict_table([on(r, "AVX2") for r in BASE] + RDROP)
    assert "(mixed machines)" in old


def test_seconds_from_a_slower_machine_of_the_same_name_are_marked(tmp_path: Path) -> None:
    from rdrop_lab.report import converged_verdict_table

    def timed(r: dict[str, Any], seconds_per_step: float, clock: str = "process_cpu"):
        env = {"torch_threads": 1, "cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512"}
        return {**r, "environment": env, "clock": clock, "seconds_per_step": seconds_per_step}

    # R-Drop seed 1 ran 2.6x slower per step than seed 0 on a machine of the same name.
    slow = [timed(r, 1.0) for r in BASE] + [timed(RDROP[0], 1.0), timed(RDROP[1], 2.6)]
    row = next(line for line in converged_verdict_table(slow).splitlines() if "| sst2" in line)
    assert "(mixed machines)" in row
    store = ResultStore(tmp_path / "slow")
    for r in slow:
        store.write(r)
    text = write_report(tmp_path / "slow").read_text()
    assert (
        "the seconds per step of one configuration differ 2.6× between runs "
        "(sst2 R-Drop α=1.0: 1.00 to 2.60 s), so some ran on a slower machine" in text
    )
    # Seeds of one machine spread less than the limit; wall-clock seconds stretch with load.
    for spread, clock in ((1.3, "process_cpu"), (2.6, "wall")):
        runs = [timed(r, 1.0, clock) for r in BASE] + [
            timed(RDROP[0], 1.0, clock),
            timed(RDROP[1], spread, clock),
        ]
        assert "mixed machines" not in converged_verdict_table(runs)


def test_the_report_says_when_runs_counted_only_gains_above_min_delta(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for r in BASE + RDROP:
        store.write({**r, "config": {**r["config"], "min_delta": 0.01}})
    text = write_report(tmp_path).read_text()
    assert "peaked and did not improve by more than `min_delta` for `patience`" in text
    assert "has not improved by more than `min_delta` for `patience` evaluations" in text
    plain = ResultStore(tmp_path / "plain")
    for r in BASE + RDROP:
        plain.write(r)
    assert "min_delta" not in write_report(tmp_path / "plain").read_text()
