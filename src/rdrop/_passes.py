"""R-Drop's forward: one call of the model on ``m`` copies of a batch, split into passes.

Shared by :class:`rdrop.RDrop`, the probe and the Hugging Face Trainer mixin, so that all of
them double the same tensors and fail with the same messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from rdrop._batch import LogitsGetter, extract_logits, repeat_batch, split_passes
from rdrop._branch import branched

__all__ = ["forward_passes"]


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
    branch: tuple[nn.Module, nn.Module] | None = None,
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
        branch: ``(root, module)``: repeat the batch where ``module`` (a submodule of
            ``root``, the model being run) is called instead of at the inputs, so the
            layers below it run once (see :func:`rdrop._branch.branched`).

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
    if branch is not None:
        root, module = branch
        try:
            with branched(root, module, batch_size, num_passes):
                output = model(*args, **kwargs)
        except RuntimeError as error:
            if "branch module was never called" in str(error):
                raise
            raise RuntimeError(
                f"the model failed above the branch point on {num_passes} x {batch_size} "
                f"rows ({type(error).__name__}: {error}). The layers from the branch point "
                "up must take batch-major tensors (every input to them whose first "
                f"dimension is {batch_size} is repeated, so a shared tensor whose first "
                "dimension happens to equal the batch size is repeated too), and the model "
                "must not combine, outside a module, tensors from below the branch point "
                "with ones from above it: choose another branch point"
            ) from error
    else:
        doubled_args = repeat_batch(args, batch_size, num_passes)
        doubled_kwargs = repeat_batch(dict(kwargs), batch_size, num_passes)
        try:
            output = model(*doubled_args, **doubled_kwargs)
        except RuntimeError as error:
            raise RuntimeError(
                f"the model failed on the concatenated R-Drop batch of {num_passes} x "
                f"{batch_size} rows ({type(error).__name__}: {error}). R-Drop runs one "
                f"forward on {num_passes} copies of the batch, so the model must accept a "
                f"batch of {num_passes * batch_size} rows (no buffers of a fixed batch "
                f"size). {remedy}"
            ) from error
    logits = extract_logits(output, logits_key)
    return split_passes(logits, batch_size, num_passes, split_hint), output
