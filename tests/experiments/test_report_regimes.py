"""The report with the methods, ablations and data regimes of issue #5 (synthetic records)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from rdrop_lab.report import (
    ReportWarning,
    load_records,
    method_label,
    summary_table,
    write_report,
)
from tests.experiments.test_report import SST2, make_record, sst2_records, table_row, write_records


def record(
    method: str,
    alpha: float | None,
    seed: int,
    test: float,
    *,
    config: dict[str, Any] | None = None,
    costs_like_rdrop: bool | None = None,
    test_time: float | None = None,
    data_seed: int = 0,
    task_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A record; ``config`` adds new-style fields, ``costs_like_rdrop`` a method_info."""
    r = make_record(SST2, method, alpha, seed, test, 0.7, test_time=test_time, **kwargs)
    r["config"].update(config or {})
    r["config"]["data_seed"] = data_seed
    r["task"].update(task_info or {})
    if costs_like_rdrop is not None:
        r["method_info"] = {"name": method, "costs_like_rdrop": costs_like_rdrop}
    extra = "_".join(f"{k}{v}" for k, v in sorted((config or {}).items()))
    r["run_id"] += f"_d{data_seed}_{extra}".replace(" ", "")
    return r


def has_comparison(report: str, first: str, second: str) -> bool:
    """Whether the method-against-method table compares ``first`` with ``second``."""
    return any(line.startswith(f"| {first} | {second} |") for line in report.splitlines())


def test_labels_of_ablations_and_regularizers() -> None:
    assert method_label("rdrop", 1.0, (("num_passes", 3),)) == "R-Drop α=1.0 m=3"
    assert method_label("rdrop", 1.0, (("stop_gradient", True),)) == "R-Drop α=1.0 stop-grad"
    assert method_label("rdrop_fgm", 1.0) == "R-Drop + FGM α=1.0"
    assert method_label("manifold_mixup", None) == "Manifold MixUp"
    assert method_label("rdrop_semi", 1.0, (("unlabeled_size", 500),)) == (
        "R-Drop semi-supervised α=1.0 unlabeled=500"
    )


def test_ablations_are_rows_of_their_own_and_old_records_merge(tmp_path: Path) -> None:
    records = []
    for seed, (base, plain, k5) in enumerate(
        [(0.80, 0.82, 0.81), (0.81, 0.84, 0.80), (0.82, 0.85, 0.80)]
    ):
        records.append(record("baseline", None, seed, base, test_time=base + 0.01))
        # seeds 0 and 1 written before the new fields, seed 2 with them at their defaults
        new = {"every_k_steps": 1, "num_passes": 2, "dropout_rates": None, "stop_gradient": False}
        records.append(record("rdrop", 1.0, seed, plain, config=new if seed == 2 else None))
        records.append(
            record("rdrop", 1.0, seed, k5, config={"every_k_steps": 5}, costs_like_rdrop=False,
                   test_time=k5 + 0.05)
        )  # fmt: skip
    write_records(tmp_path, records)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportWarning)  # no duplicate warnings
        loaded = load_records(tmp_path)
    assert len(loaded) == 9
    table = summary_table(loaded)
    assert table_row(table, "R-Drop α=1.0")[1] == "3"
    k5 = table_row(table, "R-Drop α=1.0 k=5")
    assert k5[1] == "3"
    assert "R-Drop α=1.0 (the paper's α)" in table  # the verdict uses plain R-Drop
    report = write_report(tmp_path).read_text()
    assert has_comparison(report, "R-Drop α=1.0 k=5", "R-Drop α=1.0")
    assert "Other methods and ablations" in report
    # k=5 is not "costs like R-Drop": its equal-time model is its own (test +0.05).
    main = [line for line in report.splitlines() if line.startswith("| R-Drop α=1.0 k=5 | 3 |")]
    assert "0.8533" in main[0]  # mean of 0.86, 0.85, 0.85 at equal time
    assert "config.every_k_steps" not in report  # expected to vary: no note
    main_rows = [line.split("|")[1].strip() for line in report.splitlines() if " | 3 | 0." in line]
    assert main_rows[:3] == ["baseline", "R-Drop α=1.0", "R-Drop α=1.0 k=5"]


