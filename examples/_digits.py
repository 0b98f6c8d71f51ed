"""Real data for the examples: scikit-learn's handwritten digits (1,797 8x8 images).

It ships inside scikit-learn, so the examples run offline on a fresh machine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def digits(seed: int = 0, n_val: int = 297) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) datasets of ``x`` float32 ``[64]`` in [0, 1] and ``y`` int64 in 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover
        raise SystemExit("the examples need scikit-learn: pip install scikit-learn") from error
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def mlp(hidden: int = 128, dropout: float = 0.3) -> nn.Module:
    """A small MLP with dropout (R-Drop needs active dropout)."""
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )
