"""The report's converged-regime parts: which runs converged, time-to-quality tables, the
crossing time and the best-so-far plot (from :mod:`rdrop_lab.time_to_quality`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from rdrop_lab.report._grouping import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    N_BOOTSTRAP,
    MethodRuns,
    TaskRuns,
)
from rdrop_lab.report._records import (
    Record,
    clock_description,
    gain_that_counts,
    mixed_machines_mark,
    pair_of,
    seconds_per_step_of,
)
from rdrop_lab.stats import (
    PairedDifference,
    format_interval,
    format_signed,
    paired_difference,
)
from rdrop_lab.time_to_quality import (
    crossing_time,
    curve_times,
    mean_best_so_far,
    selected_eval,
    selected_test,
    time_to_best,
)

__all__ = [
    "verdict_table",
    "common_pairs",
    "converged_marks",
    "converging",
    "convergence_lines",
    "paired_at_budget",
    "plot_best_so_far",
    "stopped_before_equal_epochs",
    "time_budgets",
]


def converging(task: TaskRuns) -> bool:
    """Whether the task's runs followed the convergence protocol (early stopping)."""
    return any(r.get("config", {}).get("patience") is not None for r in task.records)


def _usable(group: MethodRuns, task: TaskRuns) -> list[Record]:
    """The runs with a model to select: not diverged, with a finite validation score."""
    metric, higher = task.primary, task.higher_is_better
    return [
        r
        for r in group.records
        if not r.get("diverged")
        and r.get("evals")
        and selected_eval(r, math.inf, metric, higher) is not None
    ]


def converged_marks(task: TaskRuns) -> tuple[int, int, list[str]]:
    """(converged runs, runs of the convergence protocol, labels of those that did not
    converge, with why: ``max_epochs`` or ``diverged``). Records without ``patience``
    did not follow the protocol and are not counted."""
    done, total, missing = 0, 0, []
    for group in task.groups:
        for record in group.records:
            if record.get("config", {}).get("patience") is None:
                continue
            total += 1
            if record.get("converged"):
                done += 1
                continue
            reason = record.get("stop_reason") or ("diverged" if record.get("diverged") else "")
            reason = {"max_epochs": "hit max_epochs"}.get(reason, reason or "not recorded")
            missing.append(f"{group.label} seed {pair_of(record)[0]} ({reason})")
    return done, total, missing


def common_pairs(
    treatment: Sequence[Record], control: Sequence[Record]
) -> tuple[list[Record], list[Record]]:
    """The runs of both methods restricted to the (seed, data draw) pairs both have, so
    that every time-to-quality figure compares the same seeds."""
    shared = {pair_of(r) for r in treatment} & {pair_of(r) for r in control}
    return (
        [r for r in treatment if pair_of(r) in shared],
        [r for r in control if pair_of(r) in shared],
    )


def stopped_before_equal_epochs(runs: Sequence[Record]) -> list[Record]:
    """The runs that stopped early (patience ran out) before the equal-epochs point, so
    their equal-epochs model is their converged model, chosen from fewer epochs."""
    return [
        r
        for r in runs
        if r.get("stop_reason") == "early_stop"
        and r.get("planned_steps") is not None
        and r.get("steps", 0) < r["planned_steps"]
    ]


def paired_at_budget(
    treatment: Sequence[Record],
    control: Sequence[Record],
    budget: float,
    metric: str,
    higher: bool = True,
) -> PairedDifference | None:
    """Paired test difference (treatment − control) of the models each run would have
    selected on validation within ``budget`` training seconds, over the seeds where both
    had evaluated by then (``None`` when no seed has both)."""
    ours = {pair_of(r): selected_test(r, budget, metric, higher) for r in treatment}
    theirs = {pair_of(r): selected_test(r, budget, metric, higher) for r in control}
    pairs = sorted(p for p in ours if ours[p] is not None and theirs.get(p) is not None)
    if not pairs:
        return None
    return paired_difference(
        [ours[p] for p in pairs],  # type: ignore[misc]
        [theirs[p] for p in pairs],  # type: ignore[misc]
        CONFIDENCE,
        N_BOOTSTRAP,
        BOOTSTRAP_SEED,
    )


