"""rdrop_lab.report on small synthetic run records."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rdrop_lab.report import (
    VERDICT_BASELINE_BETTER,
    VERDICT_NO_DIFFERENCE,
    VERDICT_RDROP_BETTER,
    ReportWarning,
    load_records,
    method_label,
    summary_table,
    verdict,
    write_report,
)
from rdrop_lab.stats import paired_difference

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SST2 = {
    "name": "sst2",
    "display_name": "SST-2",
    "primary_metric": "accuracy",
    "metrics": ["accuracy"],
    "higher_is_better": True,
    "train_examples": 500,
    "train_available": 67349,
    "validation_examples": 400,
    "test_examples": 1821,
    "test_split": "test_labeled.tsv (labelled test)",
}
MRPC = {
    "name": "mrpc",
    "display_name": "MRPC",
    "primary_metric": "f1",
    "metrics": ["f1", "accuracy"],
    "higher_is_better": True,
    "train_examples": 300,
    "train_available": 3668,
    "validation_examples": 200,
    "test_examples": 204,
    "test_split": "half of dev.tsv carved off (fixed seed)",
}
PPL = {
    "name": "lm",
    "display_name": "LM",
    "primary_metric": "perplexity",
    "metrics": ["perplexity"],
    "higher_is_better": False,
    "train_examples": 100,
    "train_available": 1000,
    "validation_examples": 50,
    "test_examples": 50,
    "test_split": "test.txt",
}


def make_record(
    task: dict[str, Any],
    method: str,
    alpha: float | None,
    seed: int,
    test: float | dict[str, float],
    val: float,
    *,
    test_time: float | None = None,
    seconds_per_step: float = 0.1,
    paper_alpha: float | None = 1.0,
    steps: int = 40,
) -> dict[str, Any]:
    tests = test if isinstance(test, dict) else {m: test for m in task["metrics"]}
    vals = {m: val for m in task["metrics"]}
    evals = [
        {
            "step": 10 * (i + 1),
            "epoch": 0.5 * (i + 1),
            "train_seconds": seconds_per_step * 10 * (i + 1),
            "train_loss": 1.0 / (i + 1),
            "consistency_loss": None if method != "rdrop" else 0.1 / (i + 1),
            "probe_kl": 0.01 * (i + 1) if method != "rdrop" else 0.01,
            "validation": {m: val - 0.01 * (3 - i) for m in task["metrics"]},
        }
        for i in range(4)
    ]
    selection = {
        "eval_index": 3,
        "step": steps,
        "epoch": 2.0,
        "train_seconds": seconds_per_step * steps,
        "validation": vals,
        "test": tests,
    }
    equal_time = None
    if test_time is not None:
        equal_time = dict(selection, test={m: test_time for m in task["metrics"]})
    elif method == "rdrop":
        equal_time = selection
    run_id = f"{task['name']}__{method}{'' if alpha is None else f'-a{alpha:g}'}__s{seed}"
    return {
        "schema": 1,
        "run_id": run_id,
        "command": f"rdrop run --task {task['name']} --method {method}",
        "config": {
            "task": task["name"],
            "method": method,
            "alpha": alpha,
            "paper_alpha": paper_alpha,
            "seed": seed,
            "epochs": 2.0,
            "train_size": task["train_examples"],
            "batch_size": 16,
            "lr": 5e-5,
        },
        "task": dict(task),
        "evals": evals,
        "train_curve": [
            {"step": s, "train_seconds": 0.1 * s, "loss": 2.0 / s, "task_loss": 2.0 / s}
            for s in range(1, steps + 1)
        ],
        "steps": steps,
        "epochs_run": 2.0,
        "train_seconds": seconds_per_step * steps,
        "wall_seconds": 10.0,
        "seconds_per_step": seconds_per_step,
        "time_budget_seconds": 7.6 if method == "baseline" else None,
        "selections": {"equal_epochs": selection, "equal_time": equal_time},
        "environment": {
            "rdrop": "0.1.0",
            "torch": "2.4.0",
            "transformers": None,
            "python": "3.11.9",
            "platform": "Linux-x86_64",
            "cpu": "Test CPU",
            "cpu_count": 4,
            "torch_threads": 4,
        },
        "started_at": f"2024-01-01T00:00:0{seed}",
        "finished_at": f"2024-01-01T00:10:0{seed}",
    }


def sst2_records(paper_alpha: float | None = 1.0) -> list[dict[str, Any]]:
    """Baseline and R-Drop at alphas 0.5 / 1.0 / 2.0 plus the doubled batch, seeds 0-2.

    Test accuracy (equal epochs) and paired differences vs the baseline:
      baseline        0.80 0.82 0.81
      R-Drop a=1.0    0.81 0.84 0.84  -> d = .01 .02 .03: 0.02 ± 0.024841 -> [-0.0048, +0.0448]
      R-Drop a=0.5    0.85 0.87 0.86  -> d = .05 .05 .05 (best validation)
      R-Drop a=2.0    0.90 0.92 0.91  -> best test, worst validation: never chosen
    Equal time: baseline 0.81 0.83 0.82; R-Drop a=1.0 vs it: d = 0 .01 .02 -> 0.01 ± 0.024841.
    """
    out = []
    table = {
        ("baseline", None): ([0.80, 0.82, 0.81], 0.70, [0.81, 0.83, 0.82], 0.1),
        ("doubled_batch", None): ([0.80, 0.81, 0.82], 0.71, None, 0.18),
        ("rdrop", 0.5): ([0.85, 0.87, 0.86], 0.79, None, 0.19),
        ("rdrop", 1.0): ([0.81, 0.84, 0.84], 0.75, None, 0.19),
        ("rdrop", 2.0): ([0.90, 0.92, 0.91], 0.60, None, 0.19),
    }
    for (method, alpha), (tests, val, tests_time, sps) in table.items():
        for seed in range(3):
            out.append(
                make_record(
                    SST2,
                    method,
                    alpha,
                    seed,
                    tests[seed],
                    val + 0.001 * seed,
                    test_time=None if tests_time is None else tests_time[seed],
                    seconds_per_step=sps,
                    paper_alpha=paper_alpha,
                )
            )
    return out


def write_records(root: Path, records: list[dict[str, Any]]) -> Path:
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for record in records:
        (runs / f"{record['run_id']}.json").write_text(json.dumps(record))
    return root


def table_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


# ----------------------------------------------------------------------------- tests


def test_step_cost_column_compares_only_the_seeds_both_methods_have() -> None:
    # R-Drop ran seed 0 only; the baseline's seed 1 ran on a machine three times slower.
    records = [
        make_record(SST2, "baseline", None, 0, 0.80, 0.70, seconds_per_step=0.1),
        make_record(SST2, "baseline", None, 1, 0.82, 0.71, seconds_per_step=0.3),
        make_record(SST2, "rdrop", 1.0, 0, 0.81, 0.75, seconds_per_step=0.19),
    ]
    text = summary_table(records)
    header = table_row(text, "method")
    rdrop = dict(zip(header, table_row(text, "R-Drop α=1.0")))
    baseline = dict(zip(header, table_row(text, "baseline")))
    assert baseline["s/step"] == "0.200"  # the baseline's own mean keeps both seeds
    assert rdrop["× baseline s/step"] == "1.90×"  # 0.19 / 0.1 (seed 0), not 0.19 / 0.2


def test_method_labels() -> None:
    assert method_label("baseline", None) == "baseline"
    assert method_label("doubled_batch", None) == "doubled batch (no KL)"
    assert method_label("rdrop", 1.0) == "R-Drop α=1.0"
    assert method_label("rdrop", 0.05) == "R-Drop α=0.05"
    assert method_label("every_k", 2.0) == "every k α=2.0"


def test_summary_table_numbers() -> None:
    text = summary_table(sst2_records())
    header = table_row(text, "method")
    row = table_row(text, "R-Drop α=1.0")
    cells = dict(zip(header, row))
    assert cells["seeds"] == "3"
    # mean of 0.81, 0.84, 0.84 = 0.83, sample std 0.017321
    assert cells["test accuracy (eq. epochs)"] == "0.8300 ± 0.0173"
    assert cells["Δ vs baseline (eq. epochs)"] == "+0.0200"
    assert row[header.index("Δ vs baseline (eq. epochs)") + 1] == "[-0.0048, +0.0448]"
    assert row[header.index("Δ vs baseline (eq. epochs)") + 3] == "3/0/0"
    # equal time: d = 0, .01, .02 -> 0.01 ± 0.024841; one tie
    assert cells["Δ vs baseline (eq. time)"] == "+0.0100"
    assert row[header.index("Δ vs baseline (eq. time)") + 1] == "[-0.0148, +0.0348]"
    assert row[header.index("Δ vs baseline (eq. time)") + 3] == "2/1/0"
    assert cells["val accuracy at selection"] == "0.7510 ± 0.0010"
    assert cells["s/step"] == "0.190"
    assert cells["× baseline s/step"] == "1.90×"
    base = dict(zip(header, table_row(text, "baseline")))
    assert base["test accuracy (eq. time)"] == "0.8200 ± 0.0100"
    assert base["Δ vs baseline (eq. epochs)"] == "(reference)"
    assert base["× baseline s/step"] == "1.00×"
    # bootstrap of constant differences collapses to the value
    alpha_half = table_row(text, "R-Drop α=0.5")
    assert alpha_half[header.index("Δ vs baseline (eq. epochs)") + 2] == "[+0.0500, +0.0500]"
    # rows in order: baseline, doubled batch, R-Drop by alpha
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert labels[1:] == [
        "baseline",
        "doubled batch (no KL)",
        "R-Drop α=0.5",
        "R-Drop α=1.0",
        "R-Drop α=2.0",
    ]


def test_verdict_uses_paper_alpha() -> None:
    text = summary_table(sst2_records(paper_alpha=1.0))
    line = next(line for line in text.splitlines() if line.startswith("**Verdict"))
    assert "R-Drop α=1.0 (the paper's α)" in line
    assert f"equal epochs: {VERDICT_NO_DIFFERENCE}" in line
    assert f"equal training time: {VERDICT_NO_DIFFERENCE}" in line


def test_verdict_without_paper_alpha_chooses_by_validation_not_test() -> None:
    text = summary_table(sst2_records(paper_alpha=None))
    line = next(line for line in text.splitlines() if line.startswith("**Verdict"))
    # alpha 0.5 has the best validation; alpha 2.0 the best test and must not be chosen
    assert "R-Drop α=0.5 (best mean validation accuracy)" in line
    assert f"equal epochs: {VERDICT_RDROP_BETTER}" in line
    assert "Δ accuracy +0.0500" in line


def test_verdict_direction_and_small_n() -> None:
    better = paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.81])
    assert verdict(better, higher_is_better=True) == VERDICT_RDROP_BETTER
    assert verdict(better, higher_is_better=False) == VERDICT_BASELINE_BETTER
    worse = paired_difference([0.8, 0.8, 0.81], [0.9, 0.91, 0.92])
    assert verdict(worse, higher_is_better=True) == VERDICT_BASELINE_BETTER
    assert verdict(worse, higher_is_better=False) == VERDICT_RDROP_BETTER
    unclear = paired_difference([0.9, 0.8, 0.85], [0.85, 0.85, 0.85])
    assert verdict(unclear) == VERDICT_NO_DIFFERENCE
    assert verdict(paired_difference([0.9], [0.8])).startswith(VERDICT_NO_DIFFERENCE)
    assert verdict(None).startswith(VERDICT_NO_DIFFERENCE)


def test_lower_is_better_task() -> None:
    records = []
    for seed, (base, rdrop) in enumerate([(24.0, 25.0), (24.4, 25.5), (24.9, 26.0)]):
        records.append(make_record(PPL, "baseline", None, seed, base, base, test_time=base))
        records.append(make_record(PPL, "rdrop", 1.0, seed, rdrop, rdrop))
    text = summary_table(records)
    line = next(line for line in text.splitlines() if line.startswith("**Verdict"))
    assert f"equal epochs: {VERDICT_BASELINE_BETTER}" in line
    header, row = table_row(text, "method"), table_row(text, "R-Drop α=1.0")
    delta = header.index("Δ vs baseline (eq. epochs)")
    assert row[delta] == "+1.07"  # differences 1.0, 1.1, 1.1 -> mean 1.0667 (2 digits >= 10)
    assert row[delta + 3] == "0/0/3"  # W/T/L counts "better" = lower perplexity


def test_write_report_contents_and_plots(tmp_path: Path) -> None:
    records = sst2_records()
    records += [
        make_record(MRPC, method, alpha, seed, {"f1": f1, "accuracy": acc}, 0.8)
        for seed in range(2)
        for method, alpha, f1, acc in [
            ("baseline", None, 0.80 + 0.01 * seed, 0.70),
            ("rdrop", 1.0, 0.82 + 0.01 * seed, 0.72),
        ]
    ]
    write_records(tmp_path, records)
    report = write_report(tmp_path)
    assert report == tmp_path / "REPORT.md"
    text = report.read_text(encoding="utf-8")
    protocol = text.index("## Protocol")
    assert protocol < text.index("## MRPC") < text.index("## SST-2")
    for phrase in [
        "validation split",
        "never used for selection",
        "mean ± std",
        "equal training time",
        "time_budget_seconds",
        "test_labeled.tsv (labelled test)",
        "half of dev.tsv carved off (fixed seed)",
        "500 of 67,349 (0.7%)",
        "Test CPU",
        "rdrop run --task sst2 --method rdrop",
        "rdrop run --task mrpc --method baseline",
        "total wall-clock time 3 min 10 s",  # 19 runs x 10 s
        "Per-seed test accuracy (equal epochs)",
    ]:
        assert phrase in text, phrase
    # commands listed once each
    assert text.count("rdrop run --task sst2 --method rdrop\n") == 1
    # MRPC: secondary table with both metrics; 2 seeds: d = 0.02, 0.02
    assert "test accuracy (eq. epochs)" in text[text.index("## MRPC") :]
    assert "Δ f1 +0.0200" in text
    # every linked plot exists and is a PNG
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {
        "sst2_validation_vs_step.png",
        "sst2_validation_vs_time.png",
        "sst2_train_loss.png",
        "sst2_probe_kl.png",
        "sst2_alpha_sensitivity.png",
        "mrpc_probe_kl.png",
    } <= names
    assert "mrpc_alpha_sensitivity.png" not in names  # one alpha only
    for link in links:
        assert not Path(link).is_absolute()
        path = tmp_path / link
        assert path.read_bytes()[:8] == PNG_SIGNATURE, link


def test_write_report_to_other_folder(tmp_path: Path) -> None:
    write_records(tmp_path / "results", sst2_records()[:6])
    report = write_report(tmp_path / "results", tmp_path / "out")
    assert report == tmp_path / "out" / "REPORT.md"
    assert (tmp_path / "out" / "plots" / "sst2_validation_vs_step.png").is_file()
    assert not (tmp_path / "results" / "REPORT.md").exists()


def test_partial_and_corrupt_files_are_skipped(tmp_path: Path) -> None:
    records = sst2_records()[:6]  # baseline and doubled batch, 3 seeds each
    write_records(tmp_path, records)
    runs = tmp_path / "runs"
    (runs / "sst2__rdrop-a1__s0.json.tmp").write_text(json.dumps(records[0])[:50])
    (runs / "truncated.json").write_text('{"schema": 1, "config": {')
    (runs / ".sst2__rdrop-a1__s1.abc123.tmp").write_text("{")  # the store's temporary name
    (runs / ".DS_Store").write_text("")  # ignored silently
    (runs / "notes").mkdir()
    partial = dict(records[0], run_id="partial")
    del partial["selections"]
    (runs / "partial.json").write_text(json.dumps(partial))
    (runs / "list.json").write_text("[1, 2]")
    with pytest.warns(ReportWarning) as caught:
        loaded = load_records(tmp_path)
    assert len(loaded) == 6
    messages = " ".join(str(w.message) for w in caught)
    for name in (
        "sst2__rdrop-a1__s0.json.tmp",
        ".sst2__rdrop-a1__s1.abc123.tmp",
        "truncated.json",
        "partial.json",
        "list.json",
    ):
        assert name in messages
    assert "selections.equal_epochs" in messages
    assert ".DS_Store" not in messages and "notes" not in messages
    with pytest.warns(ReportWarning):
        assert write_report(tmp_path).is_file()


def test_equal_time_runs_made_on_different_days_get_a_note(tmp_path: Path) -> None:
    records = sst2_records()
    one_day = write_report(write_records(tmp_path / "one", records)).read_text(encoding="utf-8")
    assert "different days" not in one_day
    records[0] = dict(records[0], started_at="2024-01-09T10:00:00")  # a baseline run
    text = write_report(write_records(tmp_path / "two", records)).read_text(encoding="utf-8")
    assert "runs were made on 2 different days (2024-01-01, 2024-01-09)" in text
    untimed = [dict(r, time_budget_seconds=None) for r in records]
    text = write_report(write_records(tmp_path / "three", untimed)).read_text(encoding="utf-8")
    assert "different days" not in text


def test_duplicate_runs_keep_the_last_finished(tmp_path: Path) -> None:
    old = make_record(SST2, "baseline", None, 0, 0.5, 0.5)
    new = dict(make_record(SST2, "baseline", None, 0, 0.7, 0.7), finished_at="2024-02-01T00:00:00")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text(json.dumps(new))
    (tmp_path / "runs" / "b.json").write_text(json.dumps(old))
    with pytest.warns(ReportWarning, match="keeping a.json"):
        loaded = load_records(tmp_path)
    assert len(loaded) == 1 and loaded[0]["selections"]["equal_epochs"]["test"]["accuracy"] == 0.7


def test_duplicate_runs_of_another_setting_name_what_differs(tmp_path: Path) -> None:
    """Two pilots of one run at two learning rates in one folder: the warning says which
    setting differs and to give the other its own folder."""
    low = make_record(SST2, "baseline", None, 0, 0.5, 0.5)
    low["config"] = dict(low["config"], lr=2e-5)
    high = dict(make_record(SST2, "baseline", None, 0, 0.7, 0.7), finished_at="2024-02-01")
    high["config"] = dict(high["config"], lr=5e-5)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "low.json").write_text(json.dumps(low))
    (tmp_path / "runs" / "high.json").write_text(json.dumps(high))
    with pytest.warns(
        ReportWarning, match=r"differ in lr \(5e-05 kept, 2e-05 ignored\).*--results-dir"
    ):
        load_records(tmp_path)


def test_missing_optional_keys_and_empty_folder(tmp_path: Path) -> None:
    record = make_record(SST2, "baseline", None, 0, 0.8, 0.7)
    for key in ("evals", "train_curve", "environment", "seconds_per_step", "command"):
        del record[key]
    del record["selections"]["equal_time"]
    write_records(tmp_path / "one", [record])
    text = write_report(tmp_path / "one").read_text(encoding="utf-8")
    assert "0.8000 (1 run)" in text
    assert "equal training time: not measured" not in text  # no R-Drop: no verdict budgets
    assert "no R-Drop runs" in text
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    assert "No finished runs" in write_report(tmp_path / "empty").read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nothing")


def test_report_imports_matplotlib_lazily(tmp_path: Path) -> None:
    write_records(tmp_path, sst2_records()[:1])
    code = (
        "import sys\n"
        "import rdrop, rdrop_lab.report as report\n"
        "assert 'matplotlib' not in sys.modules, 'imported at module level'\n"
        f"report.write_report(__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "assert 'matplotlib' in sys.modules\n"
        "import matplotlib\n"
        "print(matplotlib.get_backend())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_runs_with_different_equal_time_budgets_get_a_note(tmp_path: Path) -> None:
    records = sst2_records()
    timed = [r for r in records if r.get("time_budget_seconds") is not None]
    assert timed, "the synthetic baseline runs carry a budget"
    same = write_report(write_records(tmp_path / "same", records)).read_text(encoding="utf-8")
    assert "equal-time budgets differ" not in same
    index = records.index(timed[0])
    records[index] = dict(timed[0], time_budget_seconds=2.0 * timed[0]["time_budget_seconds"])
    text = write_report(write_records(tmp_path / "chunks", records)).read_text(encoding="utf-8")
    assert "the equal-time budgets differ between runs" in text


def test_a_single_run_shows_no_std(tmp_path: Path) -> None:
    records = [r for r in sst2_records() if r["config"]["seed"] == 0]
    text = write_report(write_records(tmp_path, records)).read_text(encoding="utf-8")
    assert "(1 run)" in text and "± 0.0000" not in text
