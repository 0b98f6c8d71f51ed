"""Manifold MixUp (Verma et al., ICML 2019): MixUp of hidden states at a random layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from rdrop.regularizers._common import (
    check_class_target,
    check_generator,
    check_num_classes,
    check_positive,
    sample_index,
    sample_lam,
    sample_perm,
)
from rdrop.regularizers.mixup import MixedBatch

__all__ = ["ManifoldMixup"]


def mix_rows(hidden: Tensor, lam: float, perm: Tensor, batch_size: int) -> Tensor:
    """``lam * h + (1 - lam) * h[perm]`` within each block of ``batch_size`` rows.

    A hidden state of ``k * B`` rows is ``k`` stacked copies of the batch (the passes of
    :class:`rdrop.RDrop`'s forward on ``[x; x]``): row ``j * B + i`` is mixed with row
    ``j * B + perm[i]``, so every pass mixes the same pairs.
    """
    rows = hidden.shape[0] if hidden.ndim else 0
    if rows == 0 or rows % batch_size:
        raise ValueError(
            f"the hidden state to mix has shape {tuple(hidden.shape)}: its first dimension "
            f"must be a multiple of the target's batch size {batch_size} (the batch in "
            "dim 0; k copies of the batch for k R-Drop passes)"
        )
    blocks = torch.arange(rows // batch_size, device=hidden.device).unsqueeze(1)
    index = (perm.to(hidden.device).unsqueeze(0) + batch_size * blocks).reshape(-1)
    return lam * hidden + (1.0 - lam) * hidden[index]


def _mix_output(output: Any, lam: float, perm: Tensor, batch_size: int, layer: str) -> Any:
    """Mix a layer output: a tensor, or a tuple/list whose first item is the hidden state."""
    if isinstance(output, Tensor):
        return mix_rows(output, lam, perm, batch_size)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        items = [mix_rows(output[0], lam, perm, batch_size), *output[1:]]
        if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
            return type(output)(*items)
        return tuple(items) if isinstance(output, tuple) else items
    raise TypeError(
        f"ManifoldMixup cannot mix the output of layer {layer!r}: it is a "
        f"{type(output).__name__}, not a tensor or a tuple/list whose first item is the "
        "hidden state; choose another layer"
    )


class ManifoldMixup:
    """Manifold MixUp: mix hidden states at one layer, chosen at random per forward.

    For each step a layer ``k`` is drawn uniformly from ``layers``, ``lam ~ Beta(alpha,
    alpha)`` and a permutation ``perm`` of the batch; a forward hook replaces that layer's
    output ``h`` by ``lam * h + (1 - lam) * h[perm]`` and the loss is the mixed
    cross-entropy ``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``
    (:meth:`MixedBatch.loss`).

    For token models, listing the embedding module mixes the input embeddings (the
    paper's layer 0, i.e. input MixUp); sequence hidden states are mixed position by
    position and each row keeps its own attention mask. The batch is dim 0 of the
    hidden state.

    **With R-Drop** (concatenated forward on ``[x; x]``): the hook sees ``k * B`` rows and
    permutes within each block of ``B`` rows (``perm``, ``perm + B``, ...), so all passes
    mix at the same layer with the same ``lam`` and pairs; with ``mode="sequential"`` every
    forward inside the context mixes the same way. Then use
    :func:`rdrop.rdrop_mixup_loss`, or ``RDrop(net, task=rdrop.soft_cross_entropy)``
    called with ``target=mix.soft_targets()``.

    Example:
        >>> import torch, rdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 3))
        >>> mm = rdrop.ManifoldMixup(net, layers=["1", "3"], alpha=2.0)
        >>> x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
        >>> with mm.mixing(y, generator=torch.Generator().manual_seed(0)) as mix:
        ...     logits = net(x)
        >>> mix.layer in ("1", "3")
        True
        >>> mix.loss(logits).backward()

    Args:
        model: the model; the hook lives on it only inside :meth:`mixing`.
        layers: the candidate layers, as submodules of ``model`` or their names in
            ``model.named_modules()`` (e.g. ``"encoder.layer.3"``). A layer's output must
            be a tensor or a tuple/list whose first item is the hidden state (as Hugging
            Face layers return). Pick layers called once per forward: a shared layer
            called twice would be mixed twice.
        alpha: ``Beta(alpha, alpha)`` parameter, ``> 0``; the paper uses 2.0 (default).

    References:
        Verma et al., "Manifold Mixup: Better Representations by Interpolating Hidden
        States", ICML 2019.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module | str],
        alpha: float = 2.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.alpha = check_positive("alpha", alpha)
        self.model = model
        self.layer_names, self.layers = self._resolve_layers(model, layers)
        self._active = False

    @staticmethod
    def _resolve_layers(
        model: nn.Module, layers: Sequence[nn.Module | str]
    ) -> tuple[list[str], list[nn.Module]]:
        if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Sequence):
            raise TypeError(
                "layers must be a list of submodules or of their names, got "
                f"{type(layers).__name__}"
            )
        if not layers:
            raise ValueError("layers must name at least one layer of the model")
        by_name = dict(model.named_modules())
        names_by_id = {id(module): name for name, module in by_name.items()}
        names: list[str] = []
        modules: list[nn.Module] = []
        for i, layer in enumerate(layers):
            if isinstance(layer, str):
                if layer not in by_name:
                    close = [n for n in by_name if n and (layer in n or n in layer)][:5]
                    raise ValueError(
                        f"layers[{i}]={layer!r} is not a module name of the model"
                        + (f" (similar: {close})" if close else "")
                        + "; see model.named_modules()"
                    )
                names.append(layer)
                modules.append(by_name[layer])
            elif isinstance(layer, nn.Module):
                if id(layer) not in names_by_id:
                    raise ValueError(f"layers[{i}] ({type(layer).__name__}) is not part of model")
                names.append(names_by_id[id(layer)])
                modules.append(layer)
            else:
                raise TypeError(
                    f"layers[{i}] must be an nn.Module or a module name, got {type(layer).__name__}"
                )
        return names, modules

    @contextmanager
    def mixing(
        self,
        target: Tensor,
        *,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[MixedBatch]:
        """Mix at a random layer for the forwards run inside the ``with`` block.

        ``lam``, ``perm`` and the layer are drawn on entry (so the yielded
        :class:`MixedBatch` and its :meth:`~MixedBatch.soft_targets` are usable before the
        forward); the hook is removed on exit, also on an error. Exiting without the layer
        having been called raises ``RuntimeError`` (the loss would be mixed, the model's
        hidden states not).

        Args:
            target: integer class ids ``[B]`` or ``[B, T]`` of the (unmixed) batch.
            num_classes: optional, as in :func:`rdrop.mixup`.
            generator: a ``torch.Generator`` for the layer, ``lam`` and ``perm``.

        Yields:
            A :class:`MixedBatch` with ``inputs=None`` and ``layer`` = the chosen name.
        """
        if self._active:
            raise RuntimeError("ManifoldMixup.mixing() is already active: it cannot be nested")
        num_classes = check_num_classes(num_classes)
        check_generator(generator)
        check_class_target(target, num_classes)
        index = sample_index(len(self.layers), generator)
        lam = sample_lam(self.alpha, generator)
        batch_size = target.shape[0]
        perm = sample_perm(batch_size, generator, target.device)
        name = self.layer_names[index]
        mix = MixedBatch(None, target, target[perm], lam, perm, num_classes, name)
        calls = 0

        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            nonlocal calls
            calls += 1
            return _mix_output(output, lam, perm, batch_size, name)

        handle = self.layers[index].register_forward_hook(hook)
        self._active = True
        try:
            yield mix
            if calls == 0:
                raise RuntimeError(
                    f"ManifoldMixup: the chosen layer {name!r} was not called inside the "
                    "mixing() block; run the model's forward inside it"
                )
        finally:
            handle.remove()
            self._active = False

    def __call__(
        self,
        *args: Any,
        target: Tensor,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Any, MixedBatch]:
        """One mixed forward: ``model(*args, **kwargs)`` inside :meth:`mixing`.

        Returns:
            ``(model output, MixedBatch)``; the loss is ``mix.loss(logits)``.
        """
        with self.mixing(target, num_classes=num_classes, generator=generator) as mix:
            output = self.model(*args, **kwargs)
        return output, mix

    def __repr__(self) -> str:
        return f"ManifoldMixup(layers={self.layer_names}, alpha={self.alpha})"
