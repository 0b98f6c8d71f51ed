"""MixUp (Zhang et al., ICLR 2018), its mixed loss, and MixUp combined with R-Drop.

MixUp trains on convex combinations of pairs of examples and of their labels::

    lambda ~ Beta(alpha, alpha),   perm = a random permutation of the batch
    x_mix  = lambda * x + (1 - lambda) * x[perm]
    loss   = lambda * CE(f(x_mix), y) + (1 - lambda) * CE(f(x_mix), y[perm])

The loss is linear in the target, so it equals the cross-entropy against the soft target
``lambda * onehot(y) + (1 - lambda) * onehot(y[perm])`` (:meth:`MixedBatch.soft_targets`,
:func:`soft_cross_entropy`), label smoothing included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rdrop._checks import check_class_ids, check_label_smoothing
from rdrop.losses import RDropOutput, rdrop_loss, task_loss
from rdrop.regularizers._common import (
    check_class_target,
    check_generator,
    check_num_classes,
    check_positive,
    sample_lam,
    sample_perm,
)

__all__ = ["MixUp", "MixedBatch", "mixup", "rdrop_mixup_loss", "soft_cross_entropy"]


@dataclass
class MixedBatch:
    """One MixUp draw: the mixed inputs and what the mixed loss needs.

    Attributes:
        inputs: ``lam * x + (1 - lam) * x[perm]`` (``None`` for Manifold MixUp, which
            mixes hidden states inside the model).
        target_a: the original targets ``y``.
        target_b: the partners' targets ``y[perm]``.
        lam: the mixing weight ``lambda ~ Beta(alpha, alpha)`` of ``target_a``.
        perm: the permutation of the batch (a ``[B]`` long tensor).
        num_classes: the number of classes, when known (checked against the logits).
        layer: for Manifold MixUp, the name of the layer whose output is mixed.
    """

    inputs: Tensor | None
    target_a: Tensor
    target_b: Tensor
    lam: float
    perm: Tensor
    num_classes: int | None = None
    layer: str | None = None

    def loss(
        self, logits: Tensor, label_smoothing: float = 0.0, *, ignore_index: int = -100
    ) -> Tensor:
        """The mixed cross-entropy of one pass::

            lam * CE(logits, target_a) + (1 - lam) * CE(logits, target_b)

        with :func:`rdrop.task_loss` (mean over targets that are not ``ignore_index``,
        optional label smoothing).

        Args:
            logits: ``[B, ..., C]`` logits of the mixed batch (one pass).
            label_smoothing: smoothing of each target, in ``[0, 1)``.
            ignore_index: target value left out of the mean (token-level tasks).

        Returns:
            A scalar float32 (or wider) tensor.
        """
        label_smoothing = check_label_smoothing(label_smoothing)
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if self.num_classes is not None and (
            logits.ndim == 0 or logits.shape[-1] != self.num_classes
        ):
            raise ValueError(
                f"logits must have num_classes={self.num_classes} in the last dimension, "
                f"got shape {tuple(logits.shape)}"
            )
        loss_a, loss_b = (
            task_loss(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing)
            for t in (self.target_a, self.target_b)
        )
        return self.lam * loss_a + (1.0 - self.lam) * loss_b

    def soft_targets(
        self,
        num_classes: int | None = None,
        label_smoothing: float = 0.0,
        *,
        ignore_index: int = -100,
    ) -> Tensor:
        """The mixed soft target ``lam * s(target_a) + (1 - lam) * s(target_b)``.

        ``s(y) = (1 - label_smoothing) * onehot(y) + label_smoothing / C``; a target equal
        to ``ignore_index`` (an ignored item, e.g. padding) gets an all-zero row, which
        :func:`soft_cross_entropy` leaves out of its mean. With :func:`soft_cross_entropy`
        this gives the same loss as :meth:`loss` (without ignored items), and it is how the
        mixed loss goes through :class:`rdrop.RDrop`:
        ``RDrop(net, task=rdrop.soft_cross_entropy)`` called with
        ``target=mixed.soft_targets()``.

        Args:
            num_classes: ``C`` (default: the one given to :func:`mixup`).
            label_smoothing: smoothing of each target, in ``[0, 1)``.
            ignore_index: target value of ignored items (as in :meth:`loss`); every other
                target must be a class id in ``[0, C)``.

        Returns:
            A float32 tensor of shape ``target_a.shape + (C,)``.
        """
        label_smoothing = check_label_smoothing(label_smoothing)
        num_classes = check_num_classes(
            num_classes if num_classes is not None else self.num_classes
        )
        if num_classes is None:
            raise ValueError("num_classes is needed for soft targets: pass it here or to mixup()")
        check_class_target(self.target_a, num_classes)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        rows_a, rows_b = (
            _smoothed_one_hot(target, num_classes, label_smoothing, ignore_index)
            for target in (self.target_a, self.target_b)
        )
        return self.lam * rows_a + (1.0 - self.lam) * rows_b


def _smoothed_one_hot(
    target: Tensor, num_classes: int, label_smoothing: float, ignore_index: int
) -> Tensor:
    valid = check_class_ids(torch.Size((*target.shape, num_classes)), target, ignore_index)
    one_hot = F.one_hot(torch.where(valid, target, 0).long(), num_classes).float()
    smoothed = (1.0 - label_smoothing) * one_hot + label_smoothing / num_classes
    return smoothed * valid.unsqueeze(-1)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against soft (probability) targets, mean over items::

        loss = mean over items with sum(t) > 0 of  - sum_c t_c * log softmax(z)_c

    Items whose target row is all zero (e.g. padding) are left out of the mean. Usable as
    ``task=`` of :func:`rdrop.rdrop_loss`, :class:`rdrop.RDropLoss` and
    :class:`rdrop.RDrop` (their consistency term is then the symmetric KL over all items).

    Example:
        >>> import torch, rdrop
        >>> rdrop.soft_cross_entropy(torch.zeros(2, 4), torch.tensor([[0.3, 0.7, 0, 0]] * 2))
        tensor(1.3863)

    Args:
        logits: ``[..., C]`` logits.
        target: float ``[..., C]`` target distributions (rows summing to 1, or 0 to skip).

    Returns:
        A scalar float32 (or wider) tensor.
    """
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"logits and target must be torch.Tensors, got {type(logits).__name__} and "
            f"{type(target).__name__}"
        )
    if not target.is_floating_point():
        raise TypeError(
            f"target must hold float probabilities (soft targets), got dtype {target.dtype}; "
            "for class ids use rdrop.task_loss"
        )
    if target.shape != logits.shape or logits.ndim == 0:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' shape "
            f"{tuple(logits.shape)} (soft targets over the last dimension)"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    target = target.to(dtype)
    # 0 * log(0) = 0: a class masked with -inf and target 0 contributes nothing.
    terms = torch.where(target == 0, torch.zeros_like(log_p), target * log_p)
    per_item = -terms.sum(dim=-1)
    kept = (target.sum(dim=-1) > 0).sum()
    return per_item.sum() / kept.clamp_min(1).to(dtype)


