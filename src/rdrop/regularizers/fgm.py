"""FGM adversarial training on embeddings (Miyato et al., ICLR 2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from rdrop.regularizers._common import check_positive

__all__ = ["FGM", "fgm_step"]


def _perturbation(grad: Tensor, epsilon: float) -> Tensor:
    """``epsilon * g / ||g||_2`` (norm over the whole tensor) in float32 or wider; ``0``
    when the norm is zero or not finite."""
    if grad.is_sparse:
        grad = grad.coalesce().to_dense()
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    norm = torch.linalg.vector_norm(grad)
    usable = (norm > 0) & torch.isfinite(norm)
    # torch.where, not a Python branch: no host synchronisation, and no NaN from 0/0 or inf.
    return torch.where(usable, grad * (epsilon / norm.clamp_min(1e-30)), torch.zeros_like(grad))


class FGM:
    """Fast gradient method on embedding weights: ``r = epsilon * g / ||g||_2``.

    After a backward of the clean loss, ``g`` is the gradient of that loss w.r.t. an
    embedding weight; :meth:`attack` adds ``r`` to the weight (keeping an exact copy of
    the original), the adversarial loss is computed and backpropagated on the perturbed
    embeddings, then :meth:`restore` puts the original weight back before the optimizer
    step. ``||g||_2`` is the L2 norm over the **whole weight tensor** (each matched
    parameter separately), as in the common FGM implementation for text models, so
    ``||r||_2 = epsilon`` for the batch as a whole; Miyato et al. normalize per example
    over that example's embedded sequence, so the paper's epsilon is not on the same
    scale. A zero or non-finite gradient norm (e.g. a step skipped by a ``GradScaler``)
    gives ``r = 0``.

    The usual step (:func:`fgm_step` does steps 2–4)::

        optimizer.zero_grad()                 # 1. g must be this batch's gradient only
        loss_fn().backward()                  # 2. clean loss
        with fgm.perturbed():                 # 3. attack() ... restore()
            adversarial_loss_fn().backward()  #    gradients add up
        optimizer.step()                      # 4.

    Example:
        >>> import torch, rdrop
        >>> emb = torch.nn.Embedding(10, 4)
        >>> model = torch.nn.ModuleDict({"word_embeddings": emb, "head": torch.nn.Linear(4, 2)})
        >>> fgm = rdrop.FGM(model, epsilon=1.0)          # matches "word_embeddings.weight"
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> loss_fn = lambda: rdrop.task_loss(model["head"](emb(ids).mean(1)), y)
        >>> loss_fn().backward()
        >>> original = emb.weight.detach().clone()
        >>> with fgm.perturbed():
        ...     round((emb.weight - original).norm().item(), 4)
        ...     loss_fn().backward()
        1.0
        >>> torch.equal(emb.weight, original)
        True

    Args:
        model: the model being trained.
        epsilon: the L2 norm of the perturbation, ``> 0`` (default 1.0).
        param_names: which parameters to perturb: a substring (or several) of their
            names in ``model.named_parameters()`` (default ``"word_embeddings"``, the
            Hugging Face name), or a module (e.g. ``model.get_input_embeddings()``) whose
            parameters are perturbed. Only parameters with ``requires_grad`` count.

    References:
        Miyato, Dai, Goodfellow, "Adversarial Training Methods for Semi-Supervised Text
        Classification", ICLR 2017; Goodfellow et al., "Explaining and Harnessing
        Adversarial Examples", ICLR 2015.
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        param_names: str | Sequence[str] | nn.Module = ("word_embeddings",),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.epsilon = check_positive("epsilon", epsilon)
        self.model = model
        self.params = self._select(model, param_names)
        self._backup: dict[str, Tensor] = {}

    @staticmethod
    def _select(
        model: nn.Module, param_names: str | Sequence[str] | nn.Module
    ) -> dict[str, nn.Parameter]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if isinstance(param_names, nn.Module):
            wanted = {id(p) for p in param_names.parameters()}
            selected = {n: p for n, p in named if id(p) in wanted}
            if not selected:
                raise ValueError(
                    f"param_names: the module {type(param_names).__name__} has no trainable "
                    "parameter of the model"
                )
            return selected
        patterns = (param_names,) if isinstance(param_names, str) else param_names
        if not isinstance(patterns, Sequence) or not all(isinstance(s, str) for s in patterns):
            raise TypeError(
                "param_names must be a str, a sequence of str or an nn.Module, got "
                f"{type(param_names).__name__}"
            )
        if not patterns or not all(patterns):
            raise ValueError(f"param_names must hold non-empty strings, got {param_names!r}")
        selected = {n: p for n, p in named if any(s in n for s in patterns)}
        if not selected:
            shown = [n for n, _ in named][:8]
            raise ValueError(
                f"param_names={param_names!r} matches no trainable parameter of the model; "
                f"its parameters are named e.g. {shown}. Pass a substring of the embedding "
                "weight's name or the embedding module itself"
            )
        return selected

    @property
    def is_perturbed(self) -> bool:
        """Whether :meth:`attack` has perturbed the weights and :meth:`restore` is due."""
        return bool(self._backup)

    @torch.no_grad()
    def attack(self) -> None:
        """Add ``r = epsilon * g / ||g||_2`` to every selected parameter (after a backward)."""
        if self._backup:
            raise RuntimeError("FGM.attack() called twice without restore() in between")
        missing = [n for n, p in self.params.items() if p.grad is None]
        if missing:
            raise RuntimeError(
                f"FGM.attack() needs the gradient of the clean loss, but {missing} has no "
                ".grad yet: call loss.backward() before attack()"
            )
        for name, param in self.params.items():
            assert param.grad is not None
            r = _perturbation(param.grad, self.epsilon)
            self._backup[name] = param.detach().clone()
            param.add_(r.to(param.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the exact original weights back (a no-op when not perturbed)."""
        for name, original in self._backup.items():
            self.params[name].copy_(original)
        self._backup.clear()

    @contextmanager
    def perturbed(self) -> Iterator[None]:
        """``attack()`` on entry, ``restore()`` on exit (also on an error).

        Run the adversarial forward **and** its backward inside the block.
        """
        self.attack()
        try:
            yield
        finally:
            self.restore()

    def __repr__(self) -> str:
        return f"FGM(epsilon={self.epsilon}, params={list(self.params)})"


def fgm_step(
    fgm: FGM,
    clean_loss: Callable[[], Tensor],
    adversarial_loss: Callable[[], Tensor] | None = None,
    *,
    backward: Callable[[Tensor], Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """The two backward passes of an FGM step; the caller zeroes grads before and steps after.

    Runs ``backward(clean_loss())``, then, with the embeddings perturbed
    (:meth:`FGM.perturbed`), ``backward(adversarial_loss())`` (default: ``clean_loss``
    again), so the gradients of both losses add up in ``.grad``. ``backward`` is the
    training loop's own: ``Tensor.backward`` by default, Lightning's
    ``self.manual_backward``, ``accelerator.backward``, or
    ``lambda loss: scaler.scale(loss).backward()`` with a ``GradScaler``. FGM's attack
    reads the embedding gradient, so with a scaler it is the scaled gradient; FGM
    normalises it, so the scale cancels.

    **With R-Drop** the rule used in this library: the clean loss is the R-Drop loss on
    the doubled batch (``lambda: wrapped(x, target=y).loss``) and the adversarial loss is
    the **task loss of a single dropout pass** on the perturbed embeddings
    (``lambda: rdrop.task_loss(wrapped.model(x), y)``). That is Miyato et al.'s adversarial
    term exactly; the consistency term already acts on the clean batch, and an R-Drop loss
    on a perturbed doubled batch would add a second regularizer neither paper defines and
    cost another doubled forward. ``g`` is then the gradient of the whole clean R-Drop loss
    (task + consistency), as in the usual "clean backward, attack" recipe. (Leaving
    ``adversarial_loss`` at its default with a wrapper as the clean loss would run that
    doubled forward and advance the wrapper's ``step`` counter twice per step.)

    Example:
        >>> import torch, rdrop
        >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(),
        ...                           torch.nn.Dropout(0.1), torch.nn.Linear(8, 2))
        >>> fgm = rdrop.FGM(net, epsilon=0.5, param_names=net[0])
        >>> wrapped = rdrop.RDrop(net, alpha=1.0)
        >>> ids, y = torch.randint(0, 10, (3, 2)), torch.tensor([0, 1, 1])
        >>> clean, adv = rdrop.fgm_step(
        ...     fgm,
        ...     lambda: wrapped(ids, target=y).loss,
        ...     lambda: rdrop.task_loss(wrapped.model(ids), y),
        ... )
        >>> fgm.is_perturbed
        False

    Args:
        fgm: the :class:`FGM` attacker.
        clean_loss: computes the clean loss (a scalar tensor).
        adversarial_loss: computes the loss on the perturbed embeddings.
        backward: runs the backward pass of a loss (default ``loss.backward()``).

    Returns:
        ``(clean loss, adversarial loss)``, detached.
    """
    if not isinstance(fgm, FGM):
        raise TypeError(f"fgm must be an rdrop.FGM, got {type(fgm).__name__}")
    if backward is not None and not callable(backward):
        raise TypeError(f"backward must be callable (loss -> None), got {backward!r}")
    run_backward = backward if backward is not None else Tensor.backward
    clean = clean_loss()
    run_backward(clean)
    with fgm.perturbed():
        adversarial = (adversarial_loss or clean_loss)()
        run_backward(adversarial)
    return clean.detach(), adversarial.detach()
