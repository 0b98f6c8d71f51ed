"""Fused R-Drop losses: the cross-entropy of both passes and their symmetric KL in one pass.

Two entry points, both for the common case of ``m = 2`` passes with a cross-entropy task:

* :func:`rdrop_cross_entropy` takes the logits of the concatenated batch ``[2B, ..., V]``
  (what one forward on ``[x; x]`` returns) and walks them once, in row chunks, computing
  the (label-smoothed) cross-entropy of both halves and their symmetric KL together. Its
  backward writes the gradient of the whole objective into a single ``[2B, ..., V]``
  tensor; no logits-sized temporaries are held.
* :func:`rdrop_linear_cross_entropy` takes the final hidden states ``[2B, ..., H]`` and the
  output projection (``weight [V, H]``, optional ``bias [V]``) instead, and never
  materializes the ``[2B, ..., V]`` logits or their gradient: each chunk of rows is
  projected, scored and differentiated, and only ``[2B, ..., H]`` and ``[V, H]`` gradients
  are kept. For large vocabularies this removes the largest activation of the model.

Both compute, with the library's alpha convention (see :func:`rdrop.rdrop_loss`)::

    loss = 1/2 * (CE(z_1, y) + CE(z_2, y)) + (alpha / 2) * D(z_1, z_2)

where ``z_1``/``z_2`` are the two halves, ``CE`` is the mean over targets that are not
``ignore_index`` (optionally label-smoothed) and ``D`` is :func:`rdrop.symmetric_kl`
averaged over the items kept by ``mask`` and ``ignore_index``. All arithmetic is float32
(float64 for float64 inputs) in log space.

The kernels themselves live in one private module with one chunk loop for both entry
points. They read a few values back from the device (on a GPU, a wait for the queued
work): the count of kept rows when ``mask`` or ``ignore_index`` drops some, one flag per
chunk (forward and backward) saying whether ``-inf`` logits need the NaN repair, the
kept-item counts of the hidden-state path, and one more for ``check_finite=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rdrop._checks import check_alpha, check_int, check_label_smoothing
from rdrop._fused_kernel import fused_terms, linear_terms
from rdrop.losses import RDropOutput, _check_finite, rdrop_loss

__all__ = ["rdrop_cross_entropy", "rdrop_linear_cross_entropy"]


def _pass_batch_size(x: Tensor, owner: str, num_passes: int) -> int:
    """Rows per pass of ``num_passes`` concatenated copies (dim 0 must divide evenly)."""
    if x.shape[0] % num_passes:
        raise ValueError(
            f"{owner} first dimension ({x.shape[0]}) is not a multiple of num_passes={num_passes}"
        )
    return x.shape[0] // num_passes


def _check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(
            f"the fused cross-entropy needs at least 2 classes, got {num_classes}: with one "
            "class the KL is always 0; use rdrop.rdrop_loss(task='mse') for regression or "
            "task='bce' for a sigmoid output"
        )


def _check_common(num_passes: int, label_smoothing: float, chunk_size: int | None) -> None:
    check_int("num_passes", num_passes, 2)
    check_label_smoothing(label_smoothing)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)


def rdrop_cross_entropy(
    logits: Tensor,
    target: Tensor | None,
    alpha: float = 1.0,
    *,
    num_passes: int = 2,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> RDropOutput:
    """R-Drop cross-entropy + symmetric KL of the concatenated logits, in one fused pass.

    ``logits`` is the output of one forward on the concatenated batch ``[x; x]``: pass 1 is
    ``logits[:B]``, pass 2 ``logits[B:]``. With ``z_1, z_2`` the halves::

        loss = 1/2 * (CE(z_1, y) + CE(z_2, y)) + (alpha / 2) * D(z_1, z_2)
        D    = mean over kept items of 1/2 * sum_c (p_1c - p_2c) (log p_1c - log p_2c)

    Same value and gradient as ``rdrop.rdrop_loss(list(logits.chunk(2)), target, alpha,
    ...)`` (to float32 rounding), but one chunked pass over the logits in forward and one in
    backward, writing the gradient straight into a single tensor like ``logits``: the
    extra memory is that gradient plus a few chunk buffers. ``num_passes > 2`` falls back
    to :func:`rdrop.rdrop_loss`. A double backward (gradient penalties, Hessian-vector
    products) differentiates the plain-autograd formula instead, at its memory cost.

    Example:
        >>> import torch
        >>> from rdrop.fused import rdrop_cross_entropy
        >>> logits = torch.randn(2 * 4, 7, 50, requires_grad=True)  # [2B, T, V]
        >>> target = torch.randint(0, 50, (4, 7)); target[:, 5:] = -100  # padding
        >>> out = rdrop_cross_entropy(logits, target, alpha=5.0)
        >>> out.loss.backward()
        >>> logits.grad.shape
        torch.Size([8, 7, 50])
        >>> import rdrop
        >>> ref = rdrop.rdrop_loss(list(logits.detach().chunk(2)), target, alpha=5.0,
        ...                        implementation="reference")
        >>> bool(torch.allclose(out.loss, ref.loss))
        True

    Args:
        logits: ``[m * B, ..., V]`` logits of the concatenated passes, any float dtype.
        target: ``[B, ...]`` class ids (``ignore_index`` = padding), or ``None`` for an
            unlabeled batch (the consistency term only, as in semi-supervised R-Drop).
        alpha: consistency weight ``>= 0``.
        num_passes: ``m``; ``2`` is fused, larger values use :func:`rdrop.rdrop_loss`.
        ignore_index: target value excluded from the cross-entropy *and* the KL.
        label_smoothing: applied to the cross-entropy only.
        mask: optional boolean item mask ``[B, ...]`` (``True`` = keep) for the KL.
        chunk_size: rows per chunk (default: about 2**18 logits a chunk and pass); two
            passes only (``num_passes > 2`` runs the unchunked :func:`rdrop.rdrop_loss`).
            On CPU, giving it selects the chunked ATen kernel instead of the C++ one.
        check_finite: raise a ``ValueError`` when the loss is not finite.

    Returns:
        :class:`rdrop.RDropOutput` with ``loss``, ``task_loss`` and ``consistency_loss``
        (all differentiable).
    """
    alpha = check_alpha(alpha)
    _check_common(num_passes, label_smoothing, chunk_size)
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim < 2:
        raise TypeError("logits must be a floating-point tensor of shape [m * B, ..., V]")
    _check_classes(logits.shape[-1])
    batch = _pass_batch_size(logits, "logits'", num_passes)
    if num_passes != 2:
        return rdrop_loss(
            list(logits.split(batch)),
            target,
            alpha,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            mask=mask,
            check_finite=check_finite,
        )
    task_value, consistency = fused_terms(
        logits.contiguous(),
        None,
        torch.Size((batch, *logits.shape[1:-1])),
        target,
        ignore_index,
        label_smoothing,
        mask,
        chunk_size,
    )
    out = RDropOutput(task_value + (alpha / 2.0) * consistency, task_value, consistency, alpha)
    if check_finite:
        _check_finite(out, [logits])
    return out


def rdrop_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor | None,
    alpha: float = 1.0,
    *,
    bias: Tensor | None = None,
    num_passes: int = 2,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> RDropOutput:
    """R-Drop loss of ``hidden @ weight.T + bias`` without materializing those logits.

    ``hidden`` holds the final hidden states of the concatenated batch ``[x; x]`` (pass 1
    = ``hidden[:B]``), ``weight``/``bias`` the output projection in ``nn.Linear`` layout.
    With ``z = hidden @ weight.T + bias`` split into halves ``z_1, z_2``::

        loss = 1/2 * (CE(z_1, y) + CE(z_2, y)) + (alpha / 2) * D(z_1, z_2)

    exactly as :func:`rdrop_cross_entropy` on ``z``. Rows are processed in chunks (both
    passes of a row together): each chunk's logits are computed, scored and
    differentiated at once, and the gradients w.r.t. ``hidden``, ``weight`` and ``bias``
    are accumulated during the forward, so neither the ``[2B, ..., V]`` logits nor their
    gradient ever exist. Peak extra memory: ``[2B, ..., H]`` + ``[V, H]`` gradients and a
    few chunk buffers. Matmuls run in the inputs' dtype, the loss in float32. On CPU each
    chunk's logits are scored by the C++ row kernel (one vectorised sweep per row in
    forward and one in backward) unless ``RDROP_NO_CPP=1`` or it cannot be built; chunks
    it refuses (rows that are not finite) and other devices without Triton use the ATen
    formulas. Unlike :func:`rdrop_cross_entropy`, giving ``chunk_size`` only sizes the
    chunks here; it does not select a kernel.

    Only ``loss`` carries a gradient (computed for the alpha given here); ``task_loss``
    and ``consistency_loss`` are detached values for logging. ``num_passes > 2`` computes
    the logits and falls back to :func:`rdrop.rdrop_loss`.

    Example:
        >>> import torch
        >>> from rdrop.fused import rdrop_linear_cross_entropy
        >>> head = torch.nn.Linear(16, 1000)
        >>> hidden = torch.randn(2 * 3, 5, 16, requires_grad=True)   # [2B, T, H]
        >>> target = torch.randint(0, 1000, (3, 5))
        >>> out = rdrop_linear_cross_entropy(hidden, head.weight, target, alpha=1.0,
        ...                                  bias=head.bias)
        >>> out.loss.backward()
        >>> hidden.grad.shape, head.weight.grad.shape
        (torch.Size([6, 5, 16]), torch.Size([1000, 16]))

    Args:
        hidden: ``[m * B, ..., H]`` final hidden states of the concatenated passes.
        weight: ``[V, H]`` output projection.
        target: ``[B, ...]`` class ids, or ``None`` (consistency term only).
        alpha: consistency weight ``>= 0``.
        bias: optional ``[V]`` output bias.
        num_passes, ignore_index, label_smoothing, mask, chunk_size, check_finite: as for
            :func:`rdrop_cross_entropy` (``chunk_size`` = rows per pass and chunk; default
            about 2**23 logits per two-pass chunk).

    Returns:
        :class:`rdrop.RDropOutput`; ``loss`` is differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``.
    """
    alpha = check_alpha(alpha)
    _check_common(num_passes, label_smoothing, chunk_size)
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if hidden.ndim < 2 or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected hidden [m * B, ..., H] and weight [V, H], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if bias is not None and (bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError("hidden, weight and bias must have the same dtype")
    _check_classes(weight.shape[0])
    _pass_batch_size(hidden, "hidden's", num_passes)  # dim 0 holds whole passes
    if num_passes != 2:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return rdrop_cross_entropy(
            logits,
            target,
            alpha,
            num_passes=num_passes,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            mask=mask,
            check_finite=check_finite,
        )
    loss, task_value, consistency = linear_terms(
        hidden,
        weight,
        bias,
        target,
        alpha,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        mask=mask,
        chunk_size=chunk_size,
    )
    out = RDropOutput(loss, task_value.detach(), consistency.detach(), alpha)
    if check_finite and not bool(torch.isfinite(loss)):
        raise ValueError(
            f"R-Drop loss is not finite: task_loss={float(task_value)}, "
            f"consistency_loss={float(consistency)}. Pass check_finite=False to skip this check."
        )
    return out