def mixup(
    x: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.2,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """MixUp one batch: ``x_mix = lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``.

    Train on ``mixed.inputs`` with ``mixed.loss(logits)`` =
    ``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``. One ``lam`` per batch, as
    in the paper. Inputs must be float (images, features, precomputed embeddings); for
    token ids mix the embeddings with :class:`rdrop.ManifoldMixup` on the embedding layer.

    Example:
        >>> import torch, rdrop
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
        >>> mixed = rdrop.mixup(x, y, alpha=0.2, num_classes=3, generator=g)
        >>> lam, perm = mixed.lam, mixed.perm
        >>> bool(torch.allclose(mixed.inputs, lam * x + (1 - lam) * x[perm]))
        True
        >>> net = torch.nn.Linear(8, 3)
        >>> mixed.loss(net(mixed.inputs)).backward()

    Args:
        x: float inputs ``[B, ...]``.
        target: integer class ids ``[B]`` (or ``[B, T]`` for token-level labels).
        alpha: ``Beta(alpha, alpha)`` parameter, ``> 0``. The paper uses 0.1–0.4 on
            ImageNet and 1.0 on CIFAR (``alpha = 1``: ``lam`` uniform on ``[0, 1]``); small
            ``alpha`` keeps ``lam`` near 0 or 1 (mild mixing). Default 0.2.
        num_classes: number of classes (optional): checked against ``target`` and the
            logits, and the default for :meth:`MixedBatch.soft_targets`.
        generator: a ``torch.Generator`` for ``lam`` and ``perm`` (default: torch's global
            random stream; either way ``torch.manual_seed`` makes it reproducible).

    Returns:
        A :class:`MixedBatch` (``inputs``, ``target_a``, ``target_b``, ``lam``, ``perm``).

    References:
        Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
        ICLR 2018.
    """
    alpha = check_positive("alpha", alpha)
    num_classes = check_num_classes(num_classes)
    check_generator(generator)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a float tensor to be mixed, got dtype {x.dtype}; for token ids mix "
            "the embeddings instead (rdrop.ManifoldMixup with the embedding layer)"
        )
    check_class_target(target, num_classes)
    if x.ndim == 0 or x.shape[0] != target.shape[0]:
        raise ValueError(
            f"x and target must have the same batch size (dim 0), got x shape "
            f"{tuple(x.shape)} and target shape {tuple(target.shape)}"
        )
    lam = sample_lam(alpha, generator)
    perm = sample_perm(x.shape[0], generator, x.device)
    inputs = lam * x + (1.0 - lam) * x[perm]
    return MixedBatch(inputs, target, target[perm.to(target.device)], lam, perm, num_classes)


