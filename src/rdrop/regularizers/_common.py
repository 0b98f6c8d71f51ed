"""Argument checks and the random draws shared by MixUp and Manifold MixUp."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from rdrop._checks import is_real_number

__all__ = [
    "check_class_target",
    "check_generator",
    "check_num_classes",
    "check_positive",
    "sample_index",
    "sample_lam",
    "sample_perm",
]


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; ``TypeError``/``ValueError`` naming ``name`` unless finite > 0."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_num_classes(num_classes: int | None) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes


def check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def check_class_target(target: Tensor, num_classes: int | None) -> None:
    """``target``: integer class ids with a batch dimension, all ``< num_classes``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.ndim == 0 or target.shape[0] == 0:
        raise ValueError(
            f"target must have a non-empty batch dimension (dim 0), got shape {tuple(target.shape)}"
        )
    if num_classes is not None and target.numel() and int(target.max()) >= num_classes:
        raise ValueError(
            f"target holds class ids >= num_classes={num_classes}: max {int(target.max())}"
        )


def _device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def sample_lam(alpha: float, generator: torch.Generator | None) -> float:
    """One draw of ``lambda ~ Beta(alpha, alpha)``.

    The draw is made by the standard library's exact Beta sampler, seeded from the torch
    random stream (``generator``, or torch's global generator when ``None``), so
    ``torch.manual_seed`` / a seeded generator make it reproducible and no other random
    stream is touched.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_device(generator)))
    return random.Random(seed).betavariate(alpha, alpha)


def sample_perm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A uniformly random permutation of ``range(n)`` on ``device``."""
    return torch.randperm(n, generator=generator, device=_device(generator)).to(device)


def sample_index(n: int, generator: torch.Generator | None) -> int:
    """A uniformly random integer in ``[0, n)``."""
    return int(torch.randint(0, n, (1,), generator=generator, device=_device(generator)))
