"""Pure tensor functions: the consistency terms of R-Drop.

Every function here takes the outputs of two (or more) dropout passes and returns their
disagreement. They are pure (no state) and compute in float32 or wider whatever the input
dtype. The plain-autograd paths never synchronise with the host; the fused kernel
(``implementation="fused"``, the default from 2**9 logits on CPU with the C++ kernel,
2**18 otherwise) reads a few flags back per
call (rows that are ``-inf`` throughout, the masked rows it skips, NaN repairs), which is
a host synchronisation on a GPU. They share one convention for masks and reductions:

* the **item shape** is the output shape without its last (class) dimension, so ``[B, C]``
  classification logits have items ``[B]`` and ``[B, T, V]`` token logits have items
  ``[B, T]``;
* ``mask`` is a boolean tensor of the item shape, ``True`` = keep. Masked items contribute
  exactly zero to the value and to the gradient, whatever their logits hold (NaN included);
* ``reduction`` is ``"mean"`` (over kept items; ``0`` when no item is kept), ``"sum"`` or
  ``"none"`` (a tensor of the item shape, masked items set to ``0``).

References:
    Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021,
    arXiv:2106.14448, Eq. 2-4.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from rdrop._checks import check_int, check_mask
from rdrop._fused_kernel import auto_min_numel, chunked_symmetric_kl, direct_symmetric_kl

__all__ = [
    "ConsistencyKind",
    "KLImplementation",
    "Reduction",
    "consistency",
    "mse_consistency",
    "multi_pass_consistency",
    "symmetric_bernoulli_kl",
    "symmetric_kl",
    "symmetric_kl_reference",
]

Reduction = Literal["mean", "sum", "none"]
ConsistencyKind = Literal["kl", "mse", "bernoulli_kl"]
KLImplementation = Literal["auto", "fused", "reference"]

_REDUCTIONS = ("mean", "sum", "none")
_KINDS = ("kl", "mse", "bernoulli_kl")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input already is float64."""
    return torch.promote_types(dtype, torch.float32)


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("logits_a", "logits_b")) -> None:
    for name, value in zip(names, (a, b)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{names[0]} and {names[1]} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must be on the same device, got {a.device} and {b.device}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_item: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    """Apply ``reduction`` to per-item values whose masked entries are already zero."""
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(per_item.numel(), 1)
    return total / mask.sum().clamp_min(1).to(total.dtype)


def symmetric_kl_reference(
    logits_a: Tensor,
    logits_b: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Plain-autograd symmetric KL; the reference the fused kernel is tested against.

    Same contract as :func:`symmetric_kl` (see there). It builds an ordinary autograd
    graph (so double backward works) at the price of several logits-sized temporaries.
    """
    _check_pair(logits_a, logits_b)
    _check_reduction(reduction)
    check_mask(mask, logits_a.shape[:-1], "the logits' shape without the last dimension")
    dtype = _compute_dtype(logits_a.dtype)
    a, b = logits_a.to(dtype), logits_b.to(dtype)
    if mask is not None:
        # Replace dropped rows by zeros *before* the graph so NaN/inf there cannot leak
        # into the value or the gradient.
        keep = mask.unsqueeze(-1)
        a = torch.where(keep, a, torch.zeros((), dtype=dtype, device=a.device))
        b = torch.where(keep, b, torch.zeros((), dtype=dtype, device=b.device))
    log_p = torch.log_softmax(a, dim=-1)
    log_q = torch.log_softmax(b, dim=-1)
    both_impossible = torch.isneginf(log_p) & torch.isneginf(log_q)
    diff = torch.where(
        both_impossible, torch.zeros((), dtype=dtype, device=a.device), log_p - log_q
    )
    per_item = 0.5 * ((log_p.exp() - log_q.exp()) * diff).sum(dim=-1)
    if mask is not None:
        per_item = torch.where(mask, per_item, torch.zeros((), dtype=dtype, device=a.device))
    return _reduce(per_item, mask, reduction)


def symmetric_kl(
    logits_a: Tensor,
    logits_b: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    *,
    implementation: KLImplementation = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Symmetric KL divergence between two categorical distributions given as logits.

    Per item::

        D(a, b) = 1/2 * ( KL(P_a || P_b) + KL(P_b || P_a) )
                = 1/2 * sum_c (p_c - q_c) * (log p_c - log q_c)

    with ``P_a = softmax(logits_a)``, ``P_b = softmax(logits_b)`` over the last dimension.
    It is symmetric, non-negative and zero iff the two distributions are equal.

    Example:
        >>> import torch, rdrop
        >>> a, b = torch.randn(8, 5), torch.randn(8, 5)
        >>> d = rdrop.symmetric_kl(a, b)            # mean over the 8 items
        >>> bool(torch.allclose(d, rdrop.symmetric_kl(b, a)))
        True
        >>> tokens = torch.randn(2, 7, 11)          # [B, T, V]
        >>> keep = torch.ones(2, 7, dtype=torch.bool); keep[1, 4:] = False
        >>> rdrop.symmetric_kl(tokens, tokens.flip(0), mask=keep).shape
        torch.Size([])

    Args:
        logits_a: logits of the first pass, shape ``[..., C]``, any floating dtype.
        logits_b: logits of the second pass, same shape, dtype and device.
        mask: optional boolean tensor of shape ``logits_a.shape[:-1]``; ``True`` = keep.
        reduction: ``"mean"`` over kept items (``0`` when none is kept), ``"sum"``, or
            ``"none"`` (per-item values, masked items ``0``).
        implementation: ``"fused"`` uses a memory-lean custom autograd kernel that never
            holds more than a chunk of probability temporaries and recomputes in backward
            (the word :func:`rdrop.rdrop_loss` uses for the same kernel; ``"chunked"`` is
            a deprecated alias); ``"reference"`` is the plain autograd graph (double
            backward works on both); ``"auto"`` (default) picks ``"fused"`` for inputs of
            at least 2**9 logits on CPU when the C++ row kernel is available (float32,
            bf16, fp16; see :mod:`rdrop._cpu_kernel`), else 2**18.
        chunk_size: rows per chunk for the fused kernel (default: about 2**18 logits a
            chunk); giving it selects the chunked ATen kernel over the C++ one.

    Returns:
        A float32 tensor (float64 for float64 inputs): a scalar, or the item shape for
        ``reduction="none"``.

    Notes:
        Computed in log space (``log_softmax``) in float32 or wider, so bf16/fp16 inputs
        give a float32-accurate result. A class whose logit is ``-inf`` in *both* inputs
        (a masked vocabulary entry) contributes exactly 0; a class impossible in only one
        of them makes the divergence truly infinite and the result is ``+inf`` (never NaN).

    References:
        Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021, Eq. 2.
    """
    if implementation == "chunked":
        warnings.warn(
            "symmetric_kl(implementation='chunked') is deprecated: use 'fused', the word "
            "rdrop_loss uses for the same kernel",
            FutureWarning,
            stacklevel=2,
        )
        implementation = "fused"
    if implementation not in ("auto", "fused", "reference"):
        raise ValueError(
            f"implementation must be 'auto', 'fused' or 'reference', got {implementation!r}"
        )
    _check_pair(logits_a, logits_b)
    _check_reduction(reduction)
    check_mask(mask, logits_a.shape[:-1], "the logits' shape without the last dimension")
    if implementation == "reference" or (
        implementation == "auto" and logits_a.numel() < auto_min_numel(logits_a, kl_only=True)
    ):
        dead, one_sided = _impossible_rows(logits_a, logits_b, mask)
        per_item = symmetric_kl_reference(logits_a, logits_b, _kept(mask, dead), "none")
        return _reduce(_infinite_where(per_item, one_sided), mask, reduction)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1)
    # The C++ row kernel first (no pre-pass over the logits); None when it does not apply.
    per_item = direct_symmetric_kl(logits_a, logits_b, mask) if chunk_size is None else None
    if per_item is None:
        dead, one_sided = _impossible_rows(logits_a, logits_b, mask)
        # The kernel skips masked rows; it sees the caller's mask unless a row has no
        # distribution at all (one flag read back: the kernel synchronises anyway).
        live = _kept(mask, dead) if bool(dead.any()) else mask
        per_item = chunked_symmetric_kl(logits_a, logits_b, live, chunk_size)
        per_item = _infinite_where(per_item, one_sided)
    return _reduce(per_item, mask, reduction)


def _impossible_rows(a: Tensor, b: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Kept items whose logits are all ``-inf`` (no distribution at all): ``(dead,
    one_sided)``.

    ``dead`` marks the items that are ``-inf`` throughout in either input (they are
    computed as 0, so no NaN reaches the value or the gradient); ``one_sided`` those
    ``-inf`` throughout in exactly one input, whose divergence is infinite.
    """
    if a.shape[-1] == 0 or a.numel() == 0:
        empty = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
        return empty, empty
    dead_a = torch.isneginf(a.detach().amax(dim=-1))
    dead_b = torch.isneginf(b.detach().amax(dim=-1))
    dead, one_sided = dead_a | dead_b, dead_a ^ dead_b
    if mask is not None:
        dead, one_sided = dead & mask, one_sided & mask
    return dead, one_sided


def _kept(mask: Tensor | None, dead: Tensor) -> Tensor:
    """The caller's mask without the ``dead`` items."""
    return ~dead if mask is None else mask & ~dead


def _infinite_where(per_item: Tensor, where: Tensor) -> Tensor:
    return torch.where(where, torch.full((), math.inf, dtype=per_item.dtype), per_item)


def symmetric_bernoulli_kl(
    logits_a: Tensor,
    logits_b: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Symmetric KL between independent Bernoulli outputs (multi-label, sigmoid heads).

    Per label, with ``p = sigmoid(z_a)`` and ``q = sigmoid(z_b)``::

        D(z_a, z_b) = 1/2 * ( KL(Ber(p) || Ber(q)) + KL(Ber(q) || Ber(p)) )
                    = 1/2 * (p - q) * (z_a - z_b)

    (the log-odds difference is exactly the logit difference, so no logarithm is taken).
    Every element is an item, like ``BCEWithLogitsLoss``: ``"mean"`` averages over all kept
    labels, so ``alpha`` does not depend on the number of labels.

    Example:
        >>> import torch, rdrop
        >>> z = torch.randn(4, 6)                   # 4 samples, 6 labels
        >>> rdrop.symmetric_bernoulli_kl(z, z).item()
        0.0

    Args:
        logits_a: pre-sigmoid outputs of the first pass, any shape.
        logits_b: the second pass, same shape, dtype and device.
        mask: optional boolean mask of the same shape (or of the shape without the last
            dimension, which masks whole samples); ``True`` = keep.
        reduction: ``"mean"`` over kept labels, ``"sum"`` or ``"none"``.

    Returns:
        A float32 (or float64) scalar, or the input shape for ``reduction="none"``.
    """
    _check_pair(logits_a, logits_b)
    _check_reduction(reduction)
    if mask is not None and mask.shape == logits_a.shape[:-1] and logits_a.ndim > 0:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (True = keep), got {mask.dtype}")
        mask = mask.unsqueeze(-1).expand(logits_a.shape)
    check_mask(mask, logits_a.shape, "the logits' shape, or it without the last dimension")
    dtype = _compute_dtype(logits_a.dtype)
    a, b = logits_a.to(dtype), logits_b.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=a.device)
    if mask is not None:
        a, b = torch.where(mask, a, zero), torch.where(mask, b, zero)
    # Equal logits (including -inf == -inf) contribute 0 instead of 0 * nan.
    diff = torch.where(a == b, zero, a - b)
    per_item = 0.5 * (torch.sigmoid(a) - torch.sigmoid(b)) * diff
    return _reduce(per_item, mask, reduction)


def mse_consistency(
    pred_a: Tensor,
    pred_b: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Mean squared difference between two regression predictions (R-Drop for STS-B).

    Per item, for predictions of shape ``[..., D]``::

        D(a, b) = mean_d (a_d - b_d) ** 2

    A 1-D prediction ``[B]`` is one scalar per item. This is the paper's replacement of
    the KL for regression tasks.

    Example:
        >>> import torch, rdrop
        >>> a = torch.tensor([[1.0], [2.0]]); b = torch.tensor([[1.5], [2.0]])
        >>> rdrop.mse_consistency(a, b).item()
        0.125

    Args:
        pred_a: predictions of the first pass, ``[B]`` or ``[..., D]``.
        pred_b: the second pass, same shape, dtype and device.
        mask: optional boolean tensor of the item shape (``[B]`` for ``[B]`` input,
            otherwise the shape without the last dimension); ``True`` = keep.
        reduction: ``"mean"`` over kept items, ``"sum"`` or ``"none"``.

    Returns:
        A float32 (or float64) scalar, or the item shape for ``reduction="none"``.
    """
    _check_pair(pred_a, pred_b, ("pred_a", "pred_b"))
    _check_reduction(reduction)
    if pred_a.ndim == 0:
        raise ValueError("pred_a must have at least one (batch) dimension, got a scalar")
    item_shape = pred_a.shape if pred_a.ndim == 1 else pred_a.shape[:-1]
    check_mask(mask, item_shape, "[B] for 1-D predictions, else the shape without the last dim")
    dtype = _compute_dtype(pred_a.dtype)
    a, b = pred_a.to(dtype), pred_b.to(dtype)
    if pred_a.ndim == 1:
        a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=a.device)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        a, b = torch.where(keep, a, zero), torch.where(keep, b, zero)
    per_item = (a - b).square().mean(dim=-1)
    return _reduce(per_item, mask, reduction)


def consistency(
    kind: ConsistencyKind,
    output_a: Tensor,
    output_b: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Dispatch to the consistency term named by ``kind``.

    ``"kl"`` -> :func:`symmetric_kl`, ``"mse"`` -> :func:`mse_consistency`,
    ``"bernoulli_kl"`` -> :func:`symmetric_bernoulli_kl`.

    Example:
        >>> import torch, rdrop
        >>> a = torch.randn(3, 4)
        >>> rdrop.consistency("kl", a, a).item()
        0.0
    """
    if kind == "kl":
        return symmetric_kl(output_a, output_b, mask, reduction)
    if kind == "mse":
        return mse_consistency(output_a, output_b, mask, reduction)
    if kind == "bernoulli_kl":
        return symmetric_bernoulli_kl(output_a, output_b, mask, reduction)
    raise ValueError(f"consistency kind must be one of {_KINDS}, got {kind!r}")


def multi_pass_consistency(
    outputs: Sequence[Tensor],
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    *,
    kind: ConsistencyKind = "kl",
) -> Tensor:
    """Consistency among ``m >= 2`` dropout passes: the mean over all ordered pairs.

    For the KL::

        D(P_1, ..., P_m) = 1 / (m (m - 1)) * sum_{i != j} KL(P_i || P_j)
                         = mean over pairs i < j of symmetric_kl(P_i, P_j)

    which equals :func:`symmetric_kl` for ``m = 2``; so the paper's m-pass term
    ``alpha / (m (m - 1)) * sum_{i != j} KL(P_i || P_j)`` is ``alpha * D``. The paper's
    objective adds it to ``sum_i NLL(P_i)``; :func:`rdrop.rdrop_loss` divides the whole by
    ``m`` (task part a mean over passes), so there the weight of ``D`` is ``alpha / m``.
    ``"mse"`` and ``"bernoulli_kl"`` average their pairwise terms the same way.

    Example:
        >>> import torch, rdrop
        >>> a, b, c = torch.randn(3, 5, 7).unbind(0)
        >>> two = rdrop.multi_pass_consistency([a, b])
        >>> bool(torch.allclose(two, rdrop.symmetric_kl(a, b)))
        True
        >>> rdrop.multi_pass_consistency([a, b, c]).shape
        torch.Size([])

    Args:
        outputs: ``m >= 2`` tensors of identical shape, one per pass.
        mask: optional boolean mask, as for the chosen ``kind``.
        reduction: as for the chosen ``kind``.
        kind: ``"kl"`` (default), ``"mse"`` or ``"bernoulli_kl"``.

    Returns:
        The averaged consistency, reduced as requested.
    """
    if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence):
        raise TypeError(
            "outputs must be a sequence (list or tuple) of tensors, one per pass, "
            f"got {type(outputs).__name__}"
        )
    m = len(outputs)
    if m < 2:
        raise ValueError(f"outputs must hold at least 2 passes (m >= 2), got m = {m}")
    terms = [
        consistency(kind, outputs[i], outputs[j], mask, reduction)
        for i in range(m)
        for j in range(i + 1, m)
    ]
    return torch.stack(terms).mean(dim=0)
