"""Duplicating nested model inputs along the batch dimension, and finding logits in outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LogitsGetter",
    "check_logits_key",
    "extract_logits",
    "find_batch_size",
    "repeat_batch",
    "split_passes",
]

LogitsGetter = str | int | Callable[[Any], Tensor] | None


def find_batch_size(obj: Any) -> int | None:
    """The first dimension of the first tensor (depth-first) in a nested structure."""
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.ndim > 0 else None
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, (tuple, list)):
        values = obj
    else:
        return None
    for value in values:
        size = find_batch_size(value)
        if size is not None:
            return size
    return None


def _rebuild(obj: Any, items: Any) -> Any:
    """A new container of ``obj``'s type holding ``items`` (never mutates ``obj``)."""
    if isinstance(obj, Mapping):
        try:
            return type(obj)(items)
        except TypeError:
            return dict(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*items)
    if isinstance(obj, tuple):
        return tuple(items)
    try:
        return type(obj)(items)
    except TypeError:
        return list(items)


def repeat_batch(obj: Any, batch_size: int, times: int) -> Any:
    """Concatenate ``times`` copies of every batched tensor in ``obj`` along dim 0.

    A tensor is *batched* when its first dimension equals ``batch_size``; other tensors,
    scalars and non-tensor leaves are passed through unchanged. Containers (tuples, lists,
    namedtuples, dicts and other mappings such as a tokenizer's ``BatchEncoding``) are
    rebuilt, so the caller's objects are never mutated.

    Example:
        >>> import torch
        >>> batch = {"input_ids": torch.ones(2, 5), "mask": torch.ones(2, 5), "n": 3}
        >>> {k: getattr(v, "shape", v) for k, v in repeat_batch(batch, 2, 2).items()}
        {'input_ids': torch.Size([4, 5]), 'mask': torch.Size([4, 5]), 'n': 3}
    """
    if isinstance(obj, Tensor):
        if obj.ndim > 0 and obj.shape[0] == batch_size:
            return torch.cat([obj] * times, dim=0)
        return obj
    if isinstance(obj, Mapping):
        return _rebuild(obj, [(k, repeat_batch(v, batch_size, times)) for k, v in obj.items()])
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, [repeat_batch(v, batch_size, times) for v in obj])
    return obj


def check_logits_key(getter: Any) -> LogitsGetter:
    """``getter`` if it is a valid ``logits_key`` (``None``, a str, an int or a callable),
    else a ``TypeError``: found when the wrapper is built, not at its first forward."""
    if getter is None or isinstance(getter, str) or callable(getter):
        return getter
    if isinstance(getter, int) and not isinstance(getter, bool):
        return getter
    raise TypeError(
        f"logits_key must be None, a str, an int or a callable, got {type(getter).__name__}"
    )


def extract_logits(output: Any, getter: LogitsGetter = None) -> Tensor:
    """Find the logits tensor in a model output, by the rule of :class:`rdrop.RDrop`'s
    ``logits_key``.

    Example:
        >>> import torch, rdrop
        >>> z = torch.zeros(2, 3)
        >>> rdrop.extract_logits({"logits": z, "loss": None}) is z
        True
        >>> rdrop.extract_logits((z, "hidden")) is z
        True
        >>> rdrop.extract_logits({"scores": z}, "scores") is z
        True

    Args:
        output: what a model returned: a tensor, a mapping, an object with ``.logits``
            (Hugging Face outputs), or a tuple or list.
        getter: ``None`` tries, in order: the output itself if it is a tensor, the
            ``"logits"`` key of a mapping, a ``.logits`` attribute, the first item of a
            tuple or list. A string is a mapping key or attribute name, an int a tuple
            index, a callable is applied to the output.

    Returns:
        The logits tensor.

    Raises:
        ValueError: naming ``logits_key`` when nothing (or no tensor) is found there.
        TypeError: when ``getter`` is of another type.
    """
    getter = check_logits_key(getter)
    if callable(getter):
        found = getter(output)
    elif isinstance(getter, str):
        if isinstance(output, Mapping) and getter in output:
            found = output[getter]
        elif hasattr(output, getter):
            found = getattr(output, getter)
        else:
            raise ValueError(
                f"logits_key={getter!r}: the model output of type {type(output).__name__} "
                f"has no key or attribute {getter!r}"
                + (f" (keys: {list(output.keys())})" if isinstance(output, Mapping) else "")
            )
    elif isinstance(getter, int) and not isinstance(getter, bool):
        if not isinstance(output, (tuple, list)) or not -len(output) <= getter < len(output):
            raise ValueError(
                f"logits_key={getter}: the model output of type {type(output).__name__} is "
                "not a tuple/list long enough to index"
            )
        found = output[getter]
    else:  # None: the automatic rule
        if isinstance(output, Tensor):
            found = output
        elif isinstance(output, Mapping) and "logits" in output:
            found = output["logits"]
        elif hasattr(output, "logits"):
            found = output.logits
        elif isinstance(output, (tuple, list)) and output:
            found = output[0]
        else:
            raise ValueError(
                f"could not find logits in the model output of type {type(output).__name__}: "
                "it is not a tensor, a tuple/list, a mapping with a 'logits' key or an object "
                "with a .logits attribute; pass logits_key= (a key, attribute name, tuple "
                "index or a callable)"
            )
    if not isinstance(found, Tensor):
        raise ValueError(
            f"the logits found in the model output (logits_key={getter!r}) are a "
            f"{type(found).__name__}, not a tensor; pass logits_key= to select the logits"
        )
    return found


def split_passes(logits: Tensor, batch_size: int, passes: int, hint: str) -> list[Tensor]:
    """Split logits of ``passes`` concatenated copies of a batch into one view per pass.

    Raises a ``ValueError`` (ending with ``hint``) when dim 0 is not ``passes * batch_size``,
    and one that says so for an empty batch.
    """
    if batch_size == 0:
        raise ValueError(
            "the batch is empty (0 rows): R-Drop compares dropout passes of at least one "
            "example; skip empty batches before the call"
        )
    if logits.ndim == 0 or logits.shape[0] != passes * batch_size:
        raise ValueError(
            f"the model output has shape {tuple(logits.shape)} on an input batch of "
            f"{passes} x {batch_size} rows; R-Drop expects the batch in dim 0 of the output "
            f"({passes * batch_size}); {hint}"
        )
    return list(logits.split(batch_size, dim=0))
