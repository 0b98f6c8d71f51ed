"""Test helpers shared by the integration tests (and the processes they spawn).

``PerCopyDropout`` makes R-Drop comparisons *exact*: its mask depends only on which copy of
the concatenated batch ``[x; x]`` a row belongs to (and the feature position), never on the
row's index, the batch size, the micro-batch or the process. A sample therefore gets the
same two dropout masks whether it is trained in one batch of 8, in two accumulated
micro-batches of 4, or on one of two DDP ranks, and gradients must agree to rounding.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import Tensor, nn

DATA_DIR = Path(
    os.environ.get("RDROP_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data")
)
ROOT = Path(__file__).resolve().parents[2]


class PerCopyDropout(nn.Dropout):
    """Dropout with a fixed mask per copy of the batch (``copies`` stacked copies).

    A ``nn.Dropout`` subclass, so R-Drop's "is there active dropout?" checks see it.
    """

    def __init__(self, p: float, seed: int, copies: int = 2) -> None:
        super().__init__(p)
        self.seed, self.copies = seed, copies

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        copies = self.copies if x.shape[0] % self.copies == 0 else 1
        rows = x.shape[0] // copies
        masks = []
        for c in range(copies):
            g = torch.Generator().manual_seed(1009 * self.seed + c)
            keep = (torch.rand(x.shape[1:], generator=g) >= self.p).to(x.dtype)
            masks.append(keep.expand(rows, *x.shape[1:]))
        return x * torch.cat(masks) / (1.0 - self.p)


def make_deterministic(model: nn.Module, copies: int = 2) -> nn.Module:
    """Replace every ``nn.Dropout`` in ``model`` (in place) by a :class:`PerCopyDropout`."""
    targets = [
        (name, module) for name, module in model.named_modules() if type(module) is nn.Dropout
    ]
    for i, (name, module) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PerCopyDropout(module.p, seed=i + 1, copies=copies))
    return model


class TinyNet(nn.Module):
    """MLP with dropout and an unused parameter (exercises ``find_unused_parameters``)."""

    def __init__(self, d_in: int = 8, hidden: int = 32, classes: int = 3, p: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(p))
        self.head = nn.Linear(hidden, classes)
        self.unused = nn.Linear(hidden, 1)  # never called in forward

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def free_port() -> int:
    """A free TCP port on the loopback interface (for a gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