def time_budgets(
    treatment: Sequence[Record], control: Sequence[Record], metric: str, higher: bool = True
) -> list[tuple[str, float]]:
    """The budgets of the time-to-quality table: the control's and the treatment's median
    time to their best validation score, the treatment's median time for the
    equal-epochs point (the equal-time budget), and the longest run."""
    control_best = statistics.median(time_to_best(r, metric, higher) for r in control)
    treatment_best = statistics.median(time_to_best(r, metric, higher) for r in treatment)
    longest = max(r["evals"][-1]["train_seconds"] for r in (*treatment, *control))
    budgets = [
        ("baseline's time to its best", control_best),
        ("R-Drop's time to its best", treatment_best),
    ]
    # Only runs that trained their whole equal-epochs budget measure R-Drop's time for it.
    equal_time = [t for r in treatment if (t := _seconds_at_planned(r)) is not None]
    if equal_time:
        epochs = sorted({str(r.get("config", {}).get("epochs", "?")) for r in treatment})
        budgets.append(
            (
                f"equal time: R-Drop's time for {'/'.join(epochs)} epochs",
                statistics.median(equal_time),
            )
        )
    budgets.append(("maximum (longest run)", longest))
    return budgets


def _seconds_at_planned(record: Record) -> float | None:
    """Training seconds at the run's last evaluation within its planned (equal-epochs)
    steps; ``None`` for a run that stopped before them."""
    planned = record.get("planned_steps")
    if planned is None or record.get("steps", 0) < planned:  # stopped before it
        return None
    times = [e["train_seconds"] for e in record["evals"] if e["step"] <= planned]
    return times[-1] if times else None


def _seconds_per_epoch(runs: Sequence[Record]) -> float | None:
    values = [
        r["train_seconds"] / r["epochs_run"] for r in runs if r.get("epochs_run") and r["steps"]
    ]
    return statistics.median(values) if values else None


def _mean_extra(
    treatment: Sequence[Record], control: Sequence[Record], key: str, metric: str, higher: bool
) -> float | None:
    """Mean over seeds of (treatment − control) of ``key`` at the converged choice."""
    ours = {pair_of(r): selected_eval(r, math.inf, metric, higher) for r in treatment}
    theirs = {pair_of(r): selected_eval(r, math.inf, metric, higher) for r in control}
    diffs = [
        ours[p][key] - theirs[p][key]  # type: ignore[index]
        for p in ours
        if ours[p] is not None and theirs.get(p) is not None
    ]
    return statistics.fmean(diffs) if diffs else None


def _interval_cells(diff: PairedDifference | None, digits: int, higher: bool) -> list[str]:
    """Δ, its t-interval and wins/ties/losses of the treatment (a win is *better*)."""
    if diff is None:
        return ["—", "—", "—"]
    wins, losses = (diff.wins, diff.losses) if higher else (diff.losses, diff.wins)
    return [
        format_signed(diff.mean, digits),
        format_interval(diff.t_low, diff.t_high, digits),
        f"{wins}/{diff.ties}/{losses}",
    ]


def _format_seconds(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.2f} s"


