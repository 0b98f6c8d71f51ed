"""R-Drop's loss from the hidden states: run a model with its output projection bypassed.

For a model whose last layer is an ``nn.Linear`` to a large vocabulary, the logits of the
doubled batch ``[2B, T, V]`` are the largest tensor of the step. Within
:func:`output_layer_bypassed` that layer returns its input, so the model's "logits" are the
hidden states ``[2B, T, H]`` that would have entered it, and
:func:`rdrop.rdrop_linear_cross_entropy` scores them against the layer's weight in chunks:
the vocabulary logits of the doubled batch never exist at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["output_layer_bypassed", "resolve_output_layer"]


def resolve_output_layer(model: nn.Module, layer: nn.Module | str) -> nn.Linear:
    """The ``nn.Linear`` output projection of ``model``, given by module or by name.

    Raises:
        ValueError: the name is not a submodule, or the module is not part of ``model``.
        TypeError: the layer is not an ``nn.Linear``.
    """
    if isinstance(layer, str):
        try:
            found = model.get_submodule(layer)
        except AttributeError as error:
            raise ValueError(f"output_layer={layer!r} is not a submodule of the model") from error
    elif isinstance(layer, nn.Module):
        if not any(module is layer for module in model.modules()):
            raise ValueError("output_layer must be a submodule of the wrapped model")
        found = layer
    else:
        raise TypeError(
            "output_layer must be an nn.Linear of the model or its name, got "
            f"{type(layer).__name__}"
        )
    if not isinstance(found, nn.Linear):
        raise TypeError(
            f"output_layer must be an nn.Linear (the projection to the classes), got "
            f"{type(found).__name__}"
        )
    return found


def _identity(x: Tensor) -> Tensor:
    return x


@contextmanager
def output_layer_bypassed(layer: nn.Linear) -> Iterator[None]:
    """Within the block ``layer(x)`` returns ``x`` (its hooks still run); restored after.

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(4, 1000)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), head)
        >>> with output_layer_bypassed(head):
        ...     net(torch.randn(2, 3)).shape
        torch.Size([2, 4])
        >>> net(torch.randn(2, 3)).shape
        torch.Size([2, 1000])
    """
    previous = layer.__dict__.get("forward")
    layer.forward = _identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous  # type: ignore[method-assign]
