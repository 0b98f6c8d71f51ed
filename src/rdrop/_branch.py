"""Partial-depth R-Drop: run the layers below a branch point once, and only the layers
from the branch point up on ``m`` copies of their input.

Within :func:`branched`, the branch module's inputs are repeated ``m`` times along dim 0
when it is called (a forward pre-hook), and so is every batched input (first dimension
the batch size ``B``) of every module of the model called after it, so that arguments
computed below the branch point, such as attention masks or rotary position embeddings,
are doubled consistently with the hidden states. The dropout masks below the branch point
are then shared by the passes and only the upper layers' dropout differs between them.
One exception to the first-dimension rule: PyTorch's own attention and Transformer
modules take a 2-D mask under the keywords ``attn_mask``, ``mask``, ``src_mask``,
``tgt_mask`` and ``memory_mask`` (e.g. ``nn.Transformer``'s causal ``tgt_mask`` ``[T, T]``)
that every row shares, so for those modules such a mask is never repeated, even when ``T``
equals the batch size. Other modules' arguments follow the first-dimension rule whatever
their name (a model's own ``mask=`` may well be ``[B, T]``).

Cost model (forward and backward), with ``c_low`` and ``c_up`` the costs of the layers
below and from the branch point::

    step cost / plain step = (c_low + m * c_up) / (c_low + c_up)

against ``m`` for full R-Drop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from rdrop._batch import repeat_batch

__all__ = ["branched", "resolve_branch"]

# PyTorch's modules whose 2-D masks under these keywords are ``[L, S]``, one for every row.
_TORCH_ATTENTION = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
_SHARED_MASK_KEYWORDS = frozenset({"attn_mask", "mask", "src_mask", "tgt_mask", "memory_mask"})


def _repeat_inputs(
    module: nn.Module, args: Any, kwargs: dict[str, Any], batch_size: int, times: int
) -> tuple[Any, dict[str, Any]]:
    """The module's arguments with every batched tensor repeated ``times`` along dim 0."""
    shared = _SHARED_MASK_KEYWORDS if isinstance(module, _TORCH_ATTENTION) else frozenset()
    return repeat_batch(args, batch_size, times), {
        key: value
        if key in shared and isinstance(value, Tensor) and value.ndim == 2
        else repeat_batch(value, batch_size, times)
        for key, value in kwargs.items()
    }


def resolve_branch(model: nn.Module, branch_at: nn.Module | str) -> tuple[str, nn.Module]:
    """``(name, module)`` of the branch point, given by module or by dotted name.

    Raises:
        ValueError: the name is not a submodule of ``model``, the module is not part of
            it, or it is ``model`` itself (that is full R-Drop: leave ``branch_at`` unset).
        TypeError: ``branch_at`` is neither a module nor a string.
    """
    names = {id(module): name for name, module in model.named_modules()}
    if isinstance(branch_at, str):
        try:
            module = model.get_submodule(branch_at)
        except AttributeError as error:
            raise ValueError(
                f"branch_at={branch_at!r} is not a submodule of the model (e.g. "
                f"{', '.join(repr(n) for n in list(names.values())[1:4])})"
            ) from error
    elif isinstance(branch_at, nn.Module):
        module = branch_at
        if id(module) not in names:
            raise ValueError("branch_at must be a submodule of the wrapped model")
    else:
        raise TypeError(
            "branch_at must be a submodule of the model or its name, got "
            f"{type(branch_at).__name__}"
        )
    if module is model:
        raise ValueError("branch_at is the whole model: that is full R-Drop, leave branch_at unset")
    return names[id(module)], module


@contextmanager
def branched(model: nn.Module, branch: nn.Module, batch_size: int, times: int) -> Iterator[None]:
    """Within the block, a forward of ``model`` on a batch of ``batch_size`` rows runs
    the layers from ``branch`` up on ``times`` copies of their input.

    Example:
        >>> import torch
        >>> lower, upper = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        >>> net = torch.nn.Sequential(lower, torch.nn.ReLU(), upper)
        >>> with branched(net, upper, batch_size=5, times=2):
        ...     net(torch.randn(5, 3)).shape
        torch.Size([10, 2])

    Raises:
        RuntimeError: the branch module was not called during the forward.
    """
    started = False

    def double(module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        nonlocal started
        if module is branch:
            started = True
        elif not started:
            return None
        return _repeat_inputs(module, args, kwargs, batch_size, times)

    handles = [
        module.register_forward_pre_hook(double, with_kwargs=True) for module in model.modules()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if not started:
        raise RuntimeError(
            "branch_at: the branch module was never called in the forward, so every layer "
            "ran once; give a module on the forward path"
        )
