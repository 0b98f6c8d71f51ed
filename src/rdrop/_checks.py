"""Argument checks shared by the public functions (one rule, one error message each)."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor


def is_real_number(value: Any) -> bool:
    """A real number, NumPy's included, that is not a ``bool``."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, meaning: str = "") -> int:
    """``value`` as an int ``>= minimum``: ``TypeError`` for a non-integer (``bool``
    included; NumPy integers are accepted), ``ValueError`` below ``minimum``; ``meaning``
    is appended to the range error.

    Example:
        >>> check_int("num_passes", 3, 2)
        3
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{meaning}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``, else a ``TypeError`` naming ``name``: a string such
    as ``"False"`` is truthy and would silently mean ``True``.

    Example:
        >>> check_bool("stop_gradient", False)
        False
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_label_smoothing(value: Any) -> float:
    """``value`` as a float in ``[0, 1)``.

    Example:
        >>> check_label_smoothing(0.1)
        0.1
    """
    if not is_real_number(value):
        raise TypeError(f"label_smoothing must be a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
    return float(value)


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a finite float ``>= 0`` (``TypeError`` for a non-number, ``bool``
    included; ``ValueError`` for a negative, infinite or NaN value).

    Example:
        >>> check_alpha(5)
        5.0
    """
    if not is_real_number(alpha):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not alpha >= 0.0 or alpha == float("inf"):  # also rejects NaN
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return alpha


def check_scheduled_alpha(value: Any, step: int) -> float:
    """:func:`check_alpha` for the value an alpha schedule returned at ``step``; any
    error is a ``ValueError`` that names the schedule and the step."""
    try:
        return check_alpha(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"alpha schedule returned {value!r} at step {step}: {error}") from None


def check_mask(mask: Tensor | None, item_shape: torch.Size, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a boolean torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = keep), got {mask.dtype}")
    if mask.shape != item_shape:
        raise ValueError(
            f"mask must have the item shape {tuple(item_shape)} ({what}), got {tuple(mask.shape)}"
        )


def check_class_ids(logits_shape: torch.Size, target: Tensor, ignore_index: int) -> Tensor:
    """Validate class-id targets for logits of ``logits_shape``; return ``target != ignore``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError(
            "target must hold integer class indices for task='cross_entropy', "
            f"got dtype {target.dtype}"
        )
    if target.shape != logits_shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' shape without "
            f"the class dimension, {tuple(logits_shape[:-1])}"
        )
    num_classes = logits_shape[-1]
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"target holds class ids outside [0, {num_classes}) (other than "
            f"ignore_index={ignore_index}): e.g. {target[bad][:5].tolist()}"
        )
    return valid
