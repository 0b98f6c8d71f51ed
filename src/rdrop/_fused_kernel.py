"""The fused R-Drop kernels: the symmetric KL of two passes, optionally with the
cross-entropy of both, from logits or from hidden states and the output projection.

Private; use :func:`rdrop.symmetric_kl`, :func:`rdrop.rdrop_loss` or the functions of
:mod:`rdrop.fused`.

Every kernel walks the rows in chunks (the logits kernel with :func:`_chunks`, the
hidden-state kernel projecting each chunk and scoring it with :class:`_ChunkTerms`, which
runs the C++ row kernel on CPU) and recomputes the probabilities where it needs them
instead of saving them. Chunk temporaries live in a few
preallocated chunk-sized float32 buffers (:class:`ChunkMath`), gradients are written
straight into the tensor autograd returns, and only per-row values are saved between the
passes, so the only logits-sized buffers are the gradients autograd must return anyway
(and none at all for the hidden-state path, which never forms the logits).

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

Rows that are neither KL- nor CE-kept get exactly zero gradient whatever their logits
hold, and are skipped altogether (gathered away) when there are many of them. Classes
impossible in both inputs (``-inf`` logits) have ``p = q = 0`` and ``d`` is taken as ``0``
there; this repair runs only on rows whose value came out NaN.

Host synchronisation: the kernels read a few values back from the device, which on a GPU
waits for the queued work. Per call: the number of kept rows when a mask or
``ignore_index`` drops some (:func:`plan_rows`; the hidden-state path always gathers the
kept rows), and the counts of kept items in :func:`linear_terms`. Per chunk: one flag
saying whether the chunk's KL came out NaN (``-inf`` logits), in the forward and again in
the backward. ``check_finite`` in the public functions adds one more per call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rdrop import _cpu_kernel
from rdrop._checks import check_class_ids, check_mask
from rdrop._double_backward import building_graph, linear_second_order, rows_second_order
from rdrop._rows import live_row_ids, live_rows

__all__ = [
    "ATEN_KL_MIN_NUMEL",
    "CPP_KL_MIN_NUMEL",
    "CPP_MIN_NUMEL",
    "DEFAULT_CHUNK_NUMEL",
    "FUSED_MIN_NUMEL",
    "ChunkMath",
    "chunked_symmetric_kl",
    "auto_min_numel",
    "concatenated_base",
    "direct_symmetric_kl",
    "fused_rows",
    "fused_terms",
    "fused_unsupported",
    "linear_terms",
    "two_pass_keeps",
]

# Logits per chunk and input. Measured on a 2-core AVX-512 CPU at 2,048 x 32,000 (fwd+bwd):
# 2**16 - 2**19 are within noise of each other (chunk buffers stay in L2/L3); fewer, larger
# chunks are also less exposed to thread-barrier stalls on a busy machine.
DEFAULT_CHUNK_NUMEL = 1 << 18
# Logits per [2k, V] chunk of the hidden-state path. Each chunk re-reads and re-writes the
# whole [V, H] weight gradient, so chunks must be large (k = 128 rows per pass at V = 32000
# was fastest on CPU, 2**20 15% slower); the chunk buffers are then ~4x this many floats,
# still far below the [2B, V] logits and gradient they replace.
LINEAR_CHUNK_NUMEL = 1 << 23
# rdrop_loss(implementation="auto") uses the fused kernel from this many logits per pass
# on (below it the plain autograd graph is as fast; see benchmarks/).
FUSED_MIN_NUMEL = 1 << 15
# The same thresholds when the C++ row kernel runs (CPU; measured at 1 thread by the shape
# sweep of benchmarks/, results/benchmarks_sweep.md): it beat the plain graph at every size
# measured, from 64 x 10 logits on, for the loss (CE + KL) and for the KL alone.
CPP_MIN_NUMEL = 1 << 9
CPP_KL_MIN_NUMEL = 1 << 9
# symmetric_kl(implementation="auto") with the ATen kernel.
ATEN_KL_MIN_NUMEL = 1 << 18
# Gather the live rows when at least this fraction of rows is dead (masked and ignored).
# Below it, computing the dead rows and zeroing them afterwards is cheaper than the
# gather/scatter (measured at 512 x 8000: 25% dead 0.84x the time of gathering, 50% 1.4x).
_COMPACT_DEAD_FRACTION = 0.4
_INF = float("inf")


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


class Chunk(NamedTuple):
    """Rows ``start:stop`` of both passes: logits, probabilities and ``d = log p - log q``."""

    start: int
    stop: int
    za: Tensor
    zb: Tensor
    p: Tensor
    q: Tensor
    d: Tensor
    lse_a: Tensor
    lse_b: Tensor


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

    @staticmethod
    def kl_value(chunk: Chunk, *, scratch: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-row ``1/2 sum (p - q) d`` and a per-row NaN flag (repaired for -inf logits).

        ``scratch=None`` overwrites ``chunk.p`` with ``p - q``. One host sync (the flag).
        """
        p, q, d = chunk.p, chunk.q, chunk.d
        pq = p.sub_(q) if scratch is None else torch.sub(p, q, out=scratch)
        value = torch.linalg.vecdot(pq, d)
        nan = torch.isnan(value)
        if bool(nan.any()):  # -inf logits somewhere: 0 * inf terms are 0
            value = _safe_row_dot(pq, d)
        return value.mul_(0.5), nan

    def grads(
        self,
        chunk: Chunk,
        *,
        kl_weight: Tensor,
        out_a: Tensor | None,
        out_b: Tensor | None,
        repair: bool,
        ce_weights: tuple[Tensor, Tensor] | None = None,
        target: Tensor | None = None,
        smoothing: float = 0.0,
    ) -> None:
        """Write ``kl_weight * dKL/dz + ce_weight * dCE/dz`` of both passes into ``out_a``
        and ``out_b`` (float buffers; ``None``: that pass's gradient is not needed).

        Args:
            chunk: the chunk (its ``d`` is destroyed).
            kl_weight: per-row weight ``[k]`` of the KL (half the caller's, see the
                module docstring's 1/2).
            out_a, out_b: ``[k, V]`` outputs.
            repair: the chunk has rows with ``-inf`` logits (zero the ``0 * inf`` terms).
            ce_weights: per-row weights ``[k]`` of each pass's cross-entropy, or ``None``.
            target: ``[k, 1]`` class ids of the cross-entropy.
            smoothing: its label smoothing.
        """
        p, q, d = chunk.p, chunk.q, chunk.d
        if repair:
            d.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)
            kl_pq, kl_qp = _safe_row_dot(p, d), _safe_row_dot(q, d).neg_()
        else:
            kl_pq, kl_qp = torch.linalg.vecdot(p, d), torch.linalg.vecdot(q, d).neg_()
        zero, w = self.zero, kl_weight
        # grad_a = p * (w d + w (1 - kl_pq) + wce_a) - w q
        # grad_b = q * (w (1 - kl_qp) + wce_b - w d) - w p
        coef_a = torch.where(w == 0, zero, w * (1.0 - kl_pq))
        coef_b = torch.where(w == 0, zero, w * (1.0 - kl_qp))
        if ce_weights is not None:
            coef_a = coef_a + ce_weights[0]
            coef_b = coef_b + ce_weights[1]
        wc = w.unsqueeze(1)
        # Rows out of the KL (w = 0) must not turn a one-sided -inf into 0 * inf = NaN.
        d.mul_(wc).masked_fill_(wc == 0, 0.0)
        if repair:
            d.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)
        num_classes = p.shape[-1]
        for side, g in enumerate((out_a, out_b)):
            if g is None:
                continue
            if side == 0:
                torch.add(d, coef_a.unsqueeze(1), out=g).mul_(p).addcmul_(q, wc, value=-1.0)
            else:
                torch.sub(coef_b.unsqueeze(1), d, out=g).mul_(q).addcmul_(p, wc, value=-1.0)
            if ce_weights is not None and target is not None:
                wt = ce_weights[side].unsqueeze(1)
                if smoothing:
                    g.sub_(wt * (smoothing / num_classes))
                g.scatter_add_(1, target, wt * (smoothing - 1.0))