class MixUp:
    """MixUp with its hyper-parameters fixed: ``MixUp(alpha)(x, y) -> MixedBatch``.

    See :func:`mixup` for the formula and every argument.

    Example:
        >>> import torch, rdrop
        >>> mix = rdrop.MixUp(alpha=1.0, num_classes=3)
        >>> mixed = mix(torch.randn(4, 8), torch.tensor([0, 1, 2, 1]))
        >>> mixed.inputs.shape, 0.0 <= mixed.lam <= 1.0
        (torch.Size([4, 8]), True)
    """

    def __init__(self, alpha: float = 0.2, *, num_classes: int | None = None) -> None:
        self.alpha = check_positive("alpha", alpha)
        self.num_classes = check_num_classes(num_classes)

    def __call__(
        self, x: Tensor, target: Tensor, *, generator: torch.Generator | None = None
    ) -> MixedBatch:
        return mixup(x, target, alpha=self.alpha, num_classes=self.num_classes, generator=generator)

    def __repr__(self) -> str:
        return f"MixUp(alpha={self.alpha}, num_classes={self.num_classes})"


def rdrop_mixup_loss(
    passes: Sequence[Tensor],
    mixed: MixedBatch,
    alpha: float = 1.0,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    check_finite: bool = True,
) -> RDropOutput:
    """R-Drop on a MixUp (or Manifold MixUp) batch::

        loss = mean_i [lam * CE(P_i, y) + (1 - lam) * CE(P_i, y[perm])]
               + (alpha / m) * D(P_1, ..., P_m)

    The rule: mix **once** (one ``lam``, one ``perm``), then every dropout pass sees the
    same mixed batch (a forward on ``[x_mix; x_mix]``; for Manifold MixUp every pass mixes
    at the same layer with the same ``lam`` and ``perm``). The task part is the mixed
    cross-entropy averaged over the passes; the consistency term ``D`` is the symmetric KL
    between the passes' distributions on the mixed input (over items with at least one
    target that is not ``ignore_index``). Label smoothing applies to the task part only.

    Example:
        >>> import torch, rdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3),
        ...                           torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 1, 0, 2])
        >>> mixed = rdrop.mixup(x, y, alpha=0.2)
        >>> passes = net(torch.cat([mixed.inputs, mixed.inputs])).chunk(2)
        >>> out = rdrop.rdrop_mixup_loss(passes, mixed, alpha=1.0)
        >>> out.loss.backward()

    Args:
        passes: the logits of ``m >= 2`` dropout passes on the mixed batch.
        mixed: the :class:`MixedBatch` of this step.
        alpha: R-Drop's consistency weight ``>= 0`` (this library's convention).
        label_smoothing: on the task part only, in ``[0, 1)``.
        ignore_index: target value excluded from the task means (token-level tasks).
        check_finite: as in :func:`rdrop.rdrop_loss`.

    Returns:
        :class:`rdrop.RDropOutput` (``loss``, ``task_loss``, ``consistency_loss``).

    References:
        Liang et al., "R-Drop", NeurIPS 2021; Zhang et al., "mixup", ICLR 2018.
    """
    if not isinstance(mixed, MixedBatch):
        raise TypeError(f"mixed must be an rdrop.MixedBatch, got {type(mixed).__name__}")
    label_smoothing = check_label_smoothing(label_smoothing)

    def mixed_task(output: Tensor, _target: Tensor) -> Tensor:
        return mixed.loss(output, label_smoothing, ignore_index=ignore_index)

    keep = (mixed.target_a != ignore_index) | (mixed.target_b != ignore_index)
    return rdrop_loss(
        passes,
        mixed.target_a,
        alpha,
        task=mixed_task,
        mask=keep,
        check_finite=check_finite,
    )
