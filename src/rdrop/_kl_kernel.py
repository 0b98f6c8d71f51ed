"""Chunked symmetric-KL (and fused cross-entropy + KL) autograd kernel.

Private; use :func:`rdrop.symmetric_kl`, :func:`rdrop.rdrop_loss` or the functions of
:mod:`rdrop.fused`.

Forward and backward walk the rows in chunks and recompute the probabilities in backward
instead of saving them. Every chunk temporary lives in a few preallocated chunk-sized
float32 buffers, the gradients are written straight into the (single) gradient tensor that
autograd returns, and only a per-row flag is saved between the passes, so the only
logits-sized buffers are the gradients autograd must return anyway.

Per row, with ``p = softmax(z_a)``, ``q = softmax(z_b)`` and ``lse`` the log-sum-exp::

    d         = log p - log q = (z_a - z_b) - (lse_a - lse_b)
    value     = 1/2 * sum_c (p_c - q_c) d_c            (= 1/2 (KL(p||q) + KL(q||p)))
    d/d z_a   = 1/2 * ( p * (d + 1 - KL(p||q)) - q )
    d/d z_b   = 1/2 * ( q * (1 - d - KL(q||p)) - p )

and for the (label-smoothed, ``eps``) cross-entropy of a pass with target ``t``::

    ce        = lse - (1 - eps) z_t - eps * mean_c z_c
    d/d z     = p - (1 - eps) onehot(t) - eps / C

Each probability costs one fused ``softmax`` (no separate ``exp``); ``lse`` comes from the
same call (``max z - log max p``). ``d`` is formed from the logits, so it carries no
``log``-rounding of its own, and the value is summed as ``(p - q) d``, whose terms are small
when the passes agree (the R-Drop regime), so it stays accurate relative to a small KL.

The kernel returns per-row values (KL and the cross-entropy of both passes); the caller
reduces them with ordinary autograd, and the backward receives one weight per row and
output. Rows that are neither KL- nor CE-kept get exactly zero gradient whatever their
logits hold, and are skipped altogether (gathered away) when there are many of them.
Classes impossible in both inputs (``-inf`` logits) have ``p = q = 0`` and ``d`` is taken as
``0`` there; this repair runs only on rows whose value came out NaN, so it costs nothing on
ordinary inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rdrop._double_backward import building_graph, differentiable_grads, rows_reference

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "chunked_symmetric_kl",
    "fused_rows",
    "ChunkMath",
]

# Logits per chunk and input. Measured on a 2-core AVX-512 CPU at 2,048 x 32,000 (fwd+bwd):
# 2**16 - 2**19 are within noise of each other (chunk buffers stay in L2/L3); fewer, larger
# chunks are also less exposed to thread-barrier stalls on a busy machine.
DEFAULT_CHUNK_NUMEL = 1 << 18
# Gather the live rows when at least this fraction of rows is dead (masked and ignored).
# Below it, computing the dead rows and zeroing them afterwards is cheaper than the
# gather/scatter (measured at 512 x 8000: 25% dead 0.84x the time of gathering, 50% 1.4x).
_COMPACT_DEAD_FRACTION = 0.4
_INF = float("inf")
_NONES7: tuple[None, ...] = (None,) * 7


def _rows_per_chunk(num_classes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, DEFAULT_CHUNK_NUMEL // max(num_classes, 1))


def _safe_row_dot(w: Tensor, d: Tensor) -> Tensor:
    """sum_c w_c d_c with 0 * (+-inf or NaN) = 0 where the weight w_c is exactly 0."""
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    return torch.where(w == 0, zero, w * d).sum(dim=-1)


def _softmax_lse(z: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(z) into ``out`` and the row log-sum-exp (``max z - log max p``)."""
    p = torch.softmax(z, -1, out=out)
    lse = z.amax(dim=-1).sub_(p.amax(dim=-1).log_())
    return p, lse


