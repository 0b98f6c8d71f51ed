"""The arithmetic of a run (:attr:`rdrop_lab.config.RunConfig.precision`).

``"bf16"`` trains and scores under CPU autocast to bfloat16, with the task's output layer
kept in float32: bfloat16 spaces its values 2**-7 apart relative to their size (0.016 at
2-4, 0.031 at 4-8), about the size of the differences between two dropout passes' logits
or regression outputs that R-Drop's consistency term measures, so the outputs themselves
must not be rounded to it.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> handles = keep_float32(net[1])
    >>> with precision_context("bf16"):
    ...     net[0](torch.ones(1, 4)).dtype, net(torch.ones(1, 4)).dtype
    (torch.bfloat16, torch.float32)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rdrop_lab.config import PRECISIONS, ConfigError

__all__ = ["keep_float32", "precision_context"]


def precision_context(precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context a run's training steps and scoring run in.

    ``"bf16"`` is CPU autocast to bfloat16: linear layers, convolutions, matrix products
    and attention run in bfloat16 (and so do the activations between them), autocast
    computes cross-entropy and MSE in float32, R-Drop's KL upcasts its logits to float32
    itself, and the weights, gradients and optimizer state stay float32. The autocast
    cache of bfloat16 weight copies is off, so a method that changes a weight in place
    between two forwards of one step (FGM) never reads a stale copy. On this project's CPU
    (AVX512-BF16) a MiniLM step on MRPC cost 0.67 of a float32 one
    (``results/pilots/bf16``); a CPU without native bfloat16 emulates it many times slower
    than float32, and such a run warns (:mod:`rdrop_lab.hardware`). ``"fp32"`` changes
    nothing.

    Args:
        precision: ``"fp32"`` or ``"bf16"``.

    Returns:
        A context manager.

    Raises:
        ConfigError: ``precision`` is neither.
    """
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def keep_float32(module: nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
    """Run ``module`` in float32 inside autocast: its floating-point inputs are upcast and
    autocast is off during its forward (and on again after it, also when it raises).

    Args:
        module: e.g. a classifier's output layer.

    Returns:
        The two hook handles; ``handle.remove()`` on both undoes it.
    """
    suspended: list[bool] = []

    def before(_: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if not torch.is_autocast_enabled("cpu"):
            return None
        suspended.append(True)
        torch.set_autocast_enabled("cpu", False)
        return tuple(_upcast(a) for a in args), {k: _upcast(v) for k, v in kwargs.items()}

    def after(_: nn.Module, args: Any, output: Any) -> None:
        if suspended:
            suspended.pop()
            torch.set_autocast_enabled("cpu", True)

    return (
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after, always_call=True),
    )