def test_costs_like_rdrop_from_method_info(tmp_path: Path) -> None:
    records = []
    for seed in range(2):
        records.append(record("baseline", None, seed, 0.80, test_time=0.81))
        records.append(record("rdrop", 1.0, seed, 0.82))
        # recorded equal_time differs, but the method costs like R-Drop: equal epochs used
        records.append(
            record("rdrop_mixup", 1.0, seed, 0.83, costs_like_rdrop=True, test_time=0.99)
        )
        records.append(record("fgm", None, seed, 0.79, costs_like_rdrop=False, test_time=0.90))
    write_records(tmp_path, records)
    table = summary_table(load_records(tmp_path))
    mixup = table_row(table, "R-Drop + MixUp α=1.0")
    fgm = table_row(table, "FGM")
    assert "0.8300" in mixup[2] and "0.8300" in mixup[7]  # eq. epochs = eq. time
    assert "0.9000" in fgm[7]


def test_few_shot_sections_pair_by_seed_and_data_draw(tmp_path: Path) -> None:
    records = []
    for shots in (16, 64):
        for draw in range(3):
            info = {"train_examples": 2 * shots, "validation_examples": 200}
            cfg = {"shots_per_class": shots}
            records.append(
                record("baseline", None, 0, 0.60 + 0.01 * draw, config=cfg, data_seed=draw,
                       task_info=info, test_time=0.6)
            )  # fmt: skip
            records.append(
                record("rdrop", 1.0, 0, 0.65 + 0.01 * draw + 0.001 * shots, config=cfg,
                       data_seed=draw, task_info=info)
            )  # fmt: skip
    write_records(tmp_path, records)
    report = write_report(tmp_path).read_text()
    assert "## SST-2, 16 examples per class" in report
    assert "## SST-2, 64 examples per class" in report
    assert "| seed / data draw |" in report and "| 0 / 2 |" in report
    assert "1 × 3 data draws" in report
    assert "a real few-shot user would not have it" in report
    assert "used for checkpoint selection only" in report
    table = summary_table(load_records(tmp_path))
    assert table.count("n=3)") >= 2  # three (seed, draw) pairs per section
    assert (tmp_path / "plots" / "sst2_16shot_validation_vs_step.png").is_file()


def test_semi_supervised_rows_and_pool_line(tmp_path: Path) -> None:
    records = []
    for seed in range(2):
        records.append(record("baseline", None, seed, 0.80))
        records.append(record("rdrop", 1.0, seed, 0.82))
        semi = record(
            "rdrop_semi", 1.0, seed, 0.84, config={"unlabeled_size": 2000},
            costs_like_rdrop=False, task_info={"unlabeled_examples": 2000},
        )  # fmt: skip
        semi["method_info"]["unlabeled_seen"] = 1280
        records.append(semi)
    write_records(tmp_path, records)
    report = write_report(tmp_path).read_text()
    assert "unlabeled pool of 2000 training examples" in report
    assert "used 1,280 unlabeled examples per run" in report
    assert has_comparison(report, "R-Drop semi-supervised α=1.0 unlabeled=2000", "R-Drop α=1.0")
    assert "**Semi-supervised**" in report


def test_regularizer_comparisons(tmp_path: Path) -> None:
    records = []
    for seed in range(3):
        records.append(record("baseline", None, seed, 0.80))
        records.append(record("rdrop", 1.0, seed, 0.85 + 0.001 * seed))
        records.append(record("mixup", None, seed, 0.82))
        records.append(record("rdrop_mixup", 1.0, seed, 0.86 + 0.002 * seed))
    write_records(tmp_path, records)
    report = write_report(tmp_path).read_text()
    first = table_row(report, "R-Drop α=1.0")  # main-table row comes first
    assert first[1] == "3"
    assert has_comparison(report, "R-Drop + MixUp α=1.0", "MixUp")
    assert has_comparison(report, "R-Drop + MixUp α=1.0", "R-Drop α=1.0")
    assert has_comparison(report, "R-Drop α=1.0", "MixUp")
    assert "first better" in report


def test_plain_reports_get_no_new_sections(tmp_path: Path) -> None:
    write_records(tmp_path, sst2_records())
    report = write_report(tmp_path).read_text()
    for text in ("Method against method", "Other methods", "Few-shot", "data draw"):
        assert text not in report


@pytest.mark.parametrize("variant", [{"dropout_rates": [0.1, 0.3]}, {"stop_gradient": True}])
def test_duplicate_detection_keeps_variants_apart(tmp_path: Path, variant: dict[str, Any]) -> None:
    records = [record("rdrop", 1.0, 0, 0.8), record("rdrop", 1.0, 0, 0.7, config=variant)]
    write_records(tmp_path, records)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportWarning)
        assert len(load_records(tmp_path)) == 2