class ChunkMath:
    """Chunk-sized float buffers and the per-chunk formulas shared by the kernels."""

    def __init__(self, rows: int, num_classes: int, dtype: torch.dtype, device: Any) -> None:
        shape = (rows, num_classes)
        self.p = torch.empty(shape, dtype=dtype, device=device)
        self.q = torch.empty(shape, dtype=dtype, device=device)
        self.d = torch.empty(shape, dtype=dtype, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)

    def probs(self, za: Tensor, zb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``p, q, d = log p - log q, lse_a, lse_b`` of a chunk (``p, q, d`` in the buffers)."""
        k = za.shape[0]
        p, lse_a = _softmax_lse(za, self.p[:k])
        q, lse_b = _softmax_lse(zb, self.q[:k])
        d = torch.sub(za, zb, out=self.d[:k]).sub_((lse_a - lse_b).unsqueeze(1))
        return p, q, d, lse_a, lse_b

    @staticmethod
    def cross_entropy(z: Tensor, lse: Tensor, t: Tensor, smoothing: float) -> Tensor:
        """Per-row ``lse - (1 - eps) z_t - eps mean(z)`` (``t``: ``[k, 1]`` class ids)."""
        zt = z.gather(1, t).squeeze(1)
        if smoothing:
            zt = zt.mul_(1.0 - smoothing).add_(z.mean(dim=-1), alpha=smoothing)
        return lse - zt

    def kl_value(
        self, p: Tensor, q: Tensor, d: Tensor, scratch: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-row ``1/2 sum (p - q) d`` and a per-row NaN flag (repaired for -inf logits).

        ``scratch=None`` overwrites ``p`` with ``p - q``.
        """
        pq = p.sub_(q) if scratch is None else torch.sub(p, q, out=scratch)
        value = torch.linalg.vecdot(pq, d)
        nan = torch.isnan(value)
        if bool(nan.any()):  # -inf logits somewhere: 0 * inf terms are 0
            value = _safe_row_dot(pq, d)
        return value.mul_(0.5), nan

    def grads(
        self,
        p: Tensor,
        q: Tensor,
        d: Tensor,
        repair: bool,
        w: Tensor,
        wce: tuple[Tensor, Tensor] | None,
        t: Tensor | None,
        smoothing: float,
        outs: tuple[Tensor | None, Tensor | None],
    ) -> None:
        """Write ``w * dKL/dz + wce * dCE/dz`` of both passes into ``outs`` (float buffers).

        ``w``/``wce``: per-row weights ``[k]``; ``d`` is destroyed. ``repair``: the chunk has
        rows with ``-inf`` logits (zero the ``0 * inf`` terms).
        """
        if repair:
            d.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)
            kl_pq, kl_qp = _safe_row_dot(p, d), _safe_row_dot(q, d).neg_()
        else:
            kl_pq, kl_qp = torch.linalg.vecdot(p, d), torch.linalg.vecdot(q, d).neg_()
        zero = self.zero
        # grad_a = p * (w d + w (1 - kl_pq) + wce_a) - w q
        # grad_b = q * (w (1 - kl_qp) + wce_b - w d) - w p
        coef_a = torch.where(w == 0, zero, w * (1.0 - kl_pq))
        coef_b = torch.where(w == 0, zero, w * (1.0 - kl_qp))
        if wce is not None:
            coef_a = coef_a + wce[0]
            coef_b = coef_b + wce[1]
        wc = w.unsqueeze(1)
        # Rows out of the KL (w = 0) must not turn a one-sided -inf into 0 * inf = NaN.
        d.mul_(wc).masked_fill_(wc == 0, 0.0)
        if repair:
            d.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)
        num_classes = p.shape[-1]
        for side, g in enumerate(outs):
            if g is None:
                continue
            if side == 0:
                torch.add(d, coef_a.unsqueeze(1), out=g).mul_(p).addcmul_(q, wc, value=-1.0)
            else:
                torch.sub(coef_b.unsqueeze(1), d, out=g).mul_(q).addcmul_(p, wc, value=-1.0)
            if wce is not None and t is not None:
                wt = wce[side].unsqueeze(1)
                if smoothing:
                    g.sub_(wt * (smoothing / num_classes))
                g.scatter_add_(1, t, wt * (smoothing - 1.0))


class _Rows:
    """Where the rows of pass a and pass b live, and how to load a chunk of them in ``dtype``."""

    def __init__(
        self,
        src_a: Tensor,
        src_b: Tensor,
        off_b: int,
        rows: Tensor | None,
        chunk: int,
        dtype: torch.dtype,
    ) -> None:
        self.src_a, self.src_b, self.off_b = src_a, src_b, off_b
        self.rows = rows  # live row ids (within a pass), or None = all rows
        self.rows_b = None if rows is None else rows + off_b
        self.view = rows is None and src_a.dtype == dtype
        shape, dev = (chunk, src_a.shape[-1]), src_a.device
        self.bufs = (
            [] if self.view else [torch.empty(shape, dtype=dtype, device=dev) for _ in range(2)]
        )
        self.gather = (
            None
            if rows is None or src_a.dtype == dtype
            else torch.empty(shape, dtype=src_a.dtype, device=dev)
        )

    def index(self, side: int, s: int, e: int) -> Tensor:
        index = self.rows if side == 0 else self.rows_b
        assert index is not None
        return index[s:e]

    def load(self, side: int, s: int, e: int) -> Tensor:
        src = self.src_a if side == 0 else self.src_b
        if self.rows is None:
            off = 0 if side == 0 else self.off_b
            rows = src[off + s : off + e]
            return rows if self.view else self.bufs[side][: e - s].copy_(rows)
        index = self.index(side, s, e)
        if self.gather is None:
            return torch.index_select(src, 0, index, out=self.bufs[side][: e - s])
        picked = torch.index_select(src, 0, index, out=self.gather[: e - s])
        return self.bufs[side][: e - s].copy_(picked)