def convergence_lines(task: TaskRuns, digits: int) -> list[str]:
    """The task's convergence status, time-to-quality table and crossing time."""
    metric, higher = task.primary, task.higher_is_better
    done, total, missing = converged_marks(task)
    lines = [
        "",
        f"Convergence: {done} of {total} runs converged (validation {metric} peaked and "
        f"did not improve{gain_that_counts(task.records)} for `patience` evaluations "
        "before the run ended)."
        + (f" **Not converged:** {', '.join(missing)}." if missing else ""),
    ]
    early = [
        f"{g.label} seed {pair_of(r)[0]} (step {r['steps']} of {r['planned_steps']})"
        for g in task.groups
        for r in stopped_before_equal_epochs(g.records)
    ]
    if early:
        lines += [
            "",
            "Stopped early before the equal-epochs point, so their equal-epochs model is "
            f"their converged model, chosen from fewer epochs: {', '.join(early)}.",
        ]
    base = task.baseline
    base_runs = [] if base is None else _usable(base, task)
    if not base_runs:
        return lines
    for group in task.groups:
        runs = _usable(group, task) if group.method.startswith("rdrop") else []
        if not runs:
            continue
        treatment, control = common_pairs(runs, base_runs)
        if not treatment:
            lines += ["", f"Time to quality, {group.label} vs baseline: no seed in common."]
            continue
        header = [
            "budget",
            "training s",
            f"Δ test {metric} ({group.label} − baseline)",
            "95% t-interval",
            "W/T/L",
            "n",
        ]
        rows = []
        budgets = [
            *time_budgets(treatment, control, metric, higher),
            ("converged vs converged", math.inf),
        ]
        for name, seconds in budgets:
            diff = paired_at_budget(treatment, control, seconds, metric, higher)
            rows.append(
                [
                    name,
                    "—" if math.isinf(seconds) else _format_seconds(seconds),
                    *_interval_cells(diff, digits, higher),
                    str(diff.n if diff is not None else 0),
                ]
            )
        crossing = crossing_text(task, treatment, control)
        crossed = (
            "never (its best-so-far validation curve is not ahead at the end)"
            if crossing is None
            else f"at {crossing}"
        )
        extra_steps = _mean_extra(treatment, control, "step", metric, higher)
        extra_seconds = _mean_extra(treatment, control, "train_seconds", metric, higher)
        lines += [
            "",
            f"Time to quality, {group.label} vs baseline over the {len(control)} seed(s) "
            "both have (test scores of the models each method would have selected on "
            "validation within the budget; training seconds: "
            f"{clock_description([*treatment, *control])}):",
            "",
            _table(header, rows),
            "",
            f"- Crossing time (mean best-so-far validation {metric} of {group.label} ahead "
            f"of the baseline's for good): {crossed}.",
        ]
        if extra_steps is not None and extra_seconds is not None:
            lines.append(
                f"- To reach its best, {group.label} needed {extra_steps:+.0f} steps and "
                f"{extra_seconds:+,.0f} training seconds relative to the baseline (mean over "
                f"seeds){mixed_machines_mark([*treatment, *control])}."
            )
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_best_so_far(task: TaskRuns, colors: dict[str, str], path: Path) -> bool:
    """Best-so-far validation against training seconds: the mean over seeds of each
    method, with the range of its seeds as a band, over the seeds every plotted method
    has (each method's own seeds when they share none)."""
    from rdrop_lab.report._plots import _new_figure, _save

    metric, higher = task.primary, task.higher_is_better
    figure = _new_figure()
    axes = figure.add_subplot()
    drawn = False
    usable = {group.label: _usable(group, task) for group in task.groups}
    pair_sets = [{pair_of(r) for r in runs} for runs in usable.values() if runs]
    shared = set.intersection(*pair_sets) if pair_sets else set()
    for group in task.groups:
        runs = [r for r in usable[group.label] if not shared or pair_of(r) in shared]
        if not runs:
            continue
        times = curve_times(runs)
        points = [(t, v) for t, v in zip(times, mean_best_so_far(runs, times, metric, higher)) if v]
        if not points:
            continue
        xs = [t for t, _ in points]
        color = colors[group.label]
        label = f"{group.label} (n={len(runs)})"
        axes.step(xs, [v[0] for _, v in points], where="post", color=color, label=label)
        axes.fill_between(
            xs,
            [v[1] for _, v in points],
            [v[2] for _, v in points],
            step="post",
            color=color,
            alpha=0.15,
        )
        drawn = True
    if not drawn:
        return False
    axes.set_xlabel(f"training seconds ({clock_description(task.records)})")
    axes.set_ylabel(f"best-so-far validation {metric}")
    axes.set_title(f"{task.title}: time to quality (mean over seeds, band: range)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)
    return True


def _verdict_row(task: TaskRuns, digits: int) -> list[str]:
    """A converging task's verdict row, or a row saying why it has no verdict."""
    done, total, _ = converged_marks(task)
    title = f"{task.title} ({task.primary})" + (f" — {task.source}" if task.source else "")
    chosen, base = task.chosen_rdrop(), task.baseline
    any_rdrop = any(g.method == "rdrop" for g in task.groups)
    missing = (
        "no baseline runs"
        if base is None
        else "no plain R-Drop runs"
        if any_rdrop
        else "no R-Drop runs"
    )
    if chosen is not None and base is not None:
        group, reason = chosen
        treatment, control = common_pairs(_usable(group, task), _usable(base, task))
        if treatment:
            return [
                title,
                f"{total} ({done})",
                f"{group.label} ({reason})",
                *_verdict_cells(task, treatment, control, digits),
                step_cost_text(treatment, control),
            ]
        missing = "no seed with both a baseline and an R-Drop run"
    return [title, f"{total} ({done})", "—", f"— ({missing})", "", "", ""]


def _verdict_cells(
    task: TaskRuns, treatment: list[Record], control: list[Record], digits: int
) -> list[str]:
    """The converged Δ with its interval, W/T/L and the crossing time."""
    diff = paired_at_budget(treatment, control, math.inf, task.primary, task.higher_is_better)
    delta, interval, wtl = _interval_cells(diff, digits, task.higher_is_better)
    return [f"{delta} {interval}", wtl, crossing_text(task, treatment, control) or "never"]


def step_cost_text(treatment: Sequence[Record], control: Sequence[Record]) -> str:
    """The treatment's mean seconds per step over the control's, over the seeds both
    have (:func:`common_pairs`), e.g. ``"1.85×"``, marked ``"(mixed machines)"`` when
    their seconds come from more than one kind of machine; ``"—"`` without timings."""
    treatment, control = common_pairs(treatment, control)
    means = []
    for runs in (treatment, control):
        values = [v for r in runs if (v := seconds_per_step_of(r)) is not None]
        means.append(sum(values) / len(values) if values else math.nan)
    cost = means[0] / means[1] if means[1] > 0 else math.nan
    if math.isnan(cost):
        return "—"
    return f"{cost:.2f}×" + mixed_machines_mark([*treatment, *control])


def crossing_text(task: TaskRuns, treatment: list[Record], control: list[Record]) -> str | None:
    """When the treatment's mean best-so-far validation curve passes the baseline's for
    good, e.g. ``"60 s (6.0 baseline epochs)"``, marked ``"(mixed machines)"`` as the
    step cost is; ``None``: never."""
    metric, higher = task.primary, task.higher_is_better
    crossing = crossing_time(treatment, control, metric, higher, _seconds_per_epoch(control))
    if crossing.seconds is None:
        return None
    text = _format_seconds(crossing.seconds)
    if crossing.control_epochs is not None:
        text += f" ({crossing.control_epochs:.1f} baseline epochs)"
    return text + mixed_machines_mark([*treatment, *control])


def verdict_table(tasks: Sequence[TaskRuns], digits: int = 4) -> str:
    """One row per converging task: the chosen R-Drop row against the baseline, converged
    vs converged (Δ of the test metric with its 95% t-interval), the crossing time and the
    cost of an R-Drop step in baseline steps."""
    header = [
        "task",
        "runs (converged)",
        "R-Drop row",
        "converged Δ test [95% t-interval]",
        "W/T/L",
        "crossing time",
        "step cost",
    ]
    rows = [_verdict_row(task, digits) for task in tasks if converging(task)]
    return _table(header, rows) if rows else "No runs trained to convergence."
