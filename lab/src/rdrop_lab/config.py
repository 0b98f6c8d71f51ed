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

Optional ``[suite]`` keys: ``data_seeds = [0, 1, 2]`` (several draws of the training data:
the suite expands over seeds x data seeds), ``shots_per_class = [16, 64]`` (few-shot
training sets, one suite entry per value). A ``[variants.<name>]`` table defines a named
variant of a method with its own options (the paper's ablations), usable in ``methods``::

    [variants.rdrop_k5]
    method = "rdrop"
    every_k_steps = 5

``[tasks.<name>] methods = [...]`` runs only some of the suite's methods on that task.
Options that only some methods read (:data:`METHOD_FIELDS`: the R-Drop ablations, the
regularizers' hyper-parameters, ``unlabeled_size``) are given only to the methods that
read them, so setting one in ``[train]`` leaves the other methods' runs (and run ids)
unchanged.

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ABLATION_DEFAULTS",
    "METHOD_FIELDS",
    "ConfigError",
    "MethodSpec",
    "PRECISIONS",
    "RunConfig",
    "SuiteConfig",
    "changed_fields",
    "config_value",
    "expand_runs",
    "is_plain_rdrop",
    "load_suite",
    "parse_suite",
]


class ConfigError(ValueError):
    """A configuration file or option is invalid; the message names the key."""


#: The arithmetic a run may train and score in (:attr:`RunConfig.precision`).
PRECISIONS = ("fp32", "bf16")


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
    # -- The paper's R-Drop ablations (method ``rdrop`` only). ---------------------------
    #: The consistency term on every k-th step only (1 = every step, plain R-Drop).
    every_k_steps: int = 1
    #: m dropout passes per step (2 = plain R-Drop).
    num_passes: int = 2
    #: One dropout rate per pass (sequential passes); ``None`` = the model's rate.
    dropout_rates: tuple[float, ...] | None = None
    #: Passes 2..m without gradient, used only as the KL target (not in the paper).
    stop_gradient: bool = False
    #: Partial-depth R-Drop: the module (dotted name) from which the layers run on the
    #: repeated batch; ``None`` = the whole model (not in the paper).
    branch_at: str | None = None
    # -- Regularizers' hyper-parameters (``None``: the method's documented default). -----
    #: Label smoothing of the ``label_smoothing`` methods (default 0.1).
    label_smoothing: float | None = None
    #: MixUp's Beta(a, a) parameter (default: the task's, else 0.2 text / 1.0 raw inputs).
    mixup_alpha: float | None = None
    #: Manifold MixUp's Beta(a, a) parameter (default 2.0, Verma et al.).
    manifold_mixup_alpha: float | None = None
    #: FGM's perturbation norm on the embedding weight (default 1.0).
    fgm_epsilon: float | None = None
    # -- Data regimes. -------------------------------------------------------------------
    #: Few-shot: k training examples per class drawn with ``data_seed`` (replaces
    #: ``train_size``, which is then recorded as ``None``).
    shots_per_class: int | None = None
    #: Semi-supervised (``rdrop_semi``): an unlabeled pool of this many examples drawn from
    #: the rest of the training split, labels discarded.
    unlabeled_size: int | None = None
    # -- Convergence protocol (``patience`` set): train up to ``max_epochs`` epochs and stop
    # early once validation has not improved for ``patience`` scheduled evaluations. -------
    #: Early stopping: scheduled evaluations without a new best before the run stops
    #: (``None``: no early stopping, train exactly ``epochs``).
    patience: int | None = None
    #: The most epochs a converging run may train (default: ``epochs``); ``epochs`` stays
    #: the equal-epochs budget.
    max_epochs: float | None = None
    #: Early stopping never stops a run before this many optimizer steps.
    min_steps: int = 0
    #: Early stopping: the least gain in the validation score (in the metric's units) that
    #: restarts the ``patience`` count; ``0.0``: any gain. On a small validation split the
    #: best score keeps creeping up by chance (RTE's 138 pairs: one pair is 0.0072 of
    #: accuracy), so a gain of one or two examples should not keep a run going. Selection
    #: still takes the best score.
    min_delta: float = 0.0
    #: ``"fp32"``, or ``"bf16"``: training steps and scoring under CPU autocast to
    #: bfloat16 (matrix products in bfloat16; the losses, weights and optimizer in float32).
    precision: str = "fp32"

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
        if self.alpha is not None and not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        for key in ("seed", "data_seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise ConfigError(f"{key} must be an integer in [0, 2**32), got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1) or null, got {self.dropout!r}")
        for key in ("weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
        self._check_new_fields()

    def _check_new_fields(self) -> None:
        """Validate (and normalise) the ablation, regularizer and data-regime fields."""
        for key, low in (
            ("every_k_steps", 1),
            ("num_passes", 2),
            ("shots_per_class", 1),
            ("unlabeled_size", 1),
        ):
            value = getattr(self, key)
            if value is None and key in ("shots_per_class", "unlabeled_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.stop_gradient, bool):
            raise ConfigError(f"stop_gradient must be true or false, got {self.stop_gradient!r}")
        if self.branch_at is not None and (
            not isinstance(self.branch_at, str) or not self.branch_at
        ):
            raise ConfigError(f"branch_at must be a module name, got {self.branch_at!r}")
        if self.dropout_rates is not None:
            rates = self.dropout_rates
            if isinstance(rates, (str, bytes)) or not isinstance(rates, (list, tuple)):
                raise ConfigError(f"dropout_rates must be a list of numbers, got {rates!r}")
            if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in rates):
                raise ConfigError(f"dropout_rates must be a list of numbers, got {rates!r}")
            rates = tuple(float(p) for p in rates)
            if not all(0.0 <= p < 1.0 for p in rates):
                raise ConfigError(f"dropout_rates must lie in [0, 1), got {list(rates)}")
            if len(rates) != self.num_passes:
                raise ConfigError(
                    f"dropout_rates must give one rate per pass (num_passes={self.num_passes}), "
                    f"got {len(rates)}: {list(rates)}"
                )
            object.__setattr__(self, "dropout_rates", rates)  # a list from TOML/JSON
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        for key in ("mixup_alpha", "manifold_mixup_alpha", "fgm_epsilon"):
            value = getattr(self, key)
            if value is not None and not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value > 0
                and math.isfinite(value)
            ):
                raise ConfigError(f"{key} must be a finite number > 0 or null, got {value!r}")
        self._check_convergence_fields()
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.shots_per_class is not None and self.train_size is not None:
            # The k-per-class draw is the training set: train_size does not apply.
            object.__setattr__(self, "train_size", None)

    def _check_convergence_fields(self) -> None:
        patience, max_epochs, min_steps = self.patience, self.max_epochs, self.min_steps
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
        ):
            raise ConfigError(f"patience must be an integer >= 1 or null, got {patience!r}")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ConfigError(f"min_steps must be an integer >= 0, got {min_steps!r}")
        if max_epochs is not None:
            if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float)):
                raise ConfigError(f"max_epochs must be a number or null, got {max_epochs!r}")
            if not (math.isfinite(max_epochs) and max_epochs >= self.epochs):
                raise ConfigError(
                    f"max_epochs must be a finite number >= epochs ({self.epochs:g}), "
                    f"got {max_epochs!r}"
                )
            if patience is None:
                raise ConfigError(
                    "max_epochs needs patience: set patience (evaluations without "
                    "improvement before early stopping) for a run that trains to convergence"
                )
        if min_steps and patience is None:
            raise ConfigError("min_steps needs patience (it delays early stopping)")
        min_delta = self.min_delta
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not (math.isfinite(min_delta) and min_delta >= 0)
        ):
            raise ConfigError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if min_delta and patience is None:
            raise ConfigError(
                "min_delta needs patience (it sets which validation gain restarts the count)"
            )

    @property
    def converges(self) -> bool:
        """Whether the run follows the convergence protocol (early stopping is on)."""
        return self.patience is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Rebuild a config from :meth:`to_dict` output (e.g. a run record's ``config``).

        Records written before a field existed lack it; it takes its default, which keeps
        the :meth:`run_id` the record was written with.
        """
        unknown = sorted(set(data) - set(_RUN_FIELDS))
        if unknown:
            raise ConfigError(f"unknown RunConfig field(s): {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except TypeError as error:
            raise ConfigError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What :meth:`run_id` hashes: every field, except those of :data:`_OPTIONAL_IN_ID`
        while they hold their default, so a config that leaves them at the default hashes
        as one without them."""
        data = self.to_dict()
        for name, default in _OPTIONAL_IN_ID.items():
            if _same_value(data[name], default):
                del data[name]
        return data

    def run_id(self) -> str:
        """Stable identity: readable prefix + hash of every field (see :meth:`identity`)."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        digest = hashlib.sha1(blob).hexdigest()[:10]
        alpha = "" if self.alpha is None else f"-a{self.alpha:g}"
        return f"{self.task}__{self.method}{alpha}__s{self.seed}__{digest}"


_RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

#: Fields left out of the run id while they hold their default (name -> default).
_OPTIONAL_IN_ID: dict[str, Any] = {
    name: _RUN_FIELDS[name].default
    for name in (
        "every_k_steps",
        "num_passes",
        "dropout_rates",
        "stop_gradient",
        "branch_at",
        "label_smoothing",
        "mixup_alpha",
        "manifold_mixup_alpha",
        "fgm_epsilon",
        "shots_per_class",
        "unlabeled_size",
        "patience",
        "max_epochs",
        "min_steps",
        "min_delta",
        "precision",
    )
}

#: The R-Drop ablation fields and their plain-R-Drop values.
ABLATION_DEFAULTS: dict[str, Any] = {
    "every_k_steps": 1,
    "num_passes": 2,
    "dropout_rates": None,
    "stop_gradient": False,
    "branch_at": None,
}

#: Fields only some methods read (each :class:`MethodSpec` says which). Suites give them
#: only to the methods that read them.
METHOD_FIELDS: frozenset[str] = frozenset(
    {
        *ABLATION_DEFAULTS,
        "label_smoothing",
        "mixup_alpha",
        "manifold_mixup_alpha",
        "fgm_epsilon",
        "unlabeled_size",
    }
)


def _same_value(a: Any, b: Any) -> bool:
    """Equality that treats a list and a tuple with the same items as equal (JSON)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def changed_fields(config: RunConfig, names: Collection[str] = METHOD_FIELDS) -> set[str]:
    """Which of the fields ``names`` of ``config`` differ from their defaults."""
    return {
        name for name in names if not _same_value(getattr(config, name), _RUN_FIELDS[name].default)
    }


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]`` of a recorded config, or the field's default for records written
    before the field existed."""
    if key in config:
        return config[key]
    spec = _RUN_FIELDS.get(key)
    if spec is not None and spec.default is not dataclasses.MISSING:
        return spec.default
    return None


def is_plain_rdrop(config: Mapping[str, Any] | RunConfig) -> bool:
    """Whether a (recorded) config is plain R-Drop: method ``rdrop`` with k = 1, m = 2,
    the model's dropout for both passes and no stop-gradient (the runs that set the
    equal-time budget)."""
    data = config.to_dict() if isinstance(config, RunConfig) else config
    if data.get("method") != "rdrop":
        return False
    return all(_same_value(config_value(data, k), d) for k, d in ABLATION_DEFAULTS.items())


@dataclass(frozen=True)
class MethodSpec:
    """What a suite needs to know about a method: whether it takes R-Drop's alpha and
    which of :data:`METHOD_FIELDS` it reads."""

    uses_alpha: bool = False
    fields: frozenset[str] = frozenset()


def _method_specs(
    known_methods: Collection[str] | Mapping[str, MethodSpec],
) -> dict[str, MethodSpec]:
    if isinstance(known_methods, Mapping):
        return dict(known_methods)
    # A plain set of names: only rdrop takes alpha and the ablation options.
    return {
        name: MethodSpec(True, frozenset(ABLATION_DEFAULTS)) if name == "rdrop" else MethodSpec()
        for name in known_methods
    }


_SUITE_KEYS = {
    "name",
    "tasks",
    "methods",
    "seeds",
    "alphas",
    "description",
    "data_seeds",
    "shots_per_class",
}
_TOP_KEYS = {"suite", "train", "tasks", "variants"}


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
    if annotation.startswith("tuple"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of numbers, got {value!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
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
        if key in ("train_size", "validation_size", "test_size") and value == "all":
            checked[key] = None  # TOML has no null: "all" is the whole split
            continue
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
    known_methods: Collection[str] | Mapping[str, MethodSpec],
    task_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> SuiteConfig:
    """Validate a parsed suite mapping and expand it into runs.

    A run's settings are, by increasing precedence: :class:`RunConfig`'s defaults, the
    task's own defaults (``task_defaults``), ``[train]``, ``[tasks.<name>]``, the
    method's ``[variants.<name>]`` table. Options in :data:`METHOD_FIELDS` reach only the
    methods that read them. The runs are ordered task, shots per class, data seed, seed,
    method, alpha (:func:`expand_runs`).

    Args:
        data: the parsed file (TOML or YAML).
        known_tasks: task name -> the paper's alpha for it (or None).
        known_methods: the registered methods: name -> :class:`MethodSpec` (a plain set of
            names means: only ``rdrop`` takes alpha and the ablation options).
        task_defaults: task name -> run settings that task uses unless the file sets them.

    Returns:
        The suite's name, runs and description.

    Raises:
        ConfigError: naming the table and key of the first invalid entry.
    """
    specs = _method_specs(known_methods)
    suite = _suite_table(data)
    name = _suite_name(suite)
    tasks = _suite_tasks(suite, known_tasks)
    variants = _parse_variants(data.get("variants", {}), specs)
    methods = _suite_methods(suite, specs, variants)
    seeds = _suite_seeds(suite)
    alphas = _suite_alphas(suite)
    data_seeds = _unique_ints(suite, "data_seeds", 0)
    shots = _unique_ints(suite, "shots_per_class", 1)
    train = validate_run_overrides(data.get("train", {}), "train")
    per_task, task_methods = _per_task_tables(data.get("tasks", {}), tasks, methods)
    tables = [("train", train), *((f"tasks.{t}", table) for t, table in per_task.items())]
    _check_regime_conflicts(tables, data_seeds, shots)
    runs: list[RunConfig] = []
    for task in tasks:
        options = {**(task_defaults or {}).get(task, {}), **train, **per_task.get(task, {})}
        chosen = task_methods.get(task, methods)
        _check_method_fields_used(options, chosen, specs, variants, task)
        runs += expand_runs(
            task,
            chosen,
            specs=specs,
            seeds=seeds,
            alphas=alphas,
            paper_alpha=known_tasks[task],
            options=options,
            variants=variants,
            shots=[None] if shots is None else shots,
            data_seeds=[None] if data_seeds is None else data_seeds,
        )
    description = suite.get("description", "")
    return SuiteConfig(name=name, runs=tuple(runs), description=str(description))


def expand_runs(
    task: str,
    methods: Sequence[str],
    *,
    specs: Mapping[str, MethodSpec],
    seeds: Sequence[int],
    alphas: Sequence[float | str],
    paper_alpha: float | None,
    options: Mapping[str, Any],
    variants: Mapping[str, tuple[str, dict[str, Any]]] | None = None,
    shots: Sequence[int | None] = (None,),
    data_seeds: Sequence[int | None] = (None,),
    method_first: bool = False,
) -> list[RunConfig]:
    """The runs of one task: every method × alpha × seed × data seed × shots per class
    (used by suite files and by ``rdrop run``).

    A method's run gets ``options`` without the :data:`METHOD_FIELDS` it does not read (so
    its run id is the same with or without them), then its variant's options.

    Args:
        task: the task.
        methods: method names, or names of ``variants``.
        specs: the registered methods (whether they take alpha, which options they read).
        seeds: training seeds.
        alphas: R-Drop alphas, each a number or ``"paper"`` (``paper_alpha``); methods
            that take no alpha get one run with ``alpha=None``. Repeated values give one run.
        paper_alpha: the paper's alpha for the task (``None``: it has none).
        options: the other RunConfig fields.
        variants: variant name -> (method, its options).
        shots: few-shot sizes (``None``: the task's training subsample).
        data_seeds: draws of the training data (``None``: ``options``' data seed).
        method_first: order the runs method, shots, data seed, seed, alpha (the order of
            ``rdrop run``) instead of shots, data seed, seed, method, alpha (suite files:
            a converged suite runs seed by seed).

    Returns:
        The runs, in that order.

    Raises:
        ConfigError: a "paper" alpha for a task without one, or an invalid run.
    """
    variants = variants or {}
    runs: list[tuple[int, RunConfig]] = []
    for shot, data_seed, seed in itertools.product(shots, data_seeds, seeds):
        for position, entry in enumerate(methods):
            method, variant = variants.get(entry, (entry, {}))
            spec = specs[method]
            own = _options_for(spec, options, variant, shot=shot, data_seed=data_seed)
            for alpha in _alphas_of(spec, alphas, paper_alpha, task):
                runs.append((position, _run_config(task, method, alpha, seed, paper_alpha, own)))
    if method_first:
        runs.sort(key=lambda item: item[0])  # stable: the rest of the order stays
    return [run for _, run in runs]


def _options_for(
    spec: MethodSpec,
    options: Mapping[str, Any],
    variant: Mapping[str, Any],
    *,
    shot: int | None,
    data_seed: int | None,
) -> dict[str, Any]:
    """The RunConfig fields of one method's run: ``options`` without the method fields
    it does not read, its variant's options, then the shots and data seed when given."""
    own = {k: v for k, v in options.items() if k not in METHOD_FIELDS or k in spec.fields}
    own.update(variant)
    if shot is not None:
        own["shots_per_class"] = shot
    if data_seed is not None:
        own["data_seed"] = data_seed
    return own


def _run_config(
    task: str,
    method: str,
    alpha: float | None,
    seed: int,
    paper_alpha: float | None,
    options: Mapping[str, Any],
) -> RunConfig:
    """A validated RunConfig (a field name RunConfig lacks is a ConfigError too)."""
    try:
        return RunConfig(
            task=task, method=method, alpha=alpha, seed=seed, paper_alpha=paper_alpha, **options
        )
    except TypeError as error:
        raise ConfigError(str(error)) from None


def _suite_table(data: Any) -> dict[str, Any]:
    """The ``[suite]`` table, once the top-level and ``[suite]`` keys are checked."""
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
    return suite


def _suite_name(suite: Mapping[str, Any]) -> str:
    """``[suite] name``: it names the default results folder, so it is a plain name."""
    name = suite.get("name", "suite")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(
            "[suite] name must be a non-empty string of letters, digits, '.', '_' and '-' "
            f"(it names the default results folder runs/<name>), got {name!r}"
        )
    return name


def _suite_list(suite: Mapping[str, Any], key: str, default: list[Any] | None = None) -> list:
    """A non-empty list under ``[suite] key`` (``default`` when absent; required without)."""
    value = suite.get(key, default)
    if value is None:
        raise ConfigError(f"[suite] {key} is required")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"[suite] {key} must be a non-empty list, got {value!r}")
    return value


def _unique_ints(suite: Mapping[str, Any], key: str, low: int) -> list[int] | None:
    """Distinct integers >= ``low`` under ``[suite] key`` (``None`` when absent)."""
    if key not in suite:
        return None
    values = _suite_list(suite, key)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"[suite] {key} must be integers >= {low}, got {value!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"[suite] {key} has repeated values: {values}")
    return values


def _suite_tasks(suite: Mapping[str, Any], known_tasks: Mapping[str, Any]) -> list[str]:
    """``[suite] tasks``, each a registered task."""
    tasks = _suite_list(suite, "tasks")
    for task in tasks:
        if task not in known_tasks:
            raise ConfigError(f"[suite] tasks: unknown task {task!r}; known: {sorted(known_tasks)}")
    return tasks


def _suite_methods(
    suite: Mapping[str, Any],
    specs: Mapping[str, MethodSpec],
    variants: Mapping[str, tuple[str, dict[str, Any]]],
) -> list[str]:
    """``[suite] methods``: distinct names of registered methods or of variants."""
    methods = _suite_list(suite, "methods")
    for method in methods:
        if method not in specs and method not in variants:
            raise ConfigError(
                f"[suite] methods: unknown method {method!r}; known: {sorted(specs)}"
                + (f"; variants: {sorted(variants)}" if variants else "")
            )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"[suite] methods has repeated entries: {methods}")
    return methods


