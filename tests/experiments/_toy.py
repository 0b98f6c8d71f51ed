"""Tiny models and tasks for checking the runner's methods against hand-written math."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rdrop_lab.tasks.base import Collator, Example, Task, TaskData

B, T, D, C, V = 4, 3, 6, 3, 12


class ToyText(nn.Module):
    """embeddings -> layer0 -> tanh -> dropout -> mean over tokens -> head."""

    def __init__(self, classes: int = C, p: float = 0.3) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(V, D)
        self.layer0 = nn.Linear(D, D)
        self.dropout = nn.Dropout(p)
        self.head = nn.Linear(D, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return manual_forward(self, input_ids)


def mix_blocks(h: torch.Tensor, lam: float, perm: torch.Tensor, batch: int) -> torch.Tensor:
    """``lam h + (1 - lam) h[perm]`` within each block of ``batch`` rows (written out)."""
    blocks = []
    for start in range(0, h.shape[0], batch):
        block = h[start : start + batch]
        blocks.append(lam * block + (1.0 - lam) * block[perm])
    return torch.cat(blocks)


def manual_forward(
    model: ToyText,
    input_ids: torch.Tensor,
    mix_at: str | None = None,
    lam: float = 1.0,
    perm: torch.Tensor | None = None,
    batch: int = B,
) -> torch.Tensor:
    h = model.embeddings(input_ids)
    if mix_at == "embeddings":
        h = mix_blocks(h, lam, perm, batch)
    h = model.layer0(h)
    if mix_at == "layer0":
        h = mix_blocks(h, lam, perm, batch)
    return model.head(model.dropout(torch.tanh(h)).mean(1))


class ToyImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(8, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixel_values))


def _collate(batch: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = torch.tensor([[int(t) for t in e.texts] for e in batch])
    return {"input_ids": ids}, torch.tensor([e.label for e in batch])


class ToyTask(Task):
    """A classification task over token ids with the regularizer hooks."""

    name = "toy"
    display_name = "Toy"
    kind = "classification"
    num_labels = C
    metrics = ("accuracy",)
    primary_metric = "accuracy"
    has_token_embeddings = True

    def __init__(self, examples: list[Example] | None = None) -> None:
        self.examples = examples or []

    def load(self, data_dir: Path, train_size: int | None, validation_size: int | None,
             data_seed: int, test_size: int | None = None, *, max_length: int | None = None
             ) -> TaskData:  # fmt: skip
        train = self.examples if train_size is None else self.examples[:train_size]
        return TaskData(list(train), self.examples[:2], self.examples[:2], {"train_examples": 0})

    def build(self, *, dropout: float | None, max_length: int, data: TaskData | None = None
              ) -> tuple[nn.Module, Collator]:  # fmt: skip
        return ToyText(), _collate

    def mixing_layers(self, model: nn.Module) -> list[str]:
        return ["embeddings", "layer0"]

    def embedding_module(self, model: nn.Module) -> nn.Module | None:
        return model.embeddings  # type: ignore[return-value]


class ToyRegression(ToyTask):
    name = "toy_regression"
    kind = "regression"
    num_labels = 1
    metrics = ("pearson",)
    primary_metric = "pearson"


class ToyImageTask(ToyTask):
    name = "toy_image"
    mixup_input_key = "pixel_values"
    has_token_embeddings = False

    def mixing_layers(self, model: nn.Module) -> list[str]:
        return Task.mixing_layers(self, model)

    def embedding_module(self, model: nn.Module) -> nn.Module | None:
        return None


def sym_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1/2 (KL(P_a || P_b) + KL(P_b || P_a)), written out."""
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    return 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1)).mean()


def mixed_ce(z: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    return lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[perm])


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def examples(n: int, classes: int = C, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    return [Example(tuple(str(int(t)) for t in row), i % classes) for i, row in enumerate(ids)]
