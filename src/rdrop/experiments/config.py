"""Run and suite configurations: plain TOML/YAML files, validated on load, never executed.

A *run* is one (task, method, alpha, seed) training with fixed hyper-parameters. A *suite*
file expands to many runs::

    [suite]
    name = "glue-default"
    tasks = ["sst2", "mrpc"]
    methods = ["rdrop", "doubled_batch", "baseline"]   # rdrop first: it sets the time budget
    seeds = [0, 1, 2]
    alphas = ["paper"]           # R-Drop alphas; "paper" = the paper's value for the task

    [train]                      # any RunConfig field, for every run
    epochs = 2
    train_size = 500

    [tasks.rte]                  # per-task overrides of [train]
    train_size = 800

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "RunConfig", "SuiteConfig", "load_suite", "parse_suite"]


class ConfigError(ValueError):
    """A configuration file or option is invalid; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (and so its identity)."""

    task: str
    method: str = "baseline"
    alpha: float | None = None
    seed: int = 0
    epochs: float = 2.0
    train_size: int | None = 500
    validation_size: int | None = 400
    test_size: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    evals_per_epoch: int = 2
    dropout: float | None = None
    probe_size: int = 32
    equal_time: bool = True
    max_time_factor: float = 3.0
    paper_alpha: float | None = None
    data_seed: int = 0
    #: Free-form labels recorded with the run (part of its identity; the runner ignores them).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "lr": self.lr,
            "max_length": self.max_length,
            "evals_per_epoch": self.evals_per_epoch,
            "probe_size": self.probe_size,
            "max_time_factor": self.max_time_factor,
        }
        for key, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")
        for key in ("train_size", "validation_size", "test_size"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ConfigError(f"{key} must be >= 2 or null (all), got {value!r}")
        if self.alpha is not None and not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1) or null, got {self.dropout!r}")
        for key in ("weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_id(self) -> str:
        """Stable identity: readable prefix + hash of every field."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        digest = hashlib.sha1(blob).hexdigest()[:10]
        alpha = "" if self.alpha is None else f"-a{self.alpha:g}"
        return f"{self.task}__{self.method}{alpha}__s{self.seed}__{digest}"


_RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_SUITE_KEYS = {"name", "tasks", "methods", "seeds", "alphas", "description"}
_TOP_KEYS = {"suite", "train", "tasks"}


def _check_type(key: str, value: Any, annotation: str) -> Any:
    """Validate a scalar against a RunConfig field annotation (as a string)."""
    allows_none = "None" in annotation
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"{key} must not be null")
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if annotation.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/mapping, got {value!r}")
        return value
    return value


