"""Finding and temporarily changing the dropout of a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["active_dropout_modules", "dropout_rate", "training_batchnorm_modules"]


def active_dropout_modules(model: nn.Module) -> list[str]:
    """Names of modules that apply dropout with ``p > 0`` in the current mode.

    Covers ``nn.Dropout``/``Dropout1d/2d/3d``/``AlphaDropout``/``FeatureAlphaDropout`` and
    ``nn.MultiheadAttention``'s attention dropout. Dropout called functionally inside a
    ``forward`` (``F.dropout(x, p, self.training)``) cannot be seen from outside.
    """
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if (isinstance(module, _DropoutNd) and module.p > 0) or (
            isinstance(module, nn.MultiheadAttention) and module.dropout > 0
        ):
            found.append(name or type(module).__name__)
    return found


def training_batchnorm_modules(model: nn.Module) -> list[str]:
    """Names of BatchNorm layers that compute batch statistics (training mode)."""
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.training
    ]


@contextmanager
def dropout_rate(model: nn.Module, p: float) -> Iterator[None]:
    """Set every dropout probability in ``model`` to ``p`` inside the ``with`` block.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        >>> with dropout_rate(net, 0.5):
        ...     net[1].p
        0.5
        >>> net[1].p
        0.1
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        if isinstance(module, _DropoutNd):
            saved.append((module, "p", module.p))
            module.p = p
        elif isinstance(module, nn.MultiheadAttention):
            saved.append((module, "dropout", module.dropout))
            module.dropout = p
    try:
        yield
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)