def _chunks(
    num_rows: int,
    rows_per_chunk: int,
    load: Callable[[int, int], tuple[Tensor, Tensor]],
    math: ChunkMath,
) -> Iterator[Chunk]:
    """The chunk loop of the logits kernel: rows ``start:stop`` of both passes, as
    ``load`` gives them (``(za, zb)`` in the compute dtype), with their softmax statistics."""
    for start in range(0, num_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_rows)
        za, zb = load(start, stop)
        yield Chunk(start, stop, za, zb, *math.probs(za, zb))


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

    def side(self, side: int, s: int, e: int) -> Tensor:
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

    def load(self, s: int, e: int) -> tuple[Tensor, Tensor]:
        return self.side(0, s, e), self.side(1, s, e)


def plan_rows(live: Tensor | None, num_rows: int) -> tuple[Tensor | None, Tensor | None, int]:
    """(live row ids or None = all, dead row ids or None, number of rows to process).

    One host sync when some rows may be dead (``live`` given).
    """
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


@dataclass(frozen=True)
class _RowsSpec:
    """The non-tensor options of :class:`_FusedRows`."""

    smoothing: float
    rows_per_chunk: int


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
        spec: _RowsSpec,
    ) -> tuple[Tensor, Tensor]:
        num_classes = x.shape[-1]
        dtype = torch.promote_types(x.dtype, torch.float32)
        dev = x.device
        x2, src_b, off_b, num_rows = _split(x, y)
        rows, dead, n = plan_rows(live_rows(ce_keep, kl_keep, target is not None), num_rows)
        r = min(spec.rows_per_chunk, max(n, 1))
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
        for chunk in _chunks(n, r, layout.load, math):
            s, e = chunk.start, chunk.stop
            if ce is not None and tgt is not None:
                t = tgt[s:e].unsqueeze(1)
                ce[0, s:e] = math.cross_entropy(chunk.za, chunk.lse_a, t, spec.smoothing)
                ce[1, s:e] = math.cross_entropy(chunk.zb, chunk.lse_b, t, spec.smoothing)
            kl[s:e], bad[s:e] = math.kl_value(chunk, scratch=None)

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
        ctx.meta = (n, r, spec.smoothing, dtype)
        return kl_rows, ce_rows

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, y, tgt, ce_keep, kl_keep, rows, dead, bad, target = ctx.saved_tensors
        n, r, smoothing, dtype = ctx.meta
        nones = (None,) * 4  # target, ce_keep, kl_keep, spec
        if building_graph():  # double backward: differentiate the plain-autograd rows
            grads = rows_second_order(
                x,
                y,
                target,
                ce_keep,
                kl_keep,
                smoothing,
                grad_kl,
                grad_ce,
                ctx.needs_input_grad[:2],
            )
            return (*grads, *nones)
        concat = y is None
        need = (ctx.needs_input_grad[0], (not concat) and ctx.needs_input_grad[1])
        if not any(need):
            return (None, None, *nones)
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
        for chunk in _chunks(n, r, layout.load, math):
            s, e = chunk.start, chunk.stop
            k = e - s
            out_a, out_b = (
                None
                if dst is None
                else (dst[off + s : off + e] if scratch is None else scratch[i][:k])
                for i, (dst, off) in enumerate(zip(dsts, offs))
            )
            math.grads(
                chunk,
                kl_weight=w[s:e],
                out_a=out_a,
                out_b=out_b,
                repair=bool(bad[s:e].any()),
                ce_weights=None if wce is None else (wce[0, s:e], wce[1, s:e]),
                target=None if tgt is None else tgt[s:e].unsqueeze(1),
                smoothing=smoothing,
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
            return (grad_a.reshape(x.shape), None, *nones)
        return (
            None if grad_a is None else grad_a.reshape(x.shape),
            None if grad_b is None or y is None else grad_b.reshape(y.shape),
            *nones,
        )


@dataclass(frozen=True)
class _LinearSpec:
    """The non-tensor options of :class:`_LinearRDrop`."""

    n_ce: int  # kept cross-entropy items (per pass)
    n_kl: int  # kept KL items
    alpha: float
    smoothing: float
    rows_per_chunk: int
    want_grad: bool  # compute the gradients (in forward)

    def reference_args(self) -> tuple[int, int, float, float]:
        return self.n_ce, self.n_kl, self.alpha, self.smoothing


class _ChunkTerms:
    """Per-row KL and cross-entropy of one chunk of logits rows, and their weighted
    gradient: the C++ row kernel where it runs, else (and for rows that are not finite)
    the ATen formulas of :class:`ChunkMath`, whose buffers are made only when needed."""

    def __init__(
        self,
        rows: int,
        num_classes: int,
        dtype: torch.dtype,
        device: Any,
        smoothing: float,
        target: Tensor | None,
        ce_keep: Tensor | None,
    ) -> None:
        self.shape = (rows, num_classes, dtype, device)
        self.smoothing = smoothing
        probe = torch.empty(0, dtype=dtype, device=device)
        self.ops = _cpu_kernel.load() if _cpu_kernel.supports(probe) else None
        self.math: ChunkMath | None = None
        # class ids per row: 0 where the row has no cross-entropy (ATen: its weight is 0),
        # -1 there for the C++ kernel (which then skips the row's cross-entropy)
        self.target, self.target_cpp = None, None
        if target is not None:
            self.target = target if ce_keep is None else target.masked_fill(~ce_keep, 0)
            self.target_cpp = target if ce_keep is None else target.masked_fill(~ce_keep, -1)
            self.target_cpp = self.target_cpp.to(torch.int64)

    def __call__(
        self,
        za: Tensor,
        zb: Tensor,
        rows: Tensor,
        *,
        kl_weight: Tensor,
        ce_weight: Tensor | None,
        grad: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """``(kl [k], ce [2, k])`` of rows ``rows`` (logits ``za``, ``zb``); with ``grad``
        (``[2k, V]``) the gradient of ``sum(2 kl_weight kl + ce_weight ce)`` written into it."""
        if self.ops is not None:
            t = None if self.target_cpp is None else self.target_cpp.index_select(0, rows)
            wce = None if ce_weight is None else torch.stack([ce_weight, ce_weight])
            found = _cpu_kernel.pair_terms(
                self.ops, za, zb, t, self.smoothing, kl_weight.float(), wce, grad
            )
            if found is not None:
                return found
        if self.math is None:
            self.math = ChunkMath(*self.shape)
        math, k = self.math, za.shape[0]
        chunk = Chunk(0, k, za, zb, *math.probs(za, zb))
        # without a gradient, p may be overwritten by p - q (scratch=None)
        scratch = None if grad is None else grad[:k]
        t = None if self.target is None else self.target.index_select(0, rows).unsqueeze(1)
        ce = za.new_zeros(2, 0)
        if t is not None:
            ce = torch.stack(
                [
                    math.cross_entropy(za, chunk.lse_a, t, self.smoothing),
                    math.cross_entropy(zb, chunk.lse_b, t, self.smoothing),
                ]
            )
        kl, nan = math.kl_value(chunk, scratch=scratch)
        if grad is not None:
            math.grads(
                chunk,
                kl_weight=kl_weight,
                out_a=grad[:k],
                out_b=grad[k:],
                repair=bool(nan.any()),
                ce_weights=None if ce_weight is None else (ce_weight, ce_weight),
                target=t,
                smoothing=self.smoothing,
            )
        return kl, ce


class _LinearRDrop(torch.autograd.Function):
    """Loss of ``hidden @ weight.T + bias`` without the full logits; grads made in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor | None,
        ce_keep: Tensor | None,
        kl_keep: Tensor | None,
        spec: _LinearSpec,
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_classes = weight.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        dev = hidden.device
        h2 = hidden.reshape(-1, hidden.shape[-1])
        num_rows = h2.shape[0] // 2
        # Gathering hidden rows is cheap, so dead rows (padding) are always skipped: their
        # states never reach the matmuls or the weight gradient, whatever they hold.
        rows = live_row_ids(live_rows(ce_keep, kl_keep, target is not None), num_rows, dev)
        n = rows.numel()
        r = min(spec.rows_per_chunk, max(n, 1))
        want = spec.want_grad
        z_buf = torch.empty(2 * r, num_classes, dtype=weight.dtype, device=dev)
        g_buf = torch.empty(2 * r, num_classes, dtype=dtype, device=dev) if want else None
        terms = _ChunkTerms(r, num_classes, dtype, dev, spec.smoothing, target, ce_keep)
        # per-row weights of d(loss)/d(kl_row) (halved, see ChunkMath.grads) and d/d(ce_row)
        w_kl = 0.5 * (spec.alpha / 2.0) / max(spec.n_kl, 1)
        w_ce = 0.5 / spec.n_ce if spec.n_ce else 0.0  # all padding: task loss 0, no gradient
        zero = torch.zeros((), dtype=dtype, device=dev)
        kl_in = torch.ones(num_rows, dtype=torch.bool, device=dev) if kl_keep is None else kl_keep
        ce_in = torch.ones(num_rows, dtype=torch.bool, device=dev) if ce_keep is None else ce_keep
        kl_w = torch.where(kl_in, w_kl, zero)
        ce_w = torch.where(ce_in, w_ce, zero)
        grad_h = torch.zeros_like(h2) if want else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=dev) if want else None
        grad_b = torch.zeros(num_classes, dtype=dtype, device=dev) if want else None
        kl_sum = torch.zeros((), dtype=dtype, device=dev)
        ce_sum = torch.zeros((), dtype=dtype, device=dev)
        for s in range(0, n, r):
            e = min(s + r, n)
            k = e - s
            chunk_rows = rows[s:e]
            idx = torch.cat([chunk_rows, chunk_rows + num_rows])
            h = h2.index_select(0, idx)
            z = z_buf[: 2 * k]
            if bias is None:
                torch.mm(h, weight.t(), out=z)
            else:
                torch.addmm(bias, h, weight.t(), out=z)
            zf = z if z.dtype == dtype else z.to(dtype)
            g = None if g_buf is None else g_buf[: 2 * k]
            kl_rows, ce_rows = terms(
                zf[:k],
                zf[k:],
                chunk_rows,
                kl_weight=kl_w.index_select(0, chunk_rows),
                ce_weight=None if target is None else ce_w.index_select(0, chunk_rows),
                grad=g,
            )
            kl_sum += torch.where(kl_in.index_select(0, chunk_rows), kl_rows, zero).sum()
            if target is not None:
                ce_both = ce_rows[0] + ce_rows[1]
                ce_sum += torch.where(ce_in.index_select(0, chunk_rows), ce_both, zero).sum()
            if g is None or grad_h is None or grad_w is None or grad_b is None:
                continue
            gm = g if g.dtype == weight.dtype else g.to(weight.dtype)
            grad_h.index_copy_(0, idx, torch.mm(gm, weight).to(grad_h.dtype))
            grad_w.addmm_(g.t(), h.to(dtype))
            grad_b += g.sum(dim=0)
        grads = None
        if grad_h is not None and grad_w is not None and grad_b is not None:
            grads = (
                grad_h.reshape(hidden.shape),
                grad_w.to(weight.dtype),
                None if bias is None else grad_b.to(bias.dtype),
            )
        inputs = (hidden, weight, bias, target, ce_keep, kl_keep)
        return _LinearRDrop.finish(ctx, spec, ce_sum, kl_sum, grads, inputs)

    @staticmethod
    def finish(
        ctx: Any,
        spec: _LinearSpec,
        ce_sum: Tensor,
        kl_sum: Tensor,
        grads: tuple[Tensor, Tensor, Tensor | None] | None,
        inputs: tuple[Tensor | None, ...],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, task, kl)`` from the kept sums; saves what :meth:`backward` reads: the
        gradients (``None``: not computed) and the inputs (references, for a double
        backward only)."""
        task = ce_sum / max(2 * spec.n_ce, 1)
        kl = kl_sum / max(spec.n_kl, 1)
        loss = task + (spec.alpha / 2.0) * kl
        ctx.mark_non_differentiable(task, kl)
        ctx.spec = spec
        ctx.save_for_backward(*(grads or (None, None, None)), *inputs)
        return loss, task, kl

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b, hidden, weight, bias, target, ce_keep, kl_keep = ctx.saved_tensors
        nones = (None,) * 4  # target, ce_keep, kl_keep, spec
        if building_graph():  # double backward: differentiate the loss through the logits
            inputs = (hidden, weight, bias, target, ce_keep, kl_keep)
            grads = linear_second_order(
                inputs, ctx.spec.reference_args(), grad_loss, ctx.needs_input_grad[:3]
            )
            return (*grads, *nones)
        if grad_h is None:
            raise RuntimeError(
                "rdrop_linear_cross_entropy: the gradient was not computed in forward "
                "(grad mode was off or no input required grad)"
            )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = grad_loss.to(grad_h.dtype)
        return (
            grad_h * scale if need_h else None,
            grad_w * scale.to(grad_w.dtype) if need_w else None,
            grad_b * scale.to(grad_b.dtype) if need_b and grad_b is not None else None,
            *nones,
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

    On CPU (float32, bf16, fp16) the C++ row kernel (:mod:`rdrop._cpu_kernel`) runs
    unless ``chunk_size`` is given (which selects this module's chunked ATen kernel), the
    kernel cannot be built, or ``RDROP_NO_CPP=1``; rows that are not finite (NaN or
    ``+inf`` logits, a class ``-inf`` in one pass only) make the call rerun with the ATen
    kernel, which defines those cases.
    """
    if chunk_size is None and _uses_triton(x):
        from rdrop._triton_kernel import fused_rows_triton

        return fused_rows_triton(x, y, target, ce_keep, kl_keep, smoothing)
    if chunk_size is None and _cpu_kernel.supports(x):
        found = _cpu_kernel.rows(x, y, target, ce_keep, kl_keep, smoothing)
        if found is not None:
            return found
    spec = _RowsSpec(float(smoothing), _rows_per_chunk(x.shape[-1], chunk_size))
    return _FusedRows.apply(x, y, target, ce_keep, kl_keep, spec)


def _uses_triton(x: Tensor) -> bool:
    """Whether the Triton kernels run for ``x``: a CUDA tensor, ``triton`` installed, and
    ``RDROP_NO_TRITON`` unset. Imports triton only for CUDA tensors."""
    if not x.is_cuda or os.environ.get("RDROP_NO_TRITON", "0") not in ("", "0"):
        return False
    return _triton_available()


@functools.cache
def _triton_available() -> bool:
    from rdrop import _triton_kernel

    return _triton_kernel.available()


def auto_min_numel(x: Tensor, *, kl_only: bool) -> int:
    """Logits per pass from which ``implementation="auto"`` picks the fused kernel.

    Args:
        x: the logits of one pass (their device and dtype pick the kernel).
        kl_only: the symmetric KL alone (``symmetric_kl``) rather than the R-Drop loss.

    Returns:
        The threshold of the kernel that would run (the C++ one when it applies and
        builds, building it on first use, else the ATen one).
    """
    if _cpu_kernel.supports(x) and _cpu_kernel.load() is not None:
        return CPP_KL_MIN_NUMEL if kl_only else CPP_MIN_NUMEL
    return ATEN_KL_MIN_NUMEL if kl_only else FUSED_MIN_NUMEL


def direct_symmetric_kl(logits_a: Tensor, logits_b: Tensor, mask: Tensor | None) -> Tensor | None:
    """Per-item symmetric KL through the C++ row kernel, or ``None`` when it does not apply.

    Args:
        logits_a, logits_b: the two passes' logits (same shape and dtype).
        mask: items kept (``None``: all); the others are 0.

    Returns:
        The per-item KL (item shape = ``logits_a.shape[:-1]``), or ``None`` when the kernel
        is unavailable or some kept row is not finite or has no distribution (all
        ``-inf``): the caller then takes the ATen path, which defines those cases.
    """
    if not _cpu_kernel.supports(logits_a):
        return None
    keep = None if mask is None else mask.reshape(-1)
    found = _cpu_kernel.rows(*_as_pair(logits_a, logits_b), None, None, keep, 0.0)
    return None if found is None else found[0].reshape(logits_a.shape[:-1])


def _as_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(base, None)`` when ``a`` and ``b`` are the halves of one tensor (see
    :func:`concatenated_base`), so that the kernel returns one gradient for it; else
    ``(a, b)``. Returning a gradient per half would make autograd build a zero-filled
    copy of the whole tensor for each half and add them, which costs more than the KL."""
    base = concatenated_base(a, b)
    return (a, b) if base is None else (base, None)


def chunked_symmetric_kl(
    logits_a: Tensor, logits_b: Tensor, mask: Tensor | None, chunk_size: int | None
) -> Tensor:
    """Per-item symmetric KL (item shape = ``logits_a.shape[:-1]``), masked items 0."""
    keep = None if mask is None else mask.reshape(-1)
    kl, _ = fused_rows(*_as_pair(logits_a, logits_b), None, None, keep, 0.0, chunk_size)
    return kl.reshape(logits_a.shape[:-1])


def two_pass_keeps(
    item_shape: torch.Size,
    target: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """Flat ``(ce_keep or None = all, kl_keep or None = all, n_ce, n_kl)`` of a 2-pass loss."""
    check_mask(mask, item_shape, "the logits' shape without the last dimension")
    ce_keep = None if target is None else target.reshape(-1) != ignore_index
    if ce_keep is not None and bool(ce_keep.all()):
        ce_keep = None
    kl_keep = ce_keep
    if mask is not None:
        kl_keep = mask.reshape(-1) if kl_keep is None else kl_keep & mask.reshape(-1)
    full = torch.tensor(item_shape.numel(), device=device)
    n_ce = full if ce_keep is None else ce_keep.sum()
    n_kl = full if kl_keep is None else kl_keep.sum()
    return ce_keep, kl_keep, n_ce, n_kl


def fused_terms(
    x: Tensor,
    y: Tensor | None,
    item_shape: torch.Size,
    target: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    mask: Tensor | None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(task_value, consistency)`` of two passes from their logits.

    ``y=None``: ``x`` is the concatenation ``[pass 1; pass 2]`` along dim 0.
    """
    if target is not None:
        check_class_ids(torch.Size((*item_shape, x.shape[-1])), target, ignore_index)
    ce_keep, kl_keep, n_ce, n_kl = two_pass_keeps(item_shape, target, ignore_index, mask, x.device)
    kl_rows, ce_rows = fused_rows(
        x,
        y,
        None if target is None else target.reshape(-1),
        ce_keep,
        kl_keep,
        label_smoothing,
        chunk_size,
    )
    consistency = kl_rows.sum() / n_kl.clamp_min(1).to(kl_rows.dtype)
    if target is None:
        return consistency.new_zeros(()), consistency
    # Mean over real targets of both passes; an all-padding batch gives 0, not NaN.
    return ce_rows.sum() / (2 * n_ce).clamp_min(1).to(ce_rows.dtype), consistency


def linear_terms(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor | None,
    alpha: float,
    *,
    ignore_index: int,
    label_smoothing: float,
    mask: Tensor | None,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, task_value, consistency)`` of two passes from their hidden states
    ``[2B, ..., H]`` and the projection ``weight [V, H]``/``bias``; only ``loss`` is
    differentiable. Two host syncs (the kept-item counts). CUDA tensors use the Triton
    kernels when triton is installed (see :func:`_uses_triton`)."""
    if _uses_triton(hidden):
        from rdrop._triton_kernel import linear_terms_triton

        return linear_terms_triton(
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
    item_shape = torch.Size((hidden.shape[0] // 2, *hidden.shape[1:-1]))
    num_classes = weight.shape[0]
    if target is not None:
        check_class_ids(torch.Size((*item_shape, num_classes)), target, ignore_index)
    ce_keep, kl_keep, n_ce, n_kl = two_pass_keeps(
        item_shape, target, ignore_index, mask, hidden.device
    )
    spec = _LinearSpec(
        n_ce=int(n_ce),
        n_kl=int(n_kl),
        alpha=alpha,
        smoothing=float(label_smoothing),
        rows_per_chunk=chunk_size or max(1, LINEAR_CHUNK_NUMEL // (2 * num_classes)),
        want_grad=torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    flat_target = None if target is None else target.reshape(-1)
    return _LinearRDrop.apply(
        hidden.contiguous(), weight, bias, flat_target, ce_keep, kl_keep, spec
    )


def concatenated_base(a: Tensor, b: Tensor) -> Tensor | None:
    """The tensor ``[a; b]`` when ``a`` and ``b`` are its two halves (e.g. from ``split``).

    Using it lets the fused kernel return one gradient for the whole concatenated output
    instead of two that autograd then copies into a new one.
    """
    base = a._base
    if base is None or b._base is not base or base.dtype != a.dtype:
        return None
    if not (base.is_contiguous() and a.is_contiguous() and b.is_contiguous()):
        return None
    if base.numel() != 2 * a.numel() or base.ndim == 0 or base.shape[-1] != a.shape[-1]:
        return None
    if a.data_ptr() != base.data_ptr() or b.data_ptr() != base.data_ptr() + a.nbytes:
        return None
    if base.requires_grad != (a.requires_grad or b.requires_grad):
        return None
    # Halves sliced under no_grad keep requires_grad but have no graph: not real views.
    if base.requires_grad and (a.grad_fn is None or b.grad_fn is None):
        return None
    return base


def fused_unsupported(
    passes: Sequence[Tensor],
    target: Tensor | None,
    task: Any,
    kind: str,
    task_passes: int,
) -> str | None:
    """Why the fused kernel cannot compute this loss (``None``: it can)."""
    if kind != "kl":
        return f"consistency={kind!r} (the fused kernel computes 'kl')"
    if len(passes) != 2:
        return f"{len(passes)} passes (the fused kernel takes 2)"
    if target is not None and (callable(task) or task != "cross_entropy"):
        return "a task other than 'cross_entropy'"
    if target is not None and task_passes != 2:
        return "task_passes=1"
    a, b = passes
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return "passes that are not tensors"
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return "passes of different shape, dtype or device"
    if a.ndim < 1 or not a.is_floating_point():
        return "non-floating or 0-d outputs"
    return None
