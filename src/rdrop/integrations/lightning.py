"""R-Drop in Lightning: compute the loss inside ``training_step`` and log its parts.

A Lightning ``Callback`` cannot change the loss a ``training_step`` returns, so R-Drop
lives in the step itself: wrap the network in :class:`rdrop.RDrop` (one forward on
``[x; x]``, a plain single pass in eval mode, so validation needs nothing special) and
return its loss. :class:`RDropLightningMixin` adds :meth:`~RDropLightningMixin.rdrop_step`
to a ``LightningModule``, which does that and logs ``train/loss``, ``train/task_loss`` and
``train/consistency_loss``; :func:`log_rdrop` logs any :class:`rdrop.RDropOutput`.

This module does not import Lightning: it works with ``lightning`` and with
``pytorch_lightning`` alike. Lightning divides the returned loss by
``accumulate_grad_batches`` itself, and R-Drop's loss is a per-batch mean, so nothing is
divided twice.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from rdrop.losses import RDropOutput
from rdrop.wrapper import RDrop

__all__ = ["RDropLightningMixin", "log_rdrop"]


class _Loggable(Protocol):
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None: ...


def log_rdrop(
    module: _Loggable,
    output: RDropOutput,
    prefix: str = "train",
    *,
    prog_bar: bool = True,
    batch_size: int | None = None,
    **log_kwargs: Any,
) -> None:
    """Log the parts of an R-Drop step with ``module.log``.

    Logs ``{prefix}/loss``, ``{prefix}/task_loss``, ``{prefix}/consistency_loss`` (the
    term ``D`` before ``alpha / 2``; the authors' check is that it stays small) and
    ``{prefix}/alpha``, all detached.

    Example:
        >>> import torch, rdrop
        >>> from rdrop.integrations.lightning import log_rdrop
        >>> class Recorder:  # stands in for a LightningModule
        ...     def __init__(self): self.logged = {}
        ...     def log(self, name, value, **kwargs): self.logged[name] = float(value)
        >>> out = rdrop.rdrop_loss([torch.zeros(2, 3), torch.ones(2, 3)], torch.tensor([0, 1]))
        >>> module = Recorder(); log_rdrop(module, out)
        >>> sorted(module.logged)
        ['train/alpha', 'train/consistency_loss', 'train/loss', 'train/task_loss']

    Args:
        module: the ``LightningModule`` (anything with Lightning's ``log`` signature).
        output: what :class:`rdrop.RDrop` or :func:`rdrop.rdrop_loss` returned.
        prefix: name prefix, e.g. ``"train"``.
        prog_bar: show the loss and the consistency term in the progress bar.
        batch_size: passed to ``log`` (Lightning otherwise infers it from the batch).
        **log_kwargs: further ``LightningModule.log`` options, e.g. ``sync_dist=True``.
    """
    if not isinstance(output, RDropOutput):
        raise TypeError(f"output must be an rdrop.RDropOutput, got {type(output).__name__}")
    if batch_size is not None:
        log_kwargs["batch_size"] = batch_size
    module.log(f"{prefix}/loss", output.loss.detach(), prog_bar=prog_bar, **log_kwargs)
    module.log(f"{prefix}/task_loss", output.task_loss.detach(), **log_kwargs)
    module.log(
        f"{prefix}/consistency_loss",
        output.consistency_loss.detach(),
        prog_bar=prog_bar,
        **log_kwargs,
    )
    module.log(f"{prefix}/alpha", float(output.alpha), **log_kwargs)


class RDropLightningMixin:
    """Mixin for a ``LightningModule``: :meth:`rdrop_step` inside ``training_step``.

    Example::

        import lightning as L
        import torch, rdrop
        from rdrop.integrations.lightning import RDropLightningMixin

        class Classifier(RDropLightningMixin, L.LightningModule):
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = rdrop.RDrop(net, alpha=1.0)   # eval mode: one plain pass

            def training_step(self, batch, batch_idx):
                x, y = batch
                return self.rdrop_step(self.net, x, target=y)  # logs train/consistency_loss

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val/acc", (self.net(x).argmax(-1) == y).float().mean())

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        L.Trainer(max_steps=1000, accumulate_grad_batches=2).fit(Classifier(net), loader)
    """

    def rdrop_step(
        self,
        model: RDrop,
        *args: Any,
        target: Tensor | None,
        prefix: str = "train",
        log_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """One R-Drop training step: ``model(*args, target=target, **kwargs)``, logged.

        Args:
            model: the :class:`rdrop.RDrop`-wrapped network (a submodule of ``self``, so
                Lightning moves it, switches its mode and optimizes it).
            *args, **kwargs: the network's inputs.
            target: the labels; ``None`` for an unlabeled batch (consistency term only,
                semi-supervised R-Drop).
            prefix: prefix of the logged names.
            log_kwargs: options for :func:`log_rdrop` (e.g. ``{"sync_dist": True}``).

        Returns:
            The loss to return from ``training_step``.
        """
        if not isinstance(model, RDrop):
            raise TypeError(
                f"model must be an rdrop.RDrop wrapper, got {type(model).__name__}: "
                "wrap the network once in __init__, e.g. self.net = rdrop.RDrop(net, alpha=1.0)"
            )
        if not model.training:
            raise RuntimeError(
                "rdrop_step is a training step but the RDrop wrapper is in eval mode; call it "
                "from training_step (Lightning puts the module in training mode there)"
            )
        output = (
            model(*args, target=target, **kwargs)
            if target is not None
            else model.unlabeled(*args, **kwargs)
        )
        batch_size = output.logits.shape[0] if output.logits is not None else None
        log_rdrop(self, output, prefix, batch_size=batch_size, **(log_kwargs or {}))  # type: ignore[arg-type]
        return output.loss
