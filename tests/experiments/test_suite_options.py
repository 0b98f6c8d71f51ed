"""Run options of issue #5 (ablations, regularizer hyper-parameters, few-shot,
unlabeled pools): validation, suite expansion, run-id stability and the time budget."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from rdrop_lab.cli import main
from rdrop_lab.config import (
    ConfigError,
    RunConfig,
    is_plain_rdrop,
    load_suite,
    parse_suite,
)
from rdrop_lab.methods import method_specs
from rdrop_lab.runner import (
    check_run,
    estimate_units,
    time_budget_for,
    time_budget_sources,
)
from rdrop_lab.store import ResultStore
from rdrop_lab.tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
KNOWN_TASKS = {name: task.paper_alpha for name, task in TASKS.items()}

# A record's config from results/glue (written before the new fields existed) and its id.
PINNED_CONFIG = {
    "alpha": None,
    "batch_size": 16,
    "data_seed": 0,
    "dropout": None,
    "epochs": 2.0,
    "equal_time": True,
    "eval_batch_size": 64,
    "evals_per_epoch": 2,
    "extra": {},
    "lr": 5e-05,
    "max_grad_norm": 1.0,
    "max_length": 128,
    "max_time_factor": 3.0,
    "method": "baseline",
    "paper_alpha": 0.5,
    "probe_size": 32,
    "seed": 0,
    "task": "cola",
    "test_size": None,
    "train_size": 320,
    "validation_size": 300,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
}
PINNED_ID = "cola__baseline__s0__1dcbf760ac"


def parse(data: dict[str, Any]) -> Any:
    return parse_suite(data, known_tasks=KNOWN_TASKS, known_methods=method_specs())


def suite(methods: list[str], **extra: Any) -> dict[str, Any]:
    tables = {k: v for k, v in extra.items() if k in ("train", "tasks", "variants")}
    keys = {k: v for k, v in extra.items() if k not in tables}
    return {"suite": {"tasks": ["sst2"], "methods": methods, "seeds": [0], **keys}, **tables}


# --------------------------------------------------------------------------- run ids


def test_run_id_of_a_recorded_config_is_unchanged() -> None:
    config = RunConfig.from_dict(PINNED_CONFIG)
    assert config.run_id() == PINNED_ID
    assert config.to_dict()["every_k_steps"] == 1  # new fields recorded, not hashed


def test_run_ids_of_every_committed_record_are_unchanged() -> None:
    paths = sorted(ROOT.glob("results/*/runs/*.json"))
    if not paths:
        pytest.skip("no committed run records")
    for path in paths:
        record = json.loads(path.read_text())
        assert RunConfig.from_dict(record["config"]).run_id() == record["run_id"], path.name


@pytest.mark.parametrize(
    "changes",
    [
        {"every_k_steps": 5},
        {"num_passes": 3},
        {"dropout_rates": (0.1, 0.3)},
        {"stop_gradient": True},
        {"label_smoothing": 0.1},
        {"mixup_alpha": 0.2},
        {"manifold_mixup_alpha": 2.0},
        {"fgm_epsilon": 1.0},
        {"shots_per_class": 16},
        {"unlabeled_size": 100},
    ],
)
def test_a_new_field_set_changes_the_run_id(changes: dict[str, Any]) -> None:
    base = RunConfig("sst2", "rdrop", alpha=1.0)
    changed = RunConfig("sst2", "rdrop", alpha=1.0, **changes)
    assert changed.run_id() != base.run_id()
    again = RunConfig.from_dict(json.loads(json.dumps(changed.to_dict())))  # via a record
    assert again.run_id() == changed.run_id() and again == changed


def test_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="unknown RunConfig field"):
        RunConfig.from_dict({"task": "sst2", "every_k": 2})


def test_is_plain_rdrop_reads_old_and_new_records() -> None:
    assert is_plain_rdrop({"method": "rdrop", "alpha": 1.0})  # an old record
    assert is_plain_rdrop({"method": "rdrop", "every_k_steps": 1, "dropout_rates": None})
    assert not is_plain_rdrop({"method": "rdrop", "dropout_rates": [0.1, 0.3]})
    assert not is_plain_rdrop({"method": "rdrop", "stop_gradient": True})
    assert not is_plain_rdrop({"method": "doubled_batch"})


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"every_k_steps": 0}, "every_k_steps must be an integer >= 1"),
        ({"num_passes": 1}, "num_passes must be an integer >= 2"),
        ({"dropout_rates": [0.1]}, "dropout_rates must give one rate per pass"),
        ({"dropout_rates": [0.1, 1.0]}, r"dropout_rates must lie in \[0, 1\)"),
        ({"stop_gradient": 1}, "stop_gradient must be true or false"),
        ({"shots_per_class": 0}, "shots_per_class must be an integer >= 1"),
        ({"unlabeled_size": 0}, "unlabeled_size must be an integer >= 1"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"mixup_alpha": 0.0}, "mixup_alpha must be a finite number > 0"),
        ({"fgm_epsilon": float("inf")}, "fgm_epsilon must be a finite number > 0"),
    ],
)
def test_run_config_validation_names_the_key(changes: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RunConfig("sst2", "rdrop", alpha=1.0, **changes)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (suite(["rdrop"], train={"every_k_steps": "5"}), r"\[train\] every_k_steps must be an int"),
        (suite(["rdrop"], train={"dropout_rates": "0.1"}), r"dropout_rates must be a list"),
        (suite(["baseline"], train={"fgm_epsilon": 0.5}), "'fgm_epsilon' is set for task 'sst2' but"),
        (suite(["rdrop"], data_seeds=[0, 0]), r"\[suite\] data_seeds has repeated values"),
        (suite(["rdrop"], data_seeds=[0], train={"data_seed": 1}), "conflicts with"),
        (suite(["rdrop"], shots_per_class=[0]), r"shots_per_class must be integers >= 1"),
        (suite(["k5"], variants={"k5": {"method": "rdrop", "fgm_epsilon": 1.0}}),
         r"\[variants.k5\] 'fgm_epsilon' is not an option of method 'rdrop'"),
        (suite(["k5"], variants={"k5": {"method": "rdropp"}}), r"\[variants.k5\] method must"),
        (suite(["rdrop"], variants={"rdrop": {"method": "rdrop"}}), "cannot take the name"),
        (suite(["k5"], variants={"k5": {"method": "rdrop", "every_k": 5}}),
         r"\[variants.k5\] unknown key 'every_k'"),
        (suite(["k5"], variants={"k5": {"method": "rdrop"}}), "sets no option"),
        (suite(["rdrop", "mixup"], tasks={"sst2": {"methods": ["fgm"]}}),
         r"\[tasks.sst2\] methods: 'fgm' is not in"),
        (suite(["mixupp"]), "unknown method 'mixupp'"),
    ],
)  # fmt: skip
def test_bad_suite_options_name_the_key(data: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse(data)


# --------------------------------------------------------------------------- expansion


def test_suite_expands_data_seeds_shots_variants_and_alphas() -> None:
    data = suite(
        ["rdrop", "baseline", "k5", "rdrop_mixup"],
        data_seeds=[0, 1],
        shots_per_class=[16, 64],
        variants={"k5": {"method": "rdrop", "every_k_steps": 5}},
        alphas=["paper", 0.5],
    )
    runs = parse(data).runs
    # 2 shots x 2 data seeds x 1 seed x (2 + 1 + 2 + 2 alphas-expanded runs)
    assert len(runs) == 2 * 2 * (2 + 1 + 2 + 2)
    assert {(r.shots_per_class, r.data_seed) for r in runs} == {
        (16, 0), (16, 1), (64, 0), (64, 1)
    }  # fmt: skip
    k5 = [r for r in runs if r.every_k_steps == 5]
    assert len(k5) == 8 and all(r.method == "rdrop" for r in k5)
    assert {r.alpha for r in runs if r.method == "rdrop_mixup"} == {1.0, 0.5}
    assert all(r.train_size is None for r in runs)
    assert len({r.run_id() for r in runs}) == len(runs)


def test_method_options_reach_only_the_methods_that_read_them() -> None:
    plain = parse(suite(["baseline", "rdrop"])).runs
    data = suite(["baseline", "rdrop", "fgm", "mixup"], train={"fgm_epsilon": 0.5})
    runs = {r.method: r for r in parse(data).runs}
    assert runs["fgm"].fgm_epsilon == 0.5
    assert runs["baseline"].fgm_epsilon is None and runs["mixup"].fgm_epsilon is None
    assert {runs["baseline"].run_id(), runs["rdrop"].run_id()} == {r.run_id() for r in plain}


def test_per_task_methods() -> None:
    data = {
        "suite": {"tasks": ["sst2", "stsb"], "methods": ["rdrop", "label_smoothing"], "seeds": [0]},
        "tasks": {"stsb": {"methods": ["rdrop"], "train_size": 100}},
    }
    runs = parse(data).runs
    assert [(r.task, r.method) for r in runs] == [
        ("sst2", "rdrop"), ("sst2", "label_smoothing"), ("stsb", "rdrop")
    ]  # fmt: skip
    assert runs[-1].train_size == 100


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "configs").glob("*.toml")))
def test_committed_configs_load_and_pass_the_preflight(name: str) -> None:
    loaded = load_suite(
        ROOT / "configs" / f"{name}.toml",
        known_tasks=KNOWN_TASKS,
        known_methods=method_specs(),
        task_defaults={n: t.run_defaults for n, t in TASKS.items()},
    )
    for run in loaded.runs:
        check_run(run)
    assert len({r.run_id() for r in loaded.runs}) == len(loaded.runs)


def test_new_configs_share_their_reference_runs() -> None:
    def ids(name: str) -> set[str]:
        path = ROOT / "configs" / f"{name}.toml"
        runs = load_suite(path, known_tasks=KNOWN_TASKS, known_methods=method_specs()).runs
        return {r.run_id() for r in runs}

    longer = ids("glue_longer")
    assert len(ids("regularizers") & longer) == 12  # baseline and rdrop, SST-2 and STS-B
    assert len(ids("ablations") & longer) == 6
    assert len(ids("few_shot") & ids("semi_supervised")) == 6


# --------------------------------------------------------------------------- runner


def _record(method: str, seconds: float, **config: Any) -> dict[str, Any]:
    cfg = RunConfig("sst2", method, alpha=1.0 if method == "rdrop" else None, **config)
    return {
        "run_id": cfg.run_id(),
        "config": cfg.to_dict(),
        "train_seconds": seconds,
        "clock": "process_cpu",
        "environment": {"torch_threads": torch.get_num_threads()},
        "task": {"name": "sst2"},
        "evals": [],
        "steps": 1,
        "selections": {"equal_epochs": {}, "equal_time": None},
    }


def test_time_budget_comes_from_plain_rdrop_only(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.write(_record("rdrop", 10.0, seed=0))
    store.write(_record("rdrop", 12.0, seed=1))
    store.write(_record("rdrop", 2.0, seed=0, every_k_steps=5))
    store.write(_record("rdrop", 30.0, seed=0, num_passes=3))
    store.write(_record("rdrop", 1.0, seed=2, shots_per_class=16))  # other data
    old = _record("rdrop", 14.0, seed=2)
    for key in ("every_k_steps", "num_passes", "shots_per_class", "stop_gradient"):
        del old["config"][key]  # written before the fields existed
    store.write(old)
    assert time_budget_for(RunConfig("sst2", "fgm"), store) == 12.0
    sources = time_budget_sources(RunConfig("sst2", "fgm"), store)
    assert sorted(sources.values()) == [10.0, 12.0, 14.0]
    assert time_budget_for(RunConfig("sst2", "fgm", shots_per_class=16), store) == 1.0


def test_estimate_units_follow_the_method_cost() -> None:
    def units(method: str, **c: Any) -> float:
        alpha = 1.0 if method.startswith("rdrop") else None
        config = RunConfig("sst2", method, alpha=alpha, train_size=160, epochs=1, **c)
        return estimate_units(config)  # 10 steps

    assert units("rdrop") == units("baseline") == 2 * 10
    assert units("rdrop_fgm") == 3 * 10 and units("rdrop_semi") == 4 * 10
    assert units("baseline", equal_time=False) == 10
    assert units("rdrop", num_passes=3) == 3 * 10


def test_check_run_names_run_task_and_option() -> None:
    with pytest.raises(ConfigError, match=r"run stsb__baseline.*few-shot sampling needs classes"):
        check_run(RunConfig("stsb", "baseline", shots_per_class=16))
    with pytest.raises(ConfigError, match="rdrop_semi.*needs unlabeled_size"):
        check_run(RunConfig("sst2", "rdrop_semi", alpha=1.0))


def test_cli_run_refuses_an_option_no_chosen_method_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "sst2", "--method", "baseline", "--every-k-steps", "5"]
    assert main([*argv, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--every-k-steps is an option of rdrop" in err
    argv = ["run", "stsb", "--method", "label_smoothing", "--results-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "not defined for task 'stsb'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ["fgm", "rdrop_fgm"])
@pytest.mark.parametrize("task", ["fmnist_cnn", "fmnist_vit", "shakespeare"])
def test_fgm_is_refused_before_any_run_on_tasks_without_token_embeddings(
    task: str, method: str
) -> None:
    alpha = 1.0 if method == "rdrop_fgm" else None
    with pytest.raises(ConfigError, match=f"task '{task}'"):
        check_run(RunConfig(task, method, alpha=alpha))


def test_cli_run_needs_an_alpha_for_a_task_without_a_paper_alpha(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "fmnist_cnn", "--method", "rdrop", "--results-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "task 'fmnist_cnn' has no paper alpha; give one with --alpha" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_sweep_dry_run_lists_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs" / "ablations.toml")
    assert main(["sweep", config, "--dry-run", "--results-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.split()
    assert len(lines) == 24 and len(set(lines)) == 24
    assert "24 run(s); 0 already finished" in captured.err and "24 to run" in captured.err
    (tmp_path / "runs").mkdir()
    stub = tmp_path / "runs" / f"{lines[3]}.json"
    stub.write_text(json.dumps({"run_id": lines[3]}))  # no content: not finished
    assert main(["sweep", config, "--dry-run", "--results-dir", str(tmp_path)]) == 0
    assert "0 already finished" in capsys.readouterr().err
    complete = {
        "run_id": lines[3],
        "config": {},
        "task": {},
        "evals": [],
        "steps": 1,
        "selections": {"equal_epochs": {}},
    }
    stub.write_text(json.dumps(complete))
    assert main(["sweep", config, "--dry-run", "--results-dir", str(tmp_path)]) == 0
    assert "1 already finished" in capsys.readouterr().err


def test_cli_sweep_runs_a_chunk_by_task_and_few_shot_size(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = str(ROOT / "configs" / "few_shot.toml")
    chunk = ["sweep", config, "--dry-run", "--tasks", "sst2", "--shots-per-class", "64"]
    assert main(chunk) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 15 and all(line.startswith("sst2__") for line in lines)
    assert main(["sweep", config, "--dry-run"]) == 0
    everything = capsys.readouterr().out.split()
    assert set(lines) < set(everything) and len(everything) == 60


def test_cli_sweep_runs_a_chunk_by_seed_and_data_draw(capsys: pytest.CaptureFixture[str]) -> None:
    regularizers = str(ROOT / "configs" / "regularizers.toml")
    assert main(["sweep", regularizers, "--dry-run", "--tasks", "stsb", "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 8 and all(line.startswith("stsb__") and "__s1__" in line for line in lines)
    few_shot = str(ROOT / "configs" / "few_shot.toml")
    assert main(["sweep", few_shot, "--dry-run", "--tasks", "mrpc", "--data-seeds", "0", "2"]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 20 and all(line.startswith("mrpc__") for line in lines)


def test_cli_sweep_runs_a_chunk_by_method(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "configs" / "converged" / "glue_rte.toml")
    assert main(["sweep", config, "--dry-run", "--methods", "baseline"]) == 0
    baselines = [line for line in capsys.readouterr().out.split("\n") if "__" in line]
    assert [line.split("__")[1:3] for line in baselines] == [
        ["baseline", f"s{seed}"] for seed in (0, 1, 2)
    ]
    assert main(["sweep", config, "--dry-run", "--methods", "rdrop", "--seeds", "1"]) == 0
    rdrop_seed_1 = [line for line in capsys.readouterr().out.split("\n") if "__" in line]
    assert sorted(line.split("__")[1] for line in rdrop_seed_1) == ["rdrop-a1", "rdrop-a10"]
    assert all("__s1__" in line for line in rdrop_seed_1)
    assert main(["sweep", config, "--dry-run", "--methods", "mixup"]) != 0
    assert re.search(
        r"--methods: \['mixup'\] not in the suite \(it has \['baseline', 'rdrop'\]\)",
        capsys.readouterr().err,
    )


@pytest.mark.parametrize(
    ("flag", "value", "pattern"),
    [
        (
            "--shots-per-class",
            "32",
            r"--shots-per-class: \[32\] not in the suite \(it has \[16, 64\]\)",
        ),
        ("--tasks", "cola", r"--tasks: \['cola'\] not in the suite"),
        ("--seeds", "5", r"--seeds: \[5\] not in the suite \(it has \[0\]\)"),
        ("--data-seeds", "3", r"--data-seeds: \[3\] not in the suite \(it has \[0, 1, 2\]\)"),
    ],
)
def test_cli_sweep_names_a_chunk_the_suite_does_not_have(
    flag: str, value: str, pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs" / "few_shot.toml")
    assert main(["sweep", config, "--dry-run", flag, value]) != 0
    assert re.search(pattern, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "folder"),
    [
        (["demo"], "runs/demo"),
        (["demo", "--quick"], "runs/demo_quick"),
        (["demo", "--quick", "--results-dir", "elsewhere"], "elsewhere"),
    ],
)
def test_cli_demo_keeps_quick_runs_apart_from_full_ones(
    argv: list[str], folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rdrop_lab.cli as cli

    seen: dict[str, Any] = {}

    def record_folder(runs: list[RunConfig], args: Any, argv: Any) -> int:
        seen["folder"], seen["train_size"] = args.results_dir, runs[0].train_size
        return 0

    monkeypatch.setattr(cli, "_execute", record_folder)
    assert main(argv) == 0
    assert seen["folder"] == folder
    quick = cli._demo_runs((0,), quick=True)[0].train_size
    assert (seen["train_size"] == quick) == ("--quick" in argv)


def test_demo_runs_use_the_tasks_own_defaults() -> None:
    import rdrop_lab.cli as cli
    from rdrop_lab.tasks import get_task

    lm = cli._demo_runs((0,), quick=False)[0]
    defaults = get_task("shakespeare").run_defaults
    assert lm.lr == defaults["lr"] and lm.weight_decay == defaults["weight_decay"]
    assert lm.train_size == 300 and lm.max_length == 64 and lm.patience == 8
    # The MiniLM demo keeps the run ids of its committed records.
    committed = {p.stem for p in (ROOT / "results" / "demo" / "runs").glob("*.json")}
    assert {r.run_id() for r in cli._demo_runs((0, 1, 2), quick=False, minilm=True)} <= committed