def validate_run_overrides(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a mapping of RunConfig overrides; return it with values coerced."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table/mapping, got {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if key in ("task", "method", "seed", "alpha"):
            raise ConfigError(f"[{where}] {key!r} is set by [suite] (tasks/methods/seeds/alphas)")
        if key == "paper_alpha":
            raise ConfigError(f"[{where}] 'paper_alpha' is set by the task, not by a config")
        if key not in _RUN_FIELDS:
            known = ", ".join(sorted(k for k in _RUN_FIELDS if k not in ("task", "method")))
            raise ConfigError(f"[{where}] unknown key {key!r}; known keys: {known}")
        annotation = str(_RUN_FIELDS[key].type)
        checked[key] = _check_type(f"[{where}] {key}", value, annotation)
    return checked


@dataclass(frozen=True)
class SuiteConfig:
    """A validated suite: the runs it expands to, in execution order."""

    name: str
    runs: tuple[RunConfig, ...]
    description: str = ""


def parse_suite(
    data: dict[str, Any],
    *,
    known_tasks: dict[str, float | None],
    known_methods: set[str],
    task_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> SuiteConfig:
    """Validate a parsed suite mapping and expand it into runs.

    A run's settings are, by increasing precedence: :class:`RunConfig`'s defaults, the
    task's own defaults (``task_defaults``), ``[train]``, ``[tasks.<name>]``.

    Args:
        data: the parsed file (TOML or YAML).
        known_tasks: task name -> the paper's alpha for it (or None).
        known_methods: names of the registered methods.
        task_defaults: task name -> run settings that task uses unless the file sets them.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a suite file must hold a mapping at the top, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"unknown top-level key {key!r}; expected {sorted(_TOP_KEYS)}")
    suite = data.get("suite")
    if not isinstance(suite, dict):
        raise ConfigError("missing [suite] table (with tasks, methods, seeds)")
    for key in suite:
        if key not in _SUITE_KEYS:
            raise ConfigError(f"[suite] unknown key {key!r}; expected {sorted(_SUITE_KEYS)}")
    name = suite.get("name", "suite")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[suite] name must be a non-empty string, got {name!r}")

    def str_list(key: str, default: list[Any] | None = None) -> list[Any]:
        value = suite.get(key, default)
        if value is None:
            raise ConfigError(f"[suite] {key} is required")
        if not isinstance(value, list) or not value:
            raise ConfigError(f"[suite] {key} must be a non-empty list, got {value!r}")
        return value

    tasks = str_list("tasks")
    for task in tasks:
        if task not in known_tasks:
            raise ConfigError(f"[suite] tasks: unknown task {task!r}; known: {sorted(known_tasks)}")
    methods = str_list("methods")
    for method in methods:
        if method not in known_methods:
            raise ConfigError(
                f"[suite] methods: unknown method {method!r}; known: {sorted(known_methods)}"
            )
    seeds = str_list("seeds")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"[suite] seeds must be integers, got {seed!r}")
    alphas = str_list("alphas", ["paper"])
    for alpha in alphas:
        ok = alpha == "paper" or (
            isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha >= 0
        )
        if not ok:
            raise ConfigError(
                f"[suite] alphas: each must be a number >= 0 or 'paper', got {alpha!r}"
            )

    train = validate_run_overrides(data.get("train", {}), "train")
    per_task = data.get("tasks", {})
    if not isinstance(per_task, dict):
        raise ConfigError("[tasks] must be a table of per-task tables")
    for task in per_task:
        if task not in tasks:
            raise ConfigError(f"[tasks.{task}] overrides a task that is not in [suite] tasks")

    runs: list[RunConfig] = []
    for task in tasks:
        overrides = {
            **(task_defaults or {}).get(task, {}),
            **train,
            **validate_run_overrides(per_task.get(task, {}), f"tasks.{task}"),
        }
        paper_alpha = known_tasks[task]
        for seed in seeds:
            for method in methods:
                method_alphas: list[float | None]
                if method == "rdrop":
                    method_alphas = []
                    for alpha in alphas:
                        value = paper_alpha if alpha == "paper" else float(alpha)
                        if value is None:
                            raise ConfigError(f"task {task!r} has no paper alpha; give a number")
                        if value not in method_alphas:
                            method_alphas.append(value)
                else:
                    method_alphas = [None]
                for alpha_value in method_alphas:
                    try:
                        runs.append(
                            RunConfig(
                                task=task,
                                method=method,
                                alpha=alpha_value,
                                seed=seed,
                                paper_alpha=paper_alpha,
                                **overrides,
                            )
                        )
                    except TypeError as error:
                        raise ConfigError(str(error)) from None
    description = suite.get("description", "")
    return SuiteConfig(name=name, runs=tuple(runs), description=str(description))


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a ``.toml``, ``.yaml`` or ``.yml`` file safely (no code execution)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ConfigError(
                "YAML configs need PyYAML: pip install 'torch-rdrop[experiments]'"
            ) from error
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        return loaded if loaded is not None else {}
    raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")


def load_suite(
    path: Path,
    *,
    known_tasks: dict[str, float | None],
    known_methods: set[str],
    task_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> SuiteConfig:
    """Read and validate a suite file (see :func:`parse_suite`)."""
    try:
        return parse_suite(
            read_config_file(path),
            known_tasks=known_tasks,
            known_methods=known_methods,
            task_defaults=task_defaults,
        )
    except ConfigError as error:
        message = str(error)
        raise ConfigError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
