"""Suite files are validated on load: clear errors naming the key; nothing executes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdrop_lab.config import ConfigError, RunConfig, load_suite, parse_suite

TASKS = {"sst2": 1.0, "cola": 0.5, "mrpc": 1.0}
METHODS = {"baseline", "rdrop", "doubled_batch"}


def parse(data: dict) -> object:
    return parse_suite(data, known_tasks=TASKS, known_methods=METHODS)


def test_expands_runs_with_paper_alpha_and_overrides() -> None:
    suite = parse(
        {
            "suite": {
                "name": "x",
                "tasks": ["sst2", "cola"],
                "methods": ["baseline", "rdrop"],
                "seeds": [0, 1],
                "alphas": ["paper", 3],
            },
            "train": {"epochs": 1, "train_size": 100},
            "tasks": {"cola": {"train_size": 50}},
        }
    )
    runs = suite.runs
    assert len(runs) == 2 * 2 * (1 + 2)
    cola_rdrop = [r for r in runs if r.task == "cola" and r.method == "rdrop"]
    assert sorted({r.alpha for r in cola_rdrop}) == [0.5, 3.0]
    assert all(r.train_size == 50 for r in runs if r.task == "cola")
    assert all(r.train_size == 100 and r.epochs == 1.0 for r in runs if r.task == "sst2")
    assert all(r.alpha is None for r in runs if r.method == "baseline")
    assert len({r.run_id() for r in runs}) == len(runs)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            {"suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]}, "trian": {}},
            "unknown top-level key 'trian'",
        ),
        ({"suite": {"tasks": ["qqp"], "methods": ["rdrop"], "seeds": [0]}}, "unknown task 'qqp'"),
        (
            {"suite": {"tasks": ["sst2"], "methods": ["mixup"], "seeds": [0]}},
            "unknown method 'mixup'",
        ),
        (
            {"suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": ["0"]}},
            "seeds must be integers",
        ),
        (
            {"suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0], "alphas": [-1]}},
            "alphas",
        ),
        ({"suite": {"tasks": ["sst2"], "methods": ["rdrop"]}}, "seeds is required"),
        (
            {"suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0], "colour": 1}},
            r"\[suite\] unknown key 'colour'",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"epoch": 2},
            },
            r"\[train\] unknown key 'epoch'",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"epochs": "two"},
            },
            r"\[train\] epochs must be a number",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"batch_size": 1.5},
            },
            r"batch_size must be an integer",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"lr": -1.0},
            },
            "lr must be a finite number > 0",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"alpha": 1.0},
            },
            "'alpha' is set by",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "tasks": {"cola": {}},
            },
            r"\[tasks.cola\] overrides a task",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"dropout": 1.0},
            },
            r"dropout must be in \[0, 1\)",
        ),
        (
            {
                "suite": {"tasks": ["sst2"], "methods": ["rdrop"], "seeds": [0]},
                "train": {"precision": "fp16"},
            },
            "precision must be one of fp32, bf16, got 'fp16'",
        ),
    ],
)
def test_bad_suites_name_the_key(data: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse(data)


def test_toml_and_yaml_files(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(
        '[suite]\nname = "t"\ntasks = ["sst2"]\nmethods = ["rdrop", "baseline"]\nseeds = [0, 1, 2]\n[train]\nepochs = 1\n'
    )
    suite = load_suite(toml, known_tasks=TASKS, known_methods=METHODS)
    assert suite.name == "t" and len(suite.runs) == 6
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("suite:\n  tasks: [sst2]\n  methods: [baseline]\n  seeds: [3]\n")
    assert load_suite(yaml_file, known_tasks=TASKS, known_methods=METHODS).runs[0].seed == 3
    # YAML tags that would construct Python objects are refused (safe_load): nothing executes.
    evil = tmp_path / "evil.yaml"
    evil.write_text("suite: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_suite(evil, known_tasks=TASKS, known_methods=METHODS)
    bad = tmp_path / "bad.toml"
    bad.write_text("[suite\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_suite(bad, known_tasks=TASKS, known_methods=METHODS)
    with pytest.raises(ConfigError, match="must end in .toml"):
        load_suite(
            tmp_path / "s.json" if (tmp_path / "s.json").write_text("{}") else None,
            known_tasks=TASKS,
            known_methods=METHODS,
        )
    with pytest.raises(ConfigError, match="not found"):
        load_suite(tmp_path / "missing.toml", known_tasks=TASKS, known_methods=METHODS)


def test_run_config_validation_and_identity() -> None:
    with pytest.raises(ConfigError, match="train_size must be >= 2"):
        RunConfig("sst2", train_size=1)
    a, b = RunConfig("sst2", "rdrop", alpha=1.0), RunConfig("sst2", "rdrop", alpha=1.0)
    assert a.run_id() == b.run_id() and a.run_id().startswith("sst2__rdrop-a1__s0__")
    assert RunConfig("sst2", "rdrop", alpha=1.0, lr=1e-5).run_id() != a.run_id()
