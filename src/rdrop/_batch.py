"""Duplicating nested model inputs along the batch dimension, and finding logits in outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LogitsGetter",
    "extract_logits",
    "find_batch_size",
    "forward_passes",
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
    elif getter is None:
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
    else:
        raise TypeError(
            f"logits_key must be None, a str, an int or a callable, got {type(getter).__name__}"
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


def forward_passes(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    batch_size: int,
    num_passes: int,
    logits_key: LogitsGetter = None,
    remedy: str,
    split_hint: str,
) -> tuple[list[Tensor], Any]:
    """Run ``model`` once on ``num_passes`` concatenated copies of a batch and split its
    logits into one view per pass: R-Drop's forward on ``[x; x]``.

    Shared by :class:`rdrop.RDrop`, the probe and the Hugging Face Trainer mixin, so that
    all of them double the same tensors and fail with the same messages. With
    ``num_passes=1`` it is a plain forward.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 3))
        >>> passes, output = forward_passes(net, (torch.randn(2, 4),), {}, batch_size=2,
        ...                                 num_passes=2, remedy="", split_hint="")
        >>> [tuple(p.shape) for p in passes], tuple(output.shape)
        ([(2, 3), (2, 3)], (4, 3))

    Args:
        model: the callable to run (a module, or a wrapped module's ``__call__``).
        args, kwargs: the model's inputs; their batched tensors (first dimension
            ``batch_size``) are repeated along dim 0 (see :func:`repeat_batch`).
        batch_size: rows of one copy of the batch (``> 0``).
        num_passes: copies of the batch in the one forward (``>= 1``).
        logits_key: where the logits are in the output (see :func:`extract_logits`).
        remedy: the sentence ending the error when the model fails on the larger batch.
        split_hint: the sentence ending the error when the output is not batch-major.

    Returns:
        ``(passes, output)``: the logits of each copy (views of one tensor, pass order)
        and the model's raw output on the concatenated batch.

    Raises:
        RuntimeError: the model failed on the concatenated batch (the cause is chained).
        ValueError: an empty batch, or logits whose dim 0 is not
            ``num_passes * batch_size``.
    """
    if num_passes == 1:
        output = model(*args, **kwargs)
        return [extract_logits(output, logits_key)], output
    doubled_args = repeat_batch(args, batch_size, num_passes)
    doubled_kwargs = repeat_batch(dict(kwargs), batch_size, num_passes)
    try:
        output = model(*doubled_args, **doubled_kwargs)
    except RuntimeError as error:
        raise RuntimeError(
            f"the model failed on the concatenated R-Drop batch of {num_passes} x "
            f"{batch_size} rows ({type(error).__name__}: {error}). R-Drop runs one forward "
            f"on {num_passes} copies of the batch, so the model must accept a batch of "
            f"{num_passes * batch_size} rows (no buffers of a fixed batch size). {remedy}"
        ) from error
    logits = extract_logits(output, logits_key)
    return split_passes(logits, batch_size, num_passes, split_hint), output
