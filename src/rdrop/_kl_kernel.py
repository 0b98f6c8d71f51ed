"""Chunked symmetric-KL autograd kernel (private; use :func:`rdrop.symmetric_kl`).

Forward and backward walk the rows in chunks and recompute the log-probabilities in
backward instead of saving them, so the only logits-sized buffers are the two gradients
that autograd must return. Per row, with ``d = log p - log q``::

    value     = 1/2 * sum_c (p_c - q_c) d_c
    d/d z_a   = 1/2 * ( p * (d - KL(p||q)) + p - q )
    d/d z_b   = 1/2 * ( q * (-d - KL(q||p)) + q - p )

(``KL(p||q) = sum_c p_c d_c``). Classes impossible in both inputs (``-inf`` logits) have
``p = q = 0`` and ``d`` is taken as ``0`` there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_TARGET_CHUNK_NUMEL = 1 << 20


def _rows_per_chunk(num_classes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, _TARGET_CHUNK_NUMEL // max(num_classes, 1))


def _log_probs(a: Tensor, b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 log-probabilities of one chunk and their difference (0 where both are -inf)."""
    log_p = torch.log_softmax(a.to(dtype), dim=-1)
    log_q = torch.log_softmax(b.to(dtype), dim=-1)
    diff = log_p - log_q
    both_impossible = torch.isneginf(log_p) & torch.isneginf(log_q)
    diff = diff.masked_fill_(both_impossible, 0.0)
    return log_p, log_q, diff


class _ChunkedSymmetricKL(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits_a: Tensor, logits_b: Tensor, mask: Tensor | None, rows: int
    ) -> Tensor:
        num_classes = logits_a.shape[-1]
        dtype = torch.promote_types(logits_a.dtype, torch.float32)
        a = logits_a.reshape(-1, num_classes)
        b = logits_b.reshape(-1, num_classes)
        keep = None if mask is None else mask.reshape(-1)
        out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
        for start in range(0, a.shape[0], rows):
            stop = min(start + rows, a.shape[0])
            log_p, log_q, diff = _log_probs(a[start:stop], b[start:stop], dtype)
            value = 0.5 * ((log_p.exp_() - log_q.exp_()) * diff).sum(dim=-1)
            if keep is not None:
                value = value.masked_fill_(~keep[start:stop], 0.0)
            out[start:stop] = value
        ctx.save_for_backward(logits_a, logits_b, mask)
        ctx.rows = rows
        return out.reshape(logits_a.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        logits_a, logits_b, mask = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_classes = logits_a.shape[-1]
        dtype = torch.promote_types(logits_a.dtype, torch.float32)
        a = logits_a.reshape(-1, num_classes)
        b = logits_b.reshape(-1, num_classes)
        keep = None if mask is None else mask.reshape(-1, 1)
        go = grad_out.reshape(-1, 1).to(dtype)
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.empty_like(b) if need_b else None
        for start in range(0, a.shape[0], ctx.rows):
            stop = min(start + ctx.rows, a.shape[0])
            log_p, log_q, diff = _log_probs(a[start:stop], b[start:stop], dtype)
            p, q = log_p.exp_(), log_q.exp_()
            scale = 0.5 * go[start:stop]
            row_keep = None if keep is None else keep[start:stop]
            if grad_a is not None:
                kl_pq = (p * diff).sum(dim=-1, keepdim=True)
                g = (p * (diff - kl_pq) + p - q) * scale
                if row_keep is not None:
                    g = g.masked_fill_(~row_keep, 0.0)
                grad_a[start:stop] = g
            if grad_b is not None:
                kl_qp = (q * diff).sum(dim=-1, keepdim=True).neg_()
                g = (q * (diff.neg_() - kl_qp) + q - p) * scale
                if row_keep is not None:
                    g = g.masked_fill_(~row_keep, 0.0)
                grad_b[start:stop] = g
        return (
            None if grad_a is None else grad_a.reshape(logits_a.shape),
            None if grad_b is None else grad_b.reshape(logits_b.shape),
            None,
            None,
        )


def chunked_symmetric_kl(
    logits_a: Tensor, logits_b: Tensor, mask: Tensor | None, chunk_size: int | None
) -> Tensor:
    """Per-item symmetric KL (item shape = ``logits_a.shape[:-1]``), masked items 0."""
    rows = _rows_per_chunk(logits_a.shape[-1], chunk_size)
    return _ChunkedSymmetricKL.apply(logits_a, logits_b, mask, rows)
