"""The Markdown of the report: per-task tables, verdict lines, protocol and environment."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from rdrop_lab.report._cheaper import cheaper_variant_lines
from rdrop_lab.report._convergence import convergence_lines, converging, step_cost_text
from rdrop_lab.report._grouping import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    N_BOOTSTRAP,
    MethodRuns,
    TaskRuns,
    group_tasks,
    significantly_first_better,
    verdict,
)
from rdrop_lab.report._records import (
    BUDGETS,
    COSTS_LIKE_RDROP,
    Record,
    clock_description,
    config_of,
    finite_or_none,
    gain_that_counts,
    method_of,
)
from rdrop_lab.stats import (
    PairedDifference,
    format_interval,
    format_mean_std,
    format_signed,
    mean_std,
)

_BUDGET_TITLES = {
    "converged": "converged vs converged",
    "equal_epochs": "equal epochs",
    "equal_time": "equal training time",
}
_BUDGET_SHORT = {"converged": "converged", "equal_epochs": "eq. epochs", "equal_time": "eq. time"}


def _budgets(task: TaskRuns) -> list[str]:
    """The budgets a task's tables show: converged and equal epochs for runs trained to
    an early stop (their time budgets are in the time-to-quality table), else equal epochs
    and, where measured, equal time."""
    if converging(task):
        return ["converged", "equal_epochs"]
    return [b for b in ("equal_epochs", "equal_time") if b == "equal_epochs" or task.has_budget(b)]


# The regularizers R-Drop is compared with and combined with: (alone, combined).
_REGULARIZER_PAIRS = (
    ("label_smoothing", "rdrop_label_smoothing"),
    ("mixup", "rdrop_mixup"),
    ("manifold_mixup", "rdrop_manifold_mixup"),
    ("fgm", "rdrop_fgm"),
)


def verdict_line(task: TaskRuns) -> str:
    chosen = task.chosen_rdrop()
    head = f"**Verdict ({task.title})**"
    if chosen is None:
        return f"{head}: no R-Drop runs."
    if task.baseline is None:
        return f"{head}: no baseline runs to compare with."
    group, reason = chosen
    parts = []
    budgets = ["converged", "equal_epochs"] if converging(task) else ["equal_epochs", "equal_time"]
    for budget in budgets:
        if budget == "equal_time" and not task.has_budget(budget):
            parts.append(f"{_BUDGET_TITLES[budget]}: not measured")
            continue
        diff = task.paired(group, budget)
        text = f"{_BUDGET_TITLES[budget]}: {verdict(diff, task.higher_is_better)}"
        if diff is not None:
            digits = _digits(task, task.primary)
            text += (
                f" (Δ {task.primary} {format_signed(diff.mean, digits)}, "
                f"95% t-interval {format_interval(diff.t_low, diff.t_high, digits)}, n={diff.n})"
            )
        parts.append(text)
    return f"{head}, {group.label} ({reason}) vs baseline — " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- tables


def _digits(task: TaskRuns, metric: str) -> int:
    values = [
        abs(v)
        for g in task.groups
        for budget in BUDGETS
        for v in g.values(budget, "test", metric).values()
    ]
    return 2 if values and max(values) >= 10 else 4


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _wtl(diff: PairedDifference, higher_is_better: bool) -> str:
    better, worse = (diff.wins, diff.losses) if higher_is_better else (diff.losses, diff.wins)
    return f"{better}/{diff.ties}/{worse}"


def _mean_std_cell(group: MethodRuns, budget: str, split: str, metric: str, digits: int) -> str:
    mean, std, n = group.stat(budget, split, metric)
    diverged = sum(1 for r in group.records if r.get("diverged"))
    if diverged and n == 0:
        return f"diverged ({diverged} run{'s' if diverged > 1 else ''})"
    if n == 1:  # no spread to report: a single run's std is not 0, it is unknown
        return f"{mean:.{digits}f} (1 run)"
    return format_mean_std(mean, std, digits)


def _main_table(task: TaskRuns) -> str:
    metric, digits = task.primary, _digits(task, task.primary)
    budgets = _budgets(task)
    header = ["method", "seeds"]
    for budget in budgets:
        short = _BUDGET_SHORT[budget]
        header += [
            f"test {metric} ({short})",
            f"Δ vs baseline ({short})",
            "95% t-interval",
            "95% bootstrap",
            "W/T/L",
        ]
    header += [f"val {metric} at selection", "s/step", "× baseline s/step"]
    base = task.baseline
    rows = []
    for group in task.groups:
        row = [group.label, str(len(group.records))]
        for budget in budgets:
            row.append(_mean_std_cell(group, budget, "test", metric, digits))
            diff = task.paired(group, budget)
            if diff is None:
                reference = group is base
                row += ["(reference)" if reference else "—", "", "", ""]
            else:
                row += [
                    format_signed(diff.mean, digits),
                    format_interval(diff.t_low, diff.t_high, digits),
                    format_interval(diff.boot_low, diff.boot_high, digits),
                    _wtl(diff, task.higher_is_better),
                ]
        row.append(_mean_std_cell(group, budgets[0], "validation", metric, digits))
        sps = group.seconds_per_step()
        row.append("—" if math.isnan(sps) else f"{sps:.3f}" if sps < 10 else f"{sps:.1f}")
        if base is None or (group is base and not sps > 0):
            row.append("—")
        elif group is base:
            row.append("1.00×")  # the reference, unmarked even if it spans machines
        else:
            row.append(step_cost_text(group.records, base.records))
        rows.append(row)
    return _table(header, rows)


def _model_lines(info: dict[str, Any]) -> list[str]:
    """Model size, tokenizer and metric signature, for tasks that record them."""
    facts = []
    if "parameters" in info:
        facts.append(f"model: {_format_count(info['parameters'])} trainable parameters")
    if "tokenizer" in info:
        facts.append(f"tokenizer: {info['tokenizer']}")
    if "bleu_signature" in info:
        facts.append(f"sacreBLEU signature: `{info['bleu_signature']}`")
    if not facts:
        return []
    text = "; ".join(facts)
    return ["", text[0].upper() + text[1:] + "."]


def _regime_lines(task: TaskRuns) -> list[str]:
    """Few-shot and semi-supervised facts of a task section (none for other tasks)."""
    lines = []
    if task.shots is not None:
        lines += [
            "",
            f"Few-shot: {task.shots} training examples per class, "
            f"{len(task.data_seeds)} draw(s) of them (data seeds "
            f"{', '.join(map(str, task.data_seeds))}). The validation split "
            f"({_format_count(task.info.get('validation_examples', '?'))} examples) is used for "
            "checkpoint selection only; a real few-shot user would not have it, so these "
            "numbers are optimistic for every method alike.",
        ]
    semi = [r for r in task.records if method_of(r) == "rdrop_semi"]
    if semi:
        pool = sorted({str(r["task"].get("unlabeled_examples", "?")) for r in semi})
        seen = [
            v
            for r in semi
            if (v := finite_or_none((r.get("method_info") or {}).get("unlabeled_seen"))) is not None
        ]
        text = (
            f"Semi-supervised: unlabeled pool of {', '.join(pool)} training examples outside "
            "the labelled set (labels discarded)"
        )
        if seen:
            text += f"; R-Drop semi-supervised used {mean_std(seen)[0]:,.0f} unlabeled "
            text += "examples per run on average (with repeats once the pool is exhausted)"
        lines += ["", text + "."]
    return lines


def _comparisons(task: TaskRuns) -> list[tuple[MethodRuns, MethodRuns]]:
    """(first, second) pairs worth a paired difference besides "vs baseline": R-Drop vs
    each regularizer, each combination vs its parts, each ablation and the
    semi-supervised run vs plain R-Drop at the same alpha."""
    chosen = task.chosen_rdrop()
    rdrop = chosen[0] if chosen is not None else None
    pairs: list[tuple[MethodRuns, MethodRuns]] = []
    for alone, combined in _REGULARIZER_PAIRS:
        singles = [g for g in task.groups if g.method == alone]
        if rdrop is not None:
            pairs += [(rdrop, single) for single in singles]
        for group in (g for g in task.groups if g.method == combined):
            pairs += [(group, single) for single in singles]
            same = task.group("rdrop", group.alpha)
            if same is not None:
                pairs.append((group, same))
    for group in task.groups:
        if (group.method == "rdrop" and group.variant) or group.method == "rdrop_semi":
            same = task.group("rdrop", group.alpha)
            if same is not None:
                pairs.append((group, same))
    return pairs


def _pair_verdict(diff: PairedDifference | None, higher_is_better: bool) -> str:
    if diff is None or diff.n < 2:
        return f"n={0 if diff is None else diff.n}: no interval"
    first_better = significantly_first_better(diff, higher_is_better)
    if first_better is None:
        return "no significant difference"
    return "first better" if first_better else "second better"


def _comparison_table(task: TaskRuns) -> str | None:
    pairs = _comparisons(task)
    if not pairs:
        return None
    metric, digits = task.primary, _digits(task, task.primary)
    budgets = _budgets(task)
    header = ["first", "second"]
    for budget in budgets:
        short = _BUDGET_SHORT[budget]
        header += [f"Δ {metric} ({short})", "95% t-interval", "W/T/L", "verdict"]
    rows = []
    for first, second in pairs:
        row = [first.label, second.label]
        for budget in budgets:
            diff = task.paired(first, budget, reference=second)
            if diff is None:
                row += ["—", "", "", "no common seeds"]
                continue
            row += [
                format_signed(diff.mean, digits),
                format_interval(diff.t_low, diff.t_high, digits),
                _wtl(diff, task.higher_is_better),
                _pair_verdict(diff, task.higher_is_better),
            ]
        rows.append(row)
    return _table(header, rows)


def _secondary_table(task: TaskRuns) -> str | None:
    if len(task.metrics) < 2:
        return None
    budgets = _budgets(task)
    header = ["method"] + [f"test {m} ({_BUDGET_SHORT[b]})" for b in budgets for m in task.metrics]
    rows = [
        [group.label]
        + [
            _mean_std_cell(group, b, "test", m, _digits(task, m))
            for b in budgets
            for m in task.metrics
        ]
        for group in task.groups
    ]
    return _table(header, rows)


def _pair_label(task: TaskRuns, pair: tuple[int, int]) -> str:
    return f"{pair[0]} / {pair[1]}" if task.shows_draws else str(pair[0])


def _per_seed_table(task: TaskRuns, budget: str) -> str:
    metric, digits = task.primary, _digits(task, task.primary)
    header = ["seed / data draw" if task.shows_draws else "seed"] + [g.label for g in task.groups]
    columns = [g.values(budget, "test", metric) for g in task.groups]
    rows = [
        [_pair_label(task, pair)] + [f"{c[pair]:.{digits}f}" if pair in c else "—" for c in columns]
        for pair in task.pairs
    ]
    return _table(header, rows)


def _task_summary_lines(task: TaskRuns) -> list[str]:
    direction = "higher is better" if task.higher_is_better else "lower is better"
    return [
        f"### {task.title}",
        "",
        f"Primary metric: {task.primary} ({direction}); test split: "
        f"{task.info.get('test_split', 'not recorded')}; seeds: "
        f"{', '.join(map(str, task.seeds))}.",
        "",
        _main_table(task),
        "",
        verdict_line(task),
        *(convergence_lines(task, _digits(task, task.primary)) if converging(task) else []),
    ]


def summary_table(records: Sequence[Record]) -> str:
    """The main comparison table of every task, as Markdown (for printing in a terminal).

    Args:
        records: run records, e.g. from :func:`load_records`.

    Returns:
        Per task: a heading, the table (test primary metric mean ± std at equal epochs and at
        equal training time, paired difference vs the baseline with its 95% t- and bootstrap
        intervals and wins/ties/losses, validation metric at selection, seconds per step) and
        the verdict line; for runs trained to convergence also which runs converged and the
        time-to-quality table.
    """
    tasks = group_tasks(records)
    if not tasks:
        return "No finished runs."
    return "\n\n".join("\n".join(_task_summary_lines(task)) for task in tasks)


# --------------------------------------------------------------------------- report text


def _format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{seconds:.1f} s"


def _format_count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def protocol_section(tasks: Sequence[TaskRuns]) -> list[str]:
    rows = []
    for task in tasks:
        info = task.info
        used, available = info.get("train_examples"), info.get("train_available")
        if isinstance(used, int) and isinstance(available, int) and available > 0:
            train = f"{used:,} of {available:,} ({100.0 * used / available:.1f}%)"
        else:
            train = f"{_format_count(used)} of {_format_count(available)}"
        budgets = [
            v
            for r in task.records
            if (v := finite_or_none(r.get("time_budget_seconds"))) is not None
        ]
        budget = f"{mean_std(budgets)[0]:.1f} s" if budgets else "—"
        capped = [r for r in task.records if r.get("time_budget_reached") is False]
        if capped:
            budget += f" (not reached by {len(capped)} run(s): max_time_factor cap)"
        n_seeds = len(task.seeds)
        n_pairs = len(task.pairs)
        fewer = [f"{g.label}: {len(g.records)}" for g in task.groups if len(g.records) < n_pairs]
        seeds = f"{n_seeds}"
        if task.shows_draws:
            seeds += f" × {len(task.data_seeds)} data draws"
        seeds += f" (fewer for {'; '.join(fewer)})" if fewer else ""
        rows.append(
            [
                task.title,
                train,
                _format_count(info.get("validation_examples", "—")),
                _format_count(info.get("test_examples", "—")),
                str(info.get("test_split", "not recorded")),
                seeds,
                budget,
            ]
        )
    return [
        "## Protocol",
        "",
        "- **Model selection** on the validation split only: each run is evaluated on the "
        "validation split during training and the best checkpoint (best validation primary "
        "metric within the budget) is kept. For equal epochs the candidates are the scheduled "
        "evaluations (the same steps for every method).",
        "- **Final numbers** are that checkpoint's scores on a held-out **test split that was "
        "never used for selection** (which split, per task: table below).",
        "- **Seeds**: every method is run with the same seeds (same training subsample and "
        "initialisation per seed); tables give **mean ± std** over seeds (sample std, ddof=1).",
        "- **Paired comparison against the baseline**: per seed, d = method - baseline on the "
        f"test split; reported: mean of d, its {CONFIDENCE:.0%} Student-t interval (df = n - 1), "
        f"its {CONFIDENCE:.0%} percentile-bootstrap interval ({N_BOOTSTRAP} resamples, seed "
        f"{BOOTSTRAP_SEED}) and W/T/L = seeds where the method is better / equal / worse. "
        "With few seeds the bootstrap interval is too narrow; the verdict uses the t-interval.",
        *_budget_protocol(tasks),
        "- **Verdict**: R-Drop at the paper's α for the task if it was run, else the α with the "
        "best mean *validation* metric (never chosen by test); R-Drop or the baseline is "
        "called better only when the 95% t-interval of the paired difference excludes 0.",
        "- **Training sets are subsampled** (column *train used*), so absolute numbers are "
        "below the paper's; the comparison, not the level, is the point.",
        *_extra_protocol(tasks),
        "",
        _table(
            [
                "task",
                "train used",
                "validation",
                "test",
                "test split",
                "seeds",
                "equal-time budget (mean)",
            ],
            rows,
        ),
    ]


def _budget_protocol(tasks: Sequence[TaskRuns]) -> list[str]:
    """Protocol bullets for the training clock and the budgets: the convergence protocol
    for tasks trained to an early stop, equal epochs and equal time for the others."""
    records = [r for t in tasks for r in t.records]
    line = (
        f"- **Training time** (`train_seconds`, every time budget): {clock_description(records)}."
    )
    if any(r.get("clock") == "process_cpu" for r in records):
        line += (
            " At one torch thread the process CPU clock does not depend on what else runs on "
            "the machine; wall-clock seconds are recorded next to it (`train_wall_seconds`)."
        )
    lines = [line]
    precisions = [(t.title, {config_of(r, "precision") for r in t.records}) for t in tasks]
    bf16 = [title for title, used in precisions if used == {"bf16"}]
    mixed = [title for title, used in precisions if len(used) > 1]
    if bf16 or mixed:
        line = "- **Arithmetic**: "
        if bf16:
            line += (
                f"{', '.join(bf16)} trained and scored under CPU autocast to bfloat16 "
                '(`precision = "bf16"`: matrix products in bfloat16; the losses, weights and '
                "optimizer in float32), every method alike. "
            )
        if mixed:
            line += f"{', '.join(mixed)} mix float32 and bfloat16 runs (see each run's config). "
        if any(used == {"fp32"} for _, used in precisions):
            line += "Other tasks in float32."
        lines.append(line.rstrip())
    if any(converging(t) for t in tasks):
        gain = gain_that_counts([r for t in tasks for r in t.records])
        lines.append(
            "- **Trained to convergence** (tasks whose runs set `patience`): each run trains "
            f"until its validation primary metric has not improved{gain} for `patience` "
            "evaluations in a row (once past `min_steps`), or until `max_epochs`. A run counts as "
            "*converged* only if it stopped that way; a run that reached `max_epochs` is "
            "marked not converged. Every checkpoint that is the best so far on validation is "
            "scored on the test split when it is reached (selection never reads it), so the "
            "time-to-quality table gives the test score of the model each method would have "
            "selected within any training-time budget. Budgets: *converged vs converged* "
            "(each method until its own early stop), *equal epochs* (the best scheduled "
            "evaluation within `epochs`), and the time budgets of the time-to-quality table, "
            "among them *equal time* (R-Drop's time for `epochs` epochs)."
        )
    if not all(converging(t) for t in tasks):
        lines.append(
            "- **Two budgets**: *equal epochs* (every method trains for the same number of "
            "epochs) and *equal training time* (the baseline continues training until it has "
            "used the median training time of the R-Drop runs, `time_budget_seconds`, is "
            "evaluated when it reaches it and is selected on validation among the evaluations "
            "up to that point; R-Drop and the doubled batch cost the same per step, so their "
            "equal-time model is their equal-epochs model)."
        )
    return lines


def _extra_protocol(tasks: Sequence[TaskRuns]) -> list[str]:
    """Protocol bullets for the methods, ablations and data regimes present (none for
    reports of baseline, R-Drop and the doubled batch only)."""
    groups = [g for t in tasks for g in t.groups]
    lines = []
    if any(g.method not in COSTS_LIKE_RDROP | {"baseline"} or g.variant for g in groups):
        lines.append(
            "- **Other methods and ablations** at equal training time: only plain R-Drop "
            "(k = 1, m = 2, one dropout rate, no stop-gradient) sets the time budget. Methods "
            "that cost what it costs per step (the doubled batch, R-Drop + label smoothing, "
            "R-Drop + MixUp, R-Drop + Manifold MixUp) use their equal-epochs model; every "
            "other method and ablation is measured against the budget: a cheaper one trains "
            "on until it, a dearer one (FGM, R-Drop + FGM, m = 3, semi-supervised R-Drop) is "
            "selected among the evaluations made before it ran out. *× baseline s/step* is "
            "the measured cost per step."
        )
    if any(t.shows_draws for t in tasks):
        lines.append(
            "- **Data draws**: tasks with several data seeds draw their training set (and "
            "unlabeled pool) once per data seed; runs are paired by (seed, data draw), and "
            "mean ± std and the intervals are over those pairs."
        )
    if any(t.shots is not None for t in tasks):
        lines.append(
            "- **Few-shot**: k training examples per class drawn from the whole training "
            "split with the data seed. The validation split is the task's usual one and is "
            "used for checkpoint selection only; a real few-shot user would not have a "
            "development set this large, so every method's few-shot numbers are optimistic "
            "alike."
        )
    if any(g.method == "rdrop_semi" for g in groups):
        lines.append(
            "- **Semi-supervised**: R-Drop semi-supervised adds, at every step, the "
            "consistency term alone (weighted by α like the labelled one) on an unlabeled "
            "batch of the labelled batch's size, drawn from a pool of training examples "
            "outside the labelled set with their labels discarded; the baseline and R-Drop "
            "rows train on the labelled examples only."
        )
    return lines


def environment_section(records: Sequence[Record]) -> list[str]:
    values: dict[str, list[str]] = {}
    for record in records:
        environment = record.get("environment")
        if not isinstance(environment, dict):
            continue
        for key, value in environment.items():
            text = "—" if value is None else str(value)
            if text not in values.setdefault(key, []):
                values[key].append(text)
    lines = ["## Hardware and environment", ""]
    if values:
        lines.append(_table(["", "value(s)"], [[k, "; ".join(v)] for k, v in values.items()]))
    else:
        lines.append("Not recorded.")
    commands = list(dict.fromkeys(str(r["command"]) for r in records if r.get("command")))
    wall = sum(v for r in records if (v := finite_or_none(r.get("wall_seconds"))) is not None)
    train = sum(v for r in records if (v := finite_or_none(r.get("train_seconds"))) is not None)
    started = [str(r["started_at"]) for r in records if r.get("started_at")]
    finished = [str(r["finished_at"]) for r in records if r.get("finished_at")]
    lines += ["", "## Commands", ""]
    lines += ["```", *commands, "```"] if commands else ["Not recorded."]
    lines += [
        "",
        "## Compute",
        "",
        f"{len(records)} runs; total wall-clock time {_format_duration(wall)} "
        f"(of which training {_format_duration(train)}).",
    ]
    if started and finished:
        lines[-1] += f" First run started {min(started)}, last finished {max(finished)}."
    return lines


def task_section(task: TaskRuns, plots: Sequence[tuple[str, str]]) -> list[str]:
    info = task.info
    direction = "higher is better" if task.higher_is_better else "lower is better"
    lines = [
        f"## {task.title}",
        "",
        f"Primary metric: **{task.primary}** ({direction}); metrics: {', '.join(task.metrics)}. "
        f"Train {_format_count(info.get('train_examples', '?'))} of "
        f"{_format_count(info.get('train_available', '?'))} examples; validation "
        f"{_format_count(info.get('validation_examples', '?'))}; test "
        f"{_format_count(info.get('test_examples', '?'))}; test split: "
        f"{info.get('test_split', 'not recorded')}.",
        *_model_lines(info),
        *_regime_lines(task),
        "",
        verdict_line(task),
        "",
        _main_table(task),
    ]
    if converging(task):
        lines += convergence_lines(task, _digits(task, task.primary))
        lines += cheaper_variant_lines(task, _digits(task, task.primary))
    comparisons = _comparison_table(task)
    if comparisons is not None:
        lines += [
            "",
            f"Method against method (paired test {task.primary} differences, first minus "
            "second; *better* only when the 95% t-interval excludes 0):",
            "",
            comparisons,
        ]
    secondary = _secondary_table(task)
    if secondary is not None:
        lines += ["", "All metrics (test, mean ± std over seeds):", "", secondary]
    for budget in _budgets(task):
        lines += [
            "",
            f"Per-seed test {task.primary} ({_BUDGET_TITLES[budget]}):",
            "",
            _per_seed_table(task, budget),
        ]
    if task.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in task.notes]
    if plots:
        lines += ["", "Plots:", ""]
        for caption, relative in plots:
            lines += [f"![{caption}]({relative})", ""]
        lines.pop()
    return lines