def plan_rows(live: Tensor | None, num_rows: int) -> tuple[Tensor | None, Tensor | None, int]:
    """(live row ids or None = all, dead row ids or None, number of rows to process)."""
    if live is None:
        return None, None, num_rows
    n_live = int(live.sum())
    if n_live == num_rows:
        return None, None, num_rows
    dead = (~live).nonzero().squeeze(1)
    if num_rows - n_live >= _COMPACT_DEAD_FRACTION * num_rows:
        return live.nonzero().squeeze(1), dead, n_live
    return None, dead, num_rows


def _split(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, int, int]:
    """2-D row views ``(src_a, src_b, offset of pass b in src_b, rows per pass)``."""
    num_classes = x.shape[-1]
    x2 = x.reshape(-1, num_classes)
    if y is None:
        return x2, x2, x2.shape[0] // 2, x2.shape[0] // 2
    y2 = y.reshape(-1, num_classes)
    return x2, y2, 0, y2.shape[0]


class _FusedRows(torch.autograd.Function):
    """Per-row symmetric KL and (optionally) per-row cross-entropy of both passes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        y: Tensor | None,
        target: Tensor | None,
        ce_keep: Tensor | None,
        kl_keep: Tensor | None,
        smoothing: float,
        rows_per_chunk: int,
    ) -> tuple[Tensor, Tensor]:
        num_classes = x.shape[-1]
        dtype = torch.promote_types(x.dtype, torch.float32)
        dev = x.device
        x2, src_b, off_b, num_rows = _split(x, y)
        live = kl_keep
        if target is not None:
            live = None if ce_keep is None or kl_keep is None else ce_keep | kl_keep
        rows, dead, n = plan_rows(live, num_rows)
        r = min(rows_per_chunk, max(n, 1))
        layout = _Rows(x2, src_b, off_b, rows, r, dtype)
        math = ChunkMath(r, num_classes, dtype, dev)
        tgt = None
        if target is not None:
            tgt = target if ce_keep is None else target.masked_fill(~ce_keep, 0)
            if rows is not None:
                tgt = tgt.index_select(0, rows)
        kl = torch.empty(n, dtype=dtype, device=dev)
        ce = torch.empty(2, n, dtype=dtype, device=dev) if tgt is not None else None
        bad = torch.zeros(n, dtype=torch.bool, device=dev)
        for s in range(0, n, r):
            e = min(s + r, n)
            za, zb = layout.load(0, s, e), layout.load(1, s, e)
            p, q, d, lse_a, lse_b = math.probs(za, zb)
            if ce is not None and tgt is not None:
                t = tgt[s:e].unsqueeze(1)
                ce[0, s:e] = math.cross_entropy(za, lse_a, t, smoothing)
                ce[1, s:e] = math.cross_entropy(zb, lse_b, t, smoothing)
            kl[s:e], bad[s:e] = math.kl_value(p, q, d, None)

        def expand(v: Tensor) -> Tensor:
            if rows is None:
                return v
            return torch.zeros(num_rows, dtype=v.dtype, device=dev).index_copy_(0, rows, v)

        zero = math.zero
        kl_rows = expand(kl)
        if kl_keep is not None:
            kl_rows = torch.where(kl_keep, kl_rows, zero)
        if ce is not None:
            ce_rows = torch.stack([expand(ce[0]), expand(ce[1])])
            if ce_keep is not None:
                ce_rows = torch.where(ce_keep, ce_rows, zero)
        else:
            ce_rows = torch.zeros(2, 0, dtype=dtype, device=dev)
            ctx.mark_non_differentiable(ce_rows)
        ctx.save_for_backward(x, y, tgt, ce_keep, kl_keep, rows, dead, bad, target)
        ctx.meta = (n, r, smoothing, dtype)
        return kl_rows, ce_rows

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, y, tgt, ce_keep, kl_keep, rows, dead, bad, target = ctx.saved_tensors
        n, r, smoothing, dtype = ctx.meta
        if building_graph():  # double backward: differentiate the plain-autograd rows
            with torch.enable_grad():
                kl_ref, ce_ref = rows_reference(x, y, target, ce_keep, kl_keep, smoothing)
            grad_x, grad_y = differentiable_grads(
                [kl_ref, ce_ref], [grad_kl, grad_ce], [x, y], ctx.needs_input_grad[:2]
            )
            return (grad_x, grad_y, *_NONES7[2:])
        concat = y is None
        need = (ctx.needs_input_grad[0], (not concat) and ctx.needs_input_grad[1])
        if not any(need):
            return _NONES7
        dev = x.device
        x2, src_b, off_b, _ = _split(x, y)
        layout = _Rows(x2, src_b, off_b, rows, r, dtype)
        math = ChunkMath(r, x.shape[-1], dtype, dev)
        zero = math.zero

        def live_rows(v: Tensor) -> Tensor:
            return v if rows is None else v.index_select(0, rows)

        # Per-row weights of the two parts (masked rows exactly 0, even if grad is NaN).
        w = 0.5 * grad_kl.to(dtype)
        if kl_keep is not None:
            w = torch.where(kl_keep, w, zero)
        w = live_rows(w)
        wce = None
        if tgt is not None:
            wce = grad_ce.to(dtype)
            if ce_keep is not None:
                wce = torch.where(ce_keep, wce, zero)
            wce = torch.stack([live_rows(wce[0]), live_rows(wce[1])])

        if concat:
            grad_a = grad_b = torch.empty_like(x2)
        else:
            grad_a = torch.empty_like(x2) if need[0] else None
            grad_b = torch.empty_like(src_b) if need[1] else None
        direct = rows is None and x.dtype == dtype  # write straight into the gradient
        scratch = (
            None
            if direct
            else [torch.empty(r, x.shape[-1], dtype=dtype, device=dev) for _ in range(2)]
        )
        dsts = (grad_a if concat or need[0] else None, grad_b if concat or need[1] else None)
        offs = (0, off_b)
        for s in range(0, n, r):
            e = min(s + r, n)
            k = e - s
            p, q, d, _, _ = math.probs(layout.load(0, s, e), layout.load(1, s, e))
            outs = tuple(
                None
                if dst is None
                else (dst[off + s : off + e] if scratch is None else scratch[i][:k])
                for i, (dst, off) in enumerate(zip(dsts, offs))
            )
            math.grads(
                p,
                q,
                d,
                bool(bad[s:e].any()),
                w[s:e],
                None if wce is None else (wce[0, s:e], wce[1, s:e]),
                None if tgt is None else tgt[s:e].unsqueeze(1),
                smoothing,
                outs,  # type: ignore[arg-type]
            )
            if scratch is None:
                continue
            for i, (dst, off) in enumerate(zip(dsts, offs)):
                if dst is None:
                    continue
                if rows is None:
                    dst[off + s : off + e].copy_(scratch[i][:k])
                else:
                    dst.index_copy_(0, layout.index(i, s, e), scratch[i][:k].to(dst.dtype))
        if dead is not None:
            for dst, off in zip(dsts, offs):
                if dst is not None:
                    dst.index_fill_(0, dead + off, 0.0)
        if concat:
            assert grad_a is not None
            return (grad_a.reshape(x.shape), *_NONES7[1:])
        return (
            None if grad_a is None else grad_a.reshape(x.shape),
            None if grad_b is None or y is None else grad_b.reshape(y.shape),
            *_NONES7[2:],
        )


def fused_rows(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    smoothing: float,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``(kl [R], ce [2, R])`` of two passes (rows of ``x``/``y`` flattened).

    ``y=None``: ``x`` holds both passes concatenated along its rows (pass a = first half),
    and the gradient is one tensor like ``x``. ``target`` (``[R]`` class ids, or ``None``
    for the KL only) with ``ce_keep`` (``[R]`` bool or ``None`` = all) selects the
    cross-entropy rows; ``kl_keep`` (``[R]`` bool or ``None`` = all) the KL rows. Rows not
    kept are exactly 0 in value and gradient. ``ce`` is the unreduced (label-smoothed)
    cross-entropy of pass a (row 0) and pass b (row 1).
    """
    rows = _rows_per_chunk(x.shape[-1], chunk_size)
    return _FusedRows.apply(x, y, target, ce_keep, kl_keep, float(smoothing), rows)


def chunked_symmetric_kl(
    logits_a: Tensor, logits_b: Tensor, mask: Tensor | None, chunk_size: int | None
) -> Tensor:
    """Per-item symmetric KL (item shape = ``logits_a.shape[:-1]``), masked items 0."""
    keep = None if mask is None else mask.reshape(-1)
    kl, _ = fused_rows(logits_a, logits_b, None, None, keep, 0.0, chunk_size)
    return kl.reshape(logits_a.shape[:-1])
