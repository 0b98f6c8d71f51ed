"""The R-Drop objective as a function and as an ``nn.Module`` (a thin shell over it).

One convention for ``alpha``, used everywhere in this library::

    loss = 1/2 * (task_loss(P_1) + task_loss(P_2)) + (alpha / 2) * D(P_1, P_2)

with mean reductions and ``D`` = :func:`rdrop.symmetric_kl` (``1/2 (KL(P1||P2) +
KL(P2||P1))``). That is the paper's Eq. 4 divided by 2: the task part keeps the scale of a
plain training step, the paper's alpha values carry over unchanged, and nothing depends on
batch size, sequence length or vocabulary size. For ``m`` passes the task part is the mean
over passes, ``D`` is :func:`rdrop.multi_pass_consistency` and its weight is ``alpha / m``:
the paper's m-pass objective ``sum_i NLL(P_i) + alpha / (m (m - 1)) sum_{i != j}
KL(P_i || P_j)`` divided by ``m``, so alpha carries over for every ``m``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdrop._checks import (
    check_alpha,
    check_bool,
    check_class_ids,
    check_int,
    check_label_smoothing,
    check_mask,
)
from rdrop._fused_kernel import (
    auto_min_numel,
    concatenated_base,
    fused_terms,
    fused_unsupported,
)
from rdrop.functional import _KINDS, ConsistencyKind, _check_reduction, multi_pass_consistency

__all__ = [
    "ConsistencyLoss",
    "NonFiniteLossError",
    "RDropLoss",
    "RDropOutput",
    "TaskLoss",
    "rdrop_loss",
    "task_loss",
]

TaskLoss = Callable[[Tensor, Tensor], Tensor]
LossImplementation = Literal["auto", "fused", "reference"]
_IMPLEMENTATIONS = ("auto", "fused", "reference")
BuiltinTask = Literal["cross_entropy", "mse", "bce"]
_BUILTIN_TASKS = ("cross_entropy", "mse", "bce")
_DEFAULT_CONSISTENCY: dict[str, ConsistencyKind] = {
    "cross_entropy": "kl",
    "mse": "mse",
    "bce": "bernoulli_kl",
}


@dataclass
class RDropOutput:
    """What an R-Drop step returns.

    Attributes:
        loss: the total objective to call ``backward()`` on.
        task_loss: mean task loss over the passes (the plain training loss's scale).
        consistency_loss: the consistency term ``D`` *before* multiplying by ``alpha / m``
            (``alpha / 2`` for two passes; log it: the authors' check is that it stays
            small with R-Drop).
        alpha: the alpha used in this step (after any schedule).
        logits: the first pass's logits (``None`` for a bare :class:`RDropLoss` call).
        outputs: the model's raw output of the step (``None`` for a bare loss call).
    """

    loss: Tensor
    task_loss: Tensor
    consistency_loss: Tensor
    alpha: float
    logits: Tensor | None = None
    outputs: Any = None


def _consistency_weight(alpha: float, num_passes: int) -> float:
    """Weight of ``D`` among ``m`` passes: ``alpha / m`` (``alpha / 2`` for two passes).

    The paper's m-pass objective ``sum_i NLL(P_i) + alpha * D`` divided by ``m``, so that the
    task part is a mean over passes and alpha keeps its meaning for every ``m``.
    """
    return alpha / num_passes


def _builtin_task_loss(
    task: str, logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float
) -> Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if task == "cross_entropy":
        valid = check_class_ids(logits.shape, target, ignore_index)
        num_classes = logits.shape[-1]
        flat = logits.reshape(-1, num_classes).to(dtype)
        # Ignored rows may hold anything (NaN included): keep them out of the graph.
        flat = torch.where(valid.reshape(-1, 1), flat, flat.new_zeros(()))
        total = F.cross_entropy(
            flat,
            target.reshape(-1).long(),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction="sum",
        )
        # Mean over real targets; an all-padding batch gives 0, not NaN.
        return total / valid.sum().clamp_min(1).to(total.dtype)
    if target.shape != logits.shape:
        # Regression heads often output [B, 1] for [B] targets.
        if logits.shape[-1:] == (1,) and target.shape == logits.shape[:-1]:
            target = target.unsqueeze(-1)
        else:
            raise ValueError(
                f"target shape {tuple(target.shape)} must equal the output shape "
                f"{tuple(logits.shape)} for task={task!r}"
            )
    if task == "mse":
        return F.mse_loss(logits.to(dtype), target.to(dtype))
    return F.binary_cross_entropy_with_logits(logits.to(dtype), target.to(dtype))


class NonFiniteLossError(ValueError):
    """The R-Drop loss is NaN or infinite (raised when ``check_finite=True``).

    A training loop can catch it to stop a diverged run cleanly::

        >>> import torch, rdrop
        >>> z = torch.full((2, 3), float("nan"))
        >>> try:
        ...     rdrop.rdrop_loss([z, z], torch.tensor([0, 1]))
        ... except rdrop.NonFiniteLossError as error:
        ...     print(str(error)[:26])
        R-Drop loss is not finite:
    """


def _check_finite(out: RDropOutput, passes: Sequence[Tensor]) -> None:
    """Raise :class:`NonFiniteLossError` naming the non-finite component (one host sync
    per call)."""
    if bool(torch.isfinite(out.loss)):
        return
    parts = {
        "task_loss": out.task_loss,
        "consistency_loss": out.consistency_loss,
    }
    bad = [
        f"{name}={float(value.detach())}"
        for name, value in parts.items()
        if not torch.isfinite(value)
    ]
    where = [
        f"pass {i}: {int((~torch.isfinite(p)).sum())} non-finite of {p.numel()} values"
        for i, p in enumerate(passes)
        if not bool(torch.isfinite(p).all())
    ]
    raise NonFiniteLossError(
        "R-Drop loss is not finite: "
        + (", ".join(bad) or f"loss={float(out.loss.detach())}")
        + (
            "; model outputs: " + "; ".join(where)
            if where
            else "; the model outputs are all finite (for 'kl': a class with a -inf logit in "
            "one pass but not the other makes the KL infinite)"
        )
        + ". Pass check_finite=False to skip this check."
    )


def _resolve(
    task: BuiltinTask | TaskLoss, consistency: ConsistencyKind | None, label_smoothing: float
) -> ConsistencyKind:
    """Validate the task/consistency pair and return the consistency kind to use."""
    if not callable(task) and task not in _BUILTIN_TASKS:
        raise ValueError(f"task must be one of {_BUILTIN_TASKS} or a callable, got {task!r}")
    if consistency is None:
        consistency = "kl" if callable(task) else _DEFAULT_CONSISTENCY[task]
    if consistency not in _KINDS:
        raise ValueError(f"consistency must be one of {_KINDS}, got {consistency!r}")
    label_smoothing = check_label_smoothing(label_smoothing)
    if label_smoothing and task != "cross_entropy":
        raise ValueError(f"label_smoothing applies to task='cross_entropy' only, got task={task!r}")
    return consistency


def task_loss(
    output: Tensor,
    target: Tensor,
    task: BuiltinTask | TaskLoss = "cross_entropy",
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The task loss of one pass, mean-reduced, in float32 or wider.

    ``"cross_entropy"``: ``output`` ``[..., C]`` logits, ``target`` ``[...]`` class ids,
    mean over targets that are not ``ignore_index`` (so over real tokens for token-level
    tasks), with optional label smoothing. ``"mse"``: regression (a ``[B, 1]`` output
    against a ``[B]`` target is accepted). ``"bce"``: multi-label with float targets. A
    callable is called as ``task(output, target)``.

    Example:
        >>> import torch, rdrop
        >>> rdrop.task_loss(torch.zeros(2, 4), torch.tensor([1, 3])).item()  # log(4)
        1.3862943649291992
    """
    if callable(task):
        value = task(output, target)
        return value.to(torch.promote_types(value.dtype, torch.float32))
    if task not in _BUILTIN_TASKS:
        raise ValueError(f"task must be one of {_BUILTIN_TASKS} or a callable, got {task!r}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    return _builtin_task_loss(task, output, target, ignore_index, label_smoothing)


def _consistency_mask(
    passes: Sequence[Tensor],
    target: Tensor | None,
    task: BuiltinTask | TaskLoss,
    ignore_index: int,
    mask: Tensor | None,
) -> Tensor | None:
    """The user's mask AND (for cross-entropy) ``target != ignore_index``."""
    if target is None or callable(task) or task != "cross_entropy":
        return mask
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != passes[0].shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' shape without the "
            f"class dimension, {tuple(passes[0].shape[:-1])}"
        )
    keep = target != ignore_index
    check_mask(mask, passes[0].shape[:-1], "the logits' shape without the last dimension")
    return keep if mask is None else mask & keep


def rdrop_loss(
    passes: Sequence[Tensor],
    target: Tensor | None,
    alpha: float = 1.0,
    *,
    task: BuiltinTask | TaskLoss = "cross_entropy",
    consistency: ConsistencyKind | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Tensor | None = None,
    task_passes: int | None = None,
    check_finite: bool = True,
    implementation: LossImplementation = "auto",
) -> RDropOutput:
    """The R-Drop objective for the outputs of ``m >= 2`` dropout passes.

    ::

        loss = mean_i task(P_i, target) + (alpha / m) * D(P_1, ..., P_m)

    For ``m = 2`` and ``D`` = symmetric KL this is the paper's Eq. 4 divided by 2; for any
    ``m`` it is the paper's m-pass objective ``sum_i NLL(P_i) + alpha * D`` divided by ``m``
    (see :func:`rdrop.multi_pass_consistency`), so the same alpha means the same thing for
    every number of passes.

    Example:
        >>> import torch, rdrop
        >>> a, b = torch.randn(4, 3), torch.randn(4, 3)
        >>> y = torch.tensor([0, 2, 1, 0])
        >>> out = rdrop.rdrop_loss([a, b], y, alpha=1.0)
        >>> sorted(k for k in vars(out) if k.endswith("loss"))
        ['consistency_loss', 'loss', 'task_loss']

    Args:
        passes: the outputs of the passes, same shape each.
        target: labels; ``None`` for an unlabeled batch (consistency term only, as in
            semi-supervised R-Drop).
        alpha: weight of the consistency term, ``>= 0``.
        task: ``"cross_entropy"`` (class ids, ``ignore_index`` honoured, optional label
            smoothing), ``"mse"`` (regression), ``"bce"`` (multi-label, float targets), or
            any callable ``(output, target) -> scalar`` with mean reduction.
        consistency: ``"kl"``, ``"mse"`` or ``"bernoulli_kl"``; default follows ``task``
            (cross_entropy -> kl, mse -> mse, bce -> bernoulli_kl, a callable -> kl).
        ignore_index: target value excluded from the task loss *and* from the consistency
            term (cross-entropy only).
        label_smoothing: applied to the task loss only, never to the consistency term.
        mask: optional boolean item mask (``True`` = keep) for the consistency term only
            (combined there with ``ignore_index``); the task loss uses ``ignore_index``.
        task_passes: average the task loss over the first ``task_passes`` passes only
            (default: all). The stop-gradient variant uses 1.
        check_finite: raise a ``ValueError`` naming the component when the loss is not
            finite (costs one host synchronisation).
        implementation: ``"fused"`` computes the cross-entropy of both passes and their
            symmetric KL in one chunked kernel (:mod:`rdrop.fused`; two passes,
            ``task="cross_entropy"`` or ``target=None``, ``consistency="kl"``), writing
            one gradient for the concatenated logits when the passes are the two halves
            of one tensor (as :class:`rdrop.RDrop` produces them); ``"reference"`` is the
            plain autograd graph (supports double backward); ``"auto"`` (default) uses
            ``"fused"`` where it applies and the passes hold at least 2**15 logits each
            (2**9 on CPU when the C++ row kernel is available).

    Returns:
        :class:`RDropOutput` with ``loss``, ``task_loss`` and ``consistency_loss``.

    References:
        Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021, Eq. 4.
    """
    alpha = check_alpha(alpha)
    kind = _resolve(task, consistency, label_smoothing)
    if isinstance(passes, Tensor):
        raise TypeError(
            "passes must be a list or tuple of tensors, one per dropout pass, got a single "
            f"Tensor of shape {tuple(passes.shape)}; split a concatenated [2B, ...] output "
            "with list(output.chunk(2))"
        )
    passes = list(passes)
    if len(passes) < 2:
        raise ValueError(f"passes must hold at least 2 outputs, got {len(passes)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if task_passes is None:
        task_passes = len(passes)
    task_passes = check_int("task_passes", task_passes, 1)
    if not 1 <= task_passes <= len(passes):
        raise ValueError(f"task_passes must be in [1, {len(passes)}], got {task_passes}")
    if (
        kind == "kl"
        and isinstance(passes[0], Tensor)
        and passes[0].ndim > 0
        and passes[0].shape[-1] == 1
    ):
        raise ValueError(
            "consistency='kl' on outputs with a single class (last dimension 1) is always 0: "
            "use consistency='mse' for regression or 'bernoulli_kl' for a sigmoid output"
        )

    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )
    fused = implementation != "reference"
    if fused:
        reason = fused_unsupported(passes, target, task, kind, task_passes)
        if reason is not None and implementation == "fused":
            raise ValueError(f"implementation='fused' does not support {reason}")
        fused = reason is None and (
            implementation == "fused"
            or passes[0].numel() >= auto_min_numel(passes[0], kl_only=False)
        )
    if fused:
        a, b = passes
        base = concatenated_base(a, b)
        task_value, consistency_loss = fused_terms(
            a if base is None else base,
            b if base is None else None,
            a.shape[:-1],
            target,
            ignore_index,
            label_smoothing,
            mask,
        )
        loss = task_value + _consistency_weight(alpha, 2) * consistency_loss
        out = RDropOutput(loss, task_value, consistency_loss, alpha)
        if check_finite:
            _check_finite(out, passes)
        return out

    keep = _consistency_mask(passes, target, task, ignore_index, mask)
    consistency_loss = multi_pass_consistency(passes, keep, "mean", kind=kind)
    if target is None:
        task_value = consistency_loss.new_zeros(())
    elif task == "cross_entropy" and task_passes > 1:
        # One call on the concatenated passes: with mean reduction and identical targets
        # it equals the mean of the per-pass losses.
        task_value = task_loss(
            torch.cat(passes[:task_passes], dim=0),
            torch.cat([target] * task_passes, dim=0),
            task,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    else:
        task_value = torch.stack(
            [
                task_loss(
                    p, target, task, ignore_index=ignore_index, label_smoothing=label_smoothing
                )
                for p in passes[:task_passes]
            ]
        ).mean()
    loss = task_value + _consistency_weight(alpha, len(passes)) * consistency_loss
    out = RDropOutput(loss, task_value, consistency_loss, alpha)
    if check_finite:
        _check_finite(out, passes)
    return out


class RDropLoss(nn.Module):
    """R-Drop criterion: task loss of both passes plus the weighted consistency term.

    ``loss = 1/2 (task(P_a) + task(P_b)) + (alpha / 2) * D(P_a, P_b)``; see
    :func:`rdrop_loss` for every argument (``implementation="reference"`` switches the
    fused cross-entropy + KL kernel off).

    Example:
        >>> import torch, rdrop
        >>> criterion = rdrop.RDropLoss(alpha=1.0, label_smoothing=0.1)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3),
        ...                             torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
        >>> logits_a, logits_b = model(torch.cat([x, x])).chunk(2)
        >>> out = criterion(logits_a, logits_b, y)
        >>> out.loss.backward()
    """

    def __init__(
        self,
        alpha: float = 1.0,
        *,
        task: BuiltinTask | TaskLoss = "cross_entropy",
        consistency: ConsistencyKind | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        check_finite: bool = True,
        implementation: LossImplementation = "auto",
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.task = task
        self.consistency: ConsistencyKind = _resolve(task, consistency, label_smoothing)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.check_finite = check_bool("check_finite", check_finite)
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.implementation: LossImplementation = implementation

    def forward(
        self,
        logits_a: Tensor,
        logits_b: Tensor,
        target: Tensor | None,
        *,
        mask: Tensor | None = None,
        alpha: float | None = None,
    ) -> RDropOutput:
        """Loss for two passes; ``alpha`` overrides the constructor's for this call."""
        return self.multi_pass([logits_a, logits_b], target, mask=mask, alpha=alpha)

    def multi_pass(
        self,
        passes: Sequence[Tensor],
        target: Tensor | None,
        *,
        mask: Tensor | None = None,
        alpha: float | None = None,
        task_passes: int | None = None,
    ) -> RDropOutput:
        """Loss for ``m >= 2`` passes (see :func:`rdrop.multi_pass_consistency`)."""
        return rdrop_loss(
            passes,
            target,
            self.alpha if alpha is None else alpha,
            task=self.task,
            consistency=self.consistency,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            mask=mask,
            task_passes=task_passes,
            check_finite=self.check_finite,
            implementation=self.implementation,
        )

    def task_only(self, output: Tensor, target: Tensor) -> Tensor:
        """The task loss of a single pass (evaluation, or steps without the KL term)."""
        return task_loss(
            output,
            target,
            self.task,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        task = getattr(self.task, "__name__", repr(self.task))
        return (
            f"alpha={self.alpha}, task={task}, consistency={self.consistency!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
            + ("" if self.implementation == "auto" else f", implementation={self.implementation!r}")
        )


class ConsistencyLoss(nn.Module):
    """``nn.Module`` shell over :func:`rdrop.multi_pass_consistency` (for 2 passes:
    :func:`rdrop.symmetric_kl`, :func:`rdrop.mse_consistency` or
    :func:`rdrop.symmetric_bernoulli_kl`).

    Example:
        >>> import torch, rdrop
        >>> kl = rdrop.ConsistencyLoss("kl")
        >>> a = torch.randn(4, 10)
        >>> kl(a, a).item()
        0.0
    """

    def __init__(self, kind: ConsistencyKind = "kl", reduction: str = "mean") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        _check_reduction(reduction)
        self.kind: ConsistencyKind = kind
        self.reduction = reduction

    def forward(self, *outputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return multi_pass_consistency(
            list(outputs),
            mask,
            self.reduction,  # type: ignore[arg-type]
            kind=self.kind,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"
