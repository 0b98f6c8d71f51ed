"""The report's PNG plots: learning curves per method, probe KL and α-sensitivity.

matplotlib is imported only inside these functions (``import rdrop_lab.report``
never imports it), and the Agg canvas is used directly, so no global backend is switched and
no display is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdrop_lab.report._convergence import converging, plot_best_so_far
from rdrop_lab.report._grouping import TaskRuns
from rdrop_lab.report._records import (
    Record,
    alpha_of,
    finite_or_none,
    format_alpha,
    method_label,
    method_of,
    order_key,
    variant_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def color_map(records: Sequence[Record]) -> dict[str, str]:
    """Method label -> colour, the same in every plot of the report."""
    keys = sorted(
        {(method_of(r), alpha_of(r), variant_of(r)) for r in records}, key=lambda k: order_key(*k)
    )
    palette = [
        "tab:blue",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
        "tab:cyan",
    ]
    fixed = {"baseline": "black", "doubled_batch": "tab:orange"}
    colors, index = {}, 0
    for method, alpha, variant in keys:
        label = method_label(method, alpha, variant)
        if method in fixed and not variant:
            colors[label] = fixed[method]
        else:
            colors[label] = palette[index % len(palette)]
            index += 1
    return colors


def _new_figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=100)
    figure.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.91)  # no layout engine
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


Curve = tuple[list[float], list[float]]


def _plot_curves(
    axes: Axes, curves: Sequence[Curve], color: str, label: str, log_y: bool = False
) -> bool:
    """Each seed faint, the mean over seeds (by evaluation index) bold. False if no data."""
    curves = [c for c in curves if c[0]]
    if not curves:
        return False
    for xs, ys in curves:
        axes.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
    length = min(len(xs) for xs, _ in curves)
    mean_x = [sum(c[0][i] for c in curves) / len(curves) for i in range(length)]
    mean_y = [sum(c[1][i] for c in curves) / len(curves) for i in range(length)]
    axes.plot(mean_x, mean_y, color=color, linewidth=2.0, label=f"{label} (n={len(curves)})")
    if log_y and all(y > 0 for _, ys in curves for y in ys):
        axes.set_yscale("log")
    return True


def _eval_curve(record: Record, x_key: str, y: Callable[[dict[str, Any]], Any]) -> Curve:
    xs, ys = [], []
    for point in record.get("evals") or []:
        if not isinstance(point, dict):
            continue
        x_value = finite_or_none(point.get(x_key))
        y_value = finite_or_none(y(point))
        if x_value is not None and y_value is not None:
            xs.append(x_value)
            ys.append(y_value)
    return xs, ys


def _loss_curve(record: Record) -> Curve:
    xs, ys = [], []
    for point in record.get("train_curve") or []:
        if isinstance(point, dict):
            x_value, y_value = finite_or_none(point.get("step")), finite_or_none(point.get("loss"))
            if x_value is not None and y_value is not None:
                xs.append(x_value)
                ys.append(y_value)
    if xs:
        return xs, ys
    return _eval_curve(record, "step", lambda p: p.get("train_loss"))


def _curve_plot(
    task: TaskRuns,
    colors: dict[str, str],
    path: Path,
    curve: Callable[[Record], Curve],
    xlabel: str,
    ylabel: str,
    title: str,
    log_y: bool = False,
    vline: tuple[float, str] | None = None,
) -> bool:
    figure = _new_figure()
    axes = figure.add_subplot()
    drawn = False
    for group in task.groups:
        curves = [curve(r) for r in group.records]
        drawn |= _plot_curves(axes, curves, colors[group.label], group.label, log_y)
    if not drawn:
        return False
    if vline is not None:
        axes.axvline(vline[0], color="gray", linestyle=":", linewidth=1.2, label=vline[1])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)
    return True


def _alpha_plot(task: TaskRuns, colors: dict[str, str], path: Path) -> bool:
    groups = [g for g in task.groups if g.is_plain_rdrop and g.alpha is not None and g.alpha > 0]
    if len(groups) < 2:
        return False
    figure = _new_figure()
    axes = figure.add_subplot()
    alphas = [float(g.alpha or 0.0) for g in groups]
    series = (("validation", "o-", "tab:blue"), ("test", "s--", "tab:red"))
    for split, style, color in series:
        stats = [g.stat("equal_epochs", split, task.primary) for g in groups]
        axes.errorbar(
            alphas,
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            fmt=style,
            color=color,
            capsize=3,
            label=f"R-Drop, {split}",
        )
        base = task.baseline
        if base is not None:
            mean, _, n = base.stat("equal_epochs", split, task.primary)
            if n:
                axes.axhline(
                    mean, color=color, linestyle=":", linewidth=1.2, label=f"baseline, {split}"
                )
    paper = task.paper_alpha()
    if paper is not None and paper > 0:
        axes.axvline(paper, color="gray", linestyle="-.", linewidth=1.0, label="paper α")
    axes.set_xscale("log")
    axes.set_xticks(alphas, [format_alpha(a) for a in alphas])
    axes.minorticks_off()
    axes.set_xlabel("α (log scale)")
    axes.set_ylabel(f"{task.primary} (mean ± std over seeds)")
    axes.set_title(f"{task.title}: α-sensitivity (equal epochs)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)
    return True


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def task_plots(task: TaskRuns, colors: dict[str, str], plots_dir: Path) -> list[tuple[str, str]]:
    """Write the task's PNGs; return (caption, path relative to the report) pairs."""
    primary = task.primary
    budgets = [
        v for r in task.records if (v := finite_or_none(r.get("time_budget_seconds"))) is not None
    ]
    vline = (sum(budgets) / len(budgets), "equal-time budget") if budgets else None
    stem = _safe_name(task.stem)
    specs: list[tuple[str, str, Callable[[Path], bool]]] = [
        (
            f"{task.title}: validation {primary} vs step",
            f"{stem}_validation_vs_step.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                lambda r: _eval_curve(
                    r, "step", lambda e: (e.get("validation") or {}).get(primary)
                ),
                "training step",
                f"validation {primary}",
                f"{task.title}: validation {primary} vs step",
            ),
        ),
        (
            f"{task.title}: validation {primary} vs training time",
            f"{stem}_validation_vs_time.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                lambda r: _eval_curve(
                    r, "train_seconds", lambda e: (e.get("validation") or {}).get(primary)
                ),
                "training time (s)",
                f"validation {primary}",
                f"{task.title}: validation {primary} vs training time",
                vline=vline,
            ),
        ),
        (
            f"{task.title}: training loss vs step",
            f"{stem}_train_loss.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                _loss_curve,
                "training step",
                "training loss (R-Drop: incl. consistency)",
                f"{task.title}: training loss",
            ),
        ),
        (
            f"{task.title}: dropout consistency (probe KL) vs step",
            f"{stem}_probe_kl.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                lambda r: _eval_curve(r, "step", lambda e: e.get("probe_kl")),
                "training step",
                "probe KL (two dropout passes)",
                f"{task.title}: consistency of two dropout passes",
                log_y=True,
            ),
        ),
        (
            f"{task.title}: time to quality (best-so-far validation {primary})",
            f"{stem}_time_to_quality.png",
            lambda p: converging(task) and plot_best_so_far(task, colors, p),
        ),
        (
            f"{task.title}: α-sensitivity",
            f"{stem}_alpha_sensitivity.png",
            lambda p: _alpha_plot(task, colors, p),
        ),
    ]
    written = []
    for caption, filename, draw in specs:
        if draw(plots_dir / filename):
            written.append((caption, f"{plots_dir.name}/{filename}"))
    return written
