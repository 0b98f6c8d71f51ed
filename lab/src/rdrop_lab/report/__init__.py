"""Turn finished run records into ``REPORT.md`` and plots.

Reads ``<results_dir>/runs/*.json`` (one record per finished run, written by the runner),
aggregates them per task and method (mean ± std over seeds, paired differences against the
baseline at two budgets) and writes ``REPORT.md`` plus PNG plots in ``plots/``.

A table is one task (and, for few-shot runs, one number of shots per class); a row is one
method with its alpha and its non-default options (an ablation such as ``k=5`` is its own
row, never merged with plain R-Drop); runs are paired by (seed, data seed). Records
written before a config field existed are read with that field's default.

matplotlib is imported only inside the plotting functions (``import rdrop`` and
``import rdrop_lab.report`` never import it).

Modules: ``_records`` (reading records), ``_grouping`` (tables, paired differences,
verdict), ``_markdown`` (the text) and ``_plots`` (the PNGs).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "runs").mkdir()
    ...     load_records(tmp)
    []
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rdrop_lab.report._convergence import verdict_table
from rdrop_lab.report._grouping import (
    VERDICT_BASELINE_BETTER,
    VERDICT_NO_DIFFERENCE,
    VERDICT_RDROP_BETTER,
    group_tasks,
    verdict,
)
from rdrop_lab.report._markdown import (
    environment_section,
    protocol_section,
    summary_table,
    task_section,
    verdict_line,
)
from rdrop_lab.report._plots import color_map, task_plots
from rdrop_lab.report._records import BUDGETS, ReportWarning, load_records, method_label

__all__ = [
    "BUDGETS",
    "converged_verdict_table",
    "ReportWarning",
    "VERDICT_BASELINE_BETTER",
    "VERDICT_NO_DIFFERENCE",
    "VERDICT_RDROP_BETTER",
    "load_records",
    "method_label",
    "summary_table",
    "verdict",
    "write_report",
]


def converged_verdict_table(
    records: list[dict], *more: list[dict], sources: Sequence[str] | None = None
) -> str:
    """The verdict table of the runs trained to convergence (Markdown): per task,
    converged Δ with its 95% t-interval, the crossing time and the step cost.

    Args:
        records: run records, e.g. one results folder's (:func:`load_records`).
        *more: further record sets (other folders); each gives its own rows, so runs of
            one task from different suites are never paired with each other.
        sources: a name per record set (e.g. its folder), added to its rows' task cell.

    Returns:
        The Markdown table.
    """
    sets = (records, *more)
    if sources is not None and len(sources) != len(sets):
        raise ValueError(f"sources names {len(sources)} record sets, got {len(sets)}")
    tasks = []
    for index, record_set in enumerate(sets):
        for task in group_tasks(record_set):
            if sources is not None:
                task.source = sources[index]
            tasks.append(task)
    return verdict_table(tasks)


def write_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``REPORT.md`` and ``plots/*.png`` for the finished runs in ``results_dir``.

    Args:
        results_dir: folder holding ``runs/*.json`` (see :func:`load_records`).
        out_dir: the folder to write ``REPORT.md`` to (default ``results_dir``), or a file
            name ending in ``.md`` for the report itself. Plots go to ``plots/`` beside the
            report and are linked from it with relative paths.

    Returns:
        The path of the written ``REPORT.md``.

    Raises:
        FileNotFoundError: if ``results_dir/runs`` does not exist.
    """
    results_dir = Path(results_dir)
    out_dir = results_dir if out_dir is None else Path(out_dir)
    report = out_dir / "REPORT.md"
    if out_dir.suffix.lower() == ".md":  # a file name: the report itself, plots beside it
        report, out_dir = out_dir, out_dir.parent
    records = load_records(results_dir)
    tasks = group_tasks(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = out_dir / "plots"
    colors = color_map(records)

    lines = ["# R-Drop experiment report", ""]
    if not tasks:
        lines += [f"No finished runs in `{results_dir / 'runs'}`."]
    else:
        lines += ["## Summary", ""]
        lines += [f"- {verdict_line(task)}" for task in tasks]
        lines += [""]
        lines += protocol_section(tasks)
        lines += [""]
        lines += environment_section(records)
        for task in tasks:
            lines += [""]
            lines += task_section(task, task_plots(task, colors, plots_dir))
    temporary = report.with_name(report.name + ".tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(report)
    return report
