"""What a task is: data splits, a model, a collator and metrics."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

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
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)


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
    """A supervised task the runner can train and score."""

    name: str
    display_name: str
    kind: Literal["classification", "regression"]
    num_labels: int
    metrics: tuple[str, ...]
    primary_metric: str
    higher_is_better: bool = True
    paper_alpha: float | None = None

    @property
    def loss_task(self) -> Literal["cross_entropy", "mse"]:
        return "mse" if self.kind == "regression" else "cross_entropy"

    @abstractmethod
    def load(
        self,
        data_dir: Path,
        train_size: int | None,
        validation_size: int | None,
        data_seed: int,
        test_size: int | None = None,
    ) -> TaskData:
        """Read the splits (each subsampled to its size, if given, with ``data_seed``)."""

    @abstractmethod
    def build(self, *, dropout: float | None, max_length: int) -> tuple[nn.Module, Collator]:
        """A fresh model (call after seeding) and the collator for its inputs."""

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        if self.kind == "regression":
            return logits.reshape(-1).float().cpu().numpy()
        return logits.argmax(dim=-1).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "kind": self.kind,
            "primary_metric": self.primary_metric,
            "metrics": list(self.metrics),
            "higher_is_better": self.higher_is_better,
        }