def _suite_seeds(suite: Mapping[str, Any]) -> list[int]:
    """``[suite] seeds``: integers in [0, 2**32)."""
    seeds = _suite_list(suite, "seeds")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"[suite] seeds must be integers in [0, 2**32), got {seed!r}")
    return seeds


def _suite_alphas(suite: Mapping[str, Any]) -> list[float | str]:
    """``[suite] alphas``: finite numbers >= 0 or ``"paper"`` (the default)."""
    alphas = _suite_list(suite, "alphas", ["paper"])
    for alpha in alphas:
        ok = alpha == "paper" or (
            isinstance(alpha, (int, float))
            and not isinstance(alpha, bool)
            and alpha >= 0
            and math.isfinite(alpha)
        )
        if not ok:
            raise ConfigError(
                f"[suite] alphas: each must be a finite number >= 0 or 'paper', got {alpha!r}"
            )
    return alphas


def _per_task_tables(
    raw: Any, tasks: Sequence[str], methods: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """The ``[tasks.<name>]`` tables: each task's run overrides and, where the table
    lists ``methods``, the suite methods that task runs (in suite order).

    Returns:
        ``(task -> overrides, task -> its methods)``.
    """
    if not isinstance(raw, dict):
        raise ConfigError("[tasks] must be a table of per-task tables")
    per_task: dict[str, dict[str, Any]] = {}
    task_methods: dict[str, list[str]] = {}
    for task, table in raw.items():
        if task not in tasks:
            raise ConfigError(f"[tasks.{task}] overrides a task that is not in [suite] tasks")
        if not isinstance(table, dict):
            raise ConfigError(f"[tasks.{task}] must be a table/mapping, got {table!r}")
        table = dict(table)
        if "methods" in table:
            task_methods[task] = _task_methods(task, table.pop("methods"), methods)
        per_task[task] = validate_run_overrides(table, f"tasks.{task}")
    return per_task, task_methods


def _task_methods(task: str, chosen: Any, methods: Sequence[str]) -> list[str]:
    """``[tasks.<task>] methods``: a non-empty subset of the suite's, in suite order."""
    if not isinstance(chosen, list) or not chosen:
        raise ConfigError(f"[tasks.{task}] methods must be a non-empty list")
    for method in chosen:
        if method not in methods:
            raise ConfigError(f"[tasks.{task}] methods: {method!r} is not in [suite] methods")
    return [m for m in methods if m in chosen]


def _check_regime_conflicts(
    tables: Sequence[tuple[str, Mapping[str, Any]]],
    data_seeds: list[int] | None,
    shots: list[int] | None,
) -> None:
    """``[suite] data_seeds`` / ``shots_per_class`` leave no table to set the same field.

    Args:
        tables: ``(where, overrides)`` of ``[train]`` and of each ``[tasks.<task>]``.
        data_seeds: ``[suite] data_seeds`` (``None``: not given).
        shots: ``[suite] shots_per_class`` (``None``: not given).
    """
    for where, table in tables:
        if data_seeds is not None and "data_seed" in table:
            raise ConfigError(f"[{where}] data_seed conflicts with [suite] data_seeds")
        if shots is not None and "shots_per_class" in table:
            raise ConfigError(f"[{where}] shots_per_class conflicts with [suite] shots_per_class")


def _alphas_of(
    spec: MethodSpec, alphas: list[Any], paper_alpha: float | None, task: str
) -> list[float | None]:
    if not spec.uses_alpha:
        return [None]
    values: list[float | None] = []
    for alpha in alphas:
        value = paper_alpha if alpha == "paper" else float(alpha)
        if value is None:
            raise ConfigError(f"task {task!r} has no paper alpha; give a number")
        if value not in values:
            values.append(value)
    return values


def _parse_variants(
    raw: Any, specs: Mapping[str, MethodSpec]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """``[variants.<name>]`` tables -> name -> (method, its options)."""
    if not isinstance(raw, dict):
        raise ConfigError("[variants] must be a table of named variant tables")
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, table in raw.items():
        where = f"variants.{name}"
        if name in specs:
            raise ConfigError(f"[{where}] a variant cannot take the name of a method")
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] must be a table/mapping, got {table!r}")
        table = dict(table)
        method = table.pop("method", None)
        if method not in specs:
            raise ConfigError(
                f"[{where}] method must name a registered method ({sorted(specs)}), got {method!r}"
            )
        options = validate_run_overrides(table, where)
        for key in options:
            if key not in specs[method].fields:
                readable = sorted(specs[method].fields)
                raise ConfigError(
                    f"[{where}] {key!r} is not an option of method {method!r}"
                    + (f" (its options: {', '.join(readable)})" if readable else "")
                )
        if not options:
            raise ConfigError(f"[{where}] sets no option: list {method!r} in methods instead")
        variants[name] = (method, options)
    return variants


def _check_method_fields_used(
    overrides: Mapping[str, Any],
    methods: list[str],
    specs: Mapping[str, MethodSpec],
    variants: Mapping[str, tuple[str, dict[str, Any]]],
    task: str,
) -> None:
    """A method option set for a task must be read by at least one of its methods."""
    names = [variants[m][0] if m in variants else m for m in methods]
    for key in overrides:
        if key in METHOD_FIELDS and not any(key in specs[m].fields for m in names):
            users = sorted(m for m, spec in specs.items() if key in spec.fields)
            raise ConfigError(
                f"{key!r} is set for task {task!r} but none of its methods reads it"
                + (f" (read by: {', '.join(users)})" if users else "")
            )


def _strict_yaml_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader without aliases (nested aliases expand exponentially) and
    without duplicate keys (which YAML silently resolves to the last value)."""

    class StrictLoader(yaml.SafeLoader):  # type: ignore[misc, name-defined]
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in suite files", event.start_mark
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a ``.toml``, ``.yaml`` or ``.yml`` file safely (no code execution)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a leading BOM is not TOML
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error})") from None
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
            loaded = yaml.load(text, Loader=_strict_yaml_loader(yaml))  # a SafeLoader
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        return loaded if loaded is not None else {}
    raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")


def load_suite(
    path: Path,
    *,
    known_tasks: dict[str, float | None],
    known_methods: Collection[str] | Mapping[str, MethodSpec],
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
