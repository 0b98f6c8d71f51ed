"""What a task is: data splits, a model, a collator and metrics."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from rdrop import extract_logits
from rdrop_lab.config import ConfigError

__all__ = ["DataError", "Example", "TaskData", "Task", "default_data_dir"]

Collator = Callable[[Sequence["Example"]], tuple[dict[str, torch.Tensor], torch.Tensor]]


class DataError(ValueError):
    """A data file is missing, truncated or malformed; the message names file and line."""


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: float | int


@dataclass
class TaskData:
    """The splits of a task. ``info`` is recorded with every run; ``resources`` holds what
    the model is built from (e.g. a tokenizer fitted on ``train``) and is not recorded."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)

    def with_own_info(self) -> TaskData:
        """The same (shared, e.g. cached) splits and resources with a copy of ``info``, so
        that what one run records into it (``build`` adds the parameter count) stays its
        own."""
        return TaskData(self.train, self.validation, self.test, dict(self.info), self.resources)


def default_data_dir() -> Path:
    """``$RDROP_DATA_DIR``, else ``../shared/data`` next to the working directory or the repo."""
    env = os.environ.get("RDROP_DATA_DIR")
    if env:
        return Path(env)
    candidates = [
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
        Path(__file__).resolve().parents[5] / "shared" / "data",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(
        "could not find the data folder (tried $RDROP_DATA_DIR, ../shared/data); "
        "pass --data-dir or set RDROP_DATA_DIR"
    )


class Task(ABC):
    """A supervised task the runner can train and score.

    ``kind`` is ``"classification"`` (one label per example), ``"regression"`` (one score)
    or ``"sequence"`` (a class id per token: translation, language modelling; the target is
    ``[B, T]`` with padding at ``ignore_index``). Sequence tasks override :meth:`evaluate`.
    """

    name: str
    display_name: str
    kind: Literal["classification", "regression", "sequence"]
    num_labels: int
    metrics: tuple[str, ...]
    primary_metric: str
    higher_is_better: bool = True
    paper_alpha: float | None = None
    #: Label smoothing of the task loss (never of the consistency term).
    label_smoothing: float = 0.0
    #: Target value of padding (excluded from the task loss and the consistency term).
    ignore_index: int = -100
    #: Run settings this task uses unless a run sets them (``rdrop run``, suite files).
    run_defaults: ClassVar[Mapping[str, Any]] = {}
    #: The model's output layer (its dotted name), which ``precision = "bf16"`` runs keep
    #: in float32 (:func:`rdrop_lab.precision.keep_float32`); ``None``: the task has no
    #: such layer and its runs train in float32 only.
    output_module: str | None = None

    # -- Hooks of the regularizer methods (MixUp, Manifold MixUp, FGM). ------------------
    #: Input MixUp mixes ``inputs[mixup_input_key]`` directly (a float tensor, e.g. an
    #: image task's ``"pixel_values"``). ``None`` (text): MixUp mixes the output of the
    #: embedding layer, ``mixing_layers(model)[0]``.
    mixup_input_key: str | None = None
    #: This task's MixUp alpha; ``None``: 1.0 when mixing raw inputs (Zhang et al.'s
    #: CIFAR value, for images) and 0.2 when mixing text embeddings.
    mixup_alpha: float | None = None

    def mixing_layers(self, model: nn.Module) -> list[str]:
        """Names (in ``model.named_modules()``) of the layers Manifold MixUp may mix at;
        the first is the embedding output (input MixUp of a text model mixes there).

        Raises:
            ConfigError: the task does not support (Manifold) MixUp.
        """
        raise ConfigError(
            f"task {self.name!r} defines no mixing layers (Task.mixing_layers): Manifold "
            "MixUp, and MixUp of embeddings, are not available for it"
        )

    #: Whether :meth:`embedding_module` returns a module (known without building a model,
    #: so that suites refuse FGM on other tasks before any run starts).
    has_token_embeddings: bool = False

    def embedding_module(self, model: nn.Module) -> nn.Module | None:
        """The module whose weight FGM perturbs (a text model's word embeddings); ``None``
        when the task has none (the FGM methods then refuse the task)."""
        return None

    def class_of(self, example: Any) -> Hashable:
        """The class of a training example, for few-shot sampling (``example.label``)."""
        return example.label

    @property
    def loss_task(self) -> Literal["cross_entropy", "mse"]:
        return "mse" if self.kind == "regression" else "cross_entropy"

    @property
    def consistency_kind(self) -> Literal["kl", "mse"]:
        """The consistency measure of this task's outputs (and of the probe)."""
        return "mse" if self.kind == "regression" else "kl"

    @abstractmethod
    def load(
        self,
        data_dir: Path,
        train_size: int | None,
        validation_size: int | None,
        data_seed: int,
        test_size: int | None = None,
        *,
        max_length: int | None = None,
    ) -> TaskData:
        """Read the splits (each subsampled to its size, if given, with ``data_seed``).

        ``max_length`` is the run's sequence length, for tasks whose examples are cut from
        a running text (language modelling); others truncate in their collator instead.
        """

    @abstractmethod
    def build(
        self, *, dropout: float | None, max_length: int, data: TaskData | None = None
    ) -> tuple[nn.Module, Collator]:
        """A fresh model (call after seeding) and the collator for its inputs.

        ``data`` is the loaded splits, for tasks whose tokenizer is fitted on the training
        split; tasks with a pretrained tokenizer ignore it.
        """

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        if self.kind == "regression":
            return logits.reshape(-1).float().cpu().numpy()
        return logits.argmax(dim=-1).cpu().numpy()

    def probe_mask(self, target: torch.Tensor) -> torch.Tensor | None:
        """Which output items the probe compares (real tokens for sequence tasks)."""
        return target != self.ignore_index if self.kind == "sequence" else None

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        collate: Collator,
        batch_size: int,
        *,
        final: bool = False,
    ) -> dict[str, float]:
        """The task's metrics of ``model`` (eval mode, one pass) on ``examples``.

        ``final`` is ``True`` for the single scoring of the held-out test split (tasks
        whose final metric costs more, such as beam search, use it).
        """
        from rdrop_lab import metrics

        was_training = model.training
        model.eval()
        examples = [examples[i] for i in self.evaluation_order(examples, collate)]
        predictions, labels = [], []
        for start in range(0, len(examples), batch_size):
            inputs, target = collate(examples[start : start + batch_size])
            output = model(**inputs)
            logits = extract_logits(output, None)
            predictions.append(self.predictions(logits))
            labels.append(target.numpy())
        model.train(was_training)
        return metrics.compute(self.metrics, np.concatenate(predictions), np.concatenate(labels))

    def evaluation_order(self, examples: Sequence[Example], collate: Collator) -> list[int]:
        """The order in which :meth:`evaluate` batches ``examples`` for ``collate`` (its
        metrics do not depend on it): as given. Tasks with inputs of varying length sort
        them by length, so that each batch pads less."""
        return list(range(len(examples)))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "kind": self.kind,
            "primary_metric": self.primary_metric,
            "metrics": list(self.metrics),
            "higher_is_better": self.higher_is_better,
        }
