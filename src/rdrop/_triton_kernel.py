"""Triton kernels of the fused R-Drop loss: the cross-entropy of both passes and their
symmetric KL, forward and backward, from logits or from hidden states and the output
projection.

Private; same contracts as :func:`rdrop._fused_kernel.fused_rows` and
:func:`rdrop._fused_kernel.linear_terms` (see there and :mod:`rdrop._double_backward` for
the references). ``triton`` is imported only when a kernel is first needed, never at
``import rdrop`` time.

One Triton program handles one row of both passes and streams the vocabulary in blocks
once (an online softmax): per pass it keeps the running max ``m``, the rescaled sum of
``exp(z - m)`` and the rescaled sum of ``exp(z - m) * (z_a - z_b - c)``, which give::

    lse            = m + log(sum)
    E_p[z_a - z_b] , E_q[z_a - z_b]
    value          = 1/2 * (E_p - E_q)[z_a - z_b]     (= 1/2 sum_c (p_c - q_c) d_c)
    KL(p||q)       = E_p[d],   KL(q||p) = -E_q[d],     d = z_a - z_b - (lse_a - lse_b)

``c`` is a per-row centre (the log-sum-exp difference of the first block): ``sum(p - q)
= 0`` makes the value independent of it, and subtracting it keeps both expectations
small, so their difference keeps its precision when the passes differ by a near-constant
shift. The forward saves only these per-row statistics (``lse_a, lse_b, KL(p||q),
KL(q||p)``); the backward streams the row once more and writes::

    d/d z_a = w * (p * (d + 1 - KL(p||q)) - q) + w_a * (p - (1 - eps) onehot(t) - eps / C)
    d/d z_b = w * (q * (1 - d - KL(q||p)) - p) + w_b * (q - (1 - eps) onehot(t) - eps / C)

with ``w`` half the KL's incoming gradient and ``w_a, w_b`` the cross-entropies'. All
arithmetic is float32 (float64 for float64 inputs). Rows that are not kept load nothing
and get exactly 0 value and gradient (``where``, so NaN/inf there cannot leak). A class
that is ``-inf`` in both passes has ``p = q = 0`` and contributes 0; one that is ``-inf``
in one pass only makes the value ``+inf`` (never NaN; the gradient of such a row is not
finite, as on the CPU path). The gradient of a ``-inf`` logit's own ``p * (...)`` term is
its limit 0.

The hidden-state path (:func:`linear_terms_triton`) projects chunks of kept rows with
torch matmuls, runs one kernel per chunk that computes the row values and writes the
gradient of the loss over the chunk's logits in place, and multiplies it back into the
hidden-state, weight and bias gradients; the ``[2B, V]`` logits never exist.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rdrop import _fused_kernel
from rdrop._checks import check_class_ids
from rdrop._double_backward import building_graph, rows_second_order
from rdrop._fused_kernel import _LinearRDrop, two_pass_keeps
from rdrop._rows import live_row_ids, live_rows

__all__ = ["available", "fused_rows_triton", "linear_terms_triton"]

# Set to ``triton.language`` by :func:`_kernels`; the kernel bodies below read it as a global.
tl: Any = None

# Vocabulary block of one program. Compiled: 2048 at 8 warps = 8 bf16 per thread and
# input (one 16-byte load); ptxas for sm_90 reports 62-71 registers and no spills for the
# three kernels (4096: 128 registers, half the occupancy). Not yet timed on a GPU:
# try others with benchmarks/gpu.py --block N. The CPU interpreter runs numpy per block:
# larger.
_GPU_BLOCK = 2048
_INTERPRET_BLOCK = 1 << 14
# Logits per [2k, V] chunk of the hidden-state path (2**28 bf16 = 512 MiB: 1,024 rows per
# pass at V = 128k, large enough for efficient matmuls, small next to the full logits).
_LINEAR_CHUNK_NUMEL = 1 << 28
_NEG_INF = float("-inf")


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the Triton kernels can run: ``triton`` importable and either a CUDA device
    or the CPU interpreter (``TRITON_INTERPRET=1``).

    Returns:
        ``True`` when :func:`fused_rows_triton` and :func:`linear_terms_triton` can run.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


# ---------------------------------------------------------------------------------------
# Kernel bodies. Plain functions here; :func:`_kernels` wraps them with ``triton.jit`` on
# first use (they call each other through these module globals).
# ---------------------------------------------------------------------------------------


def _flag(ptr, row, PRESENT: tl.constexpr):
    """``ptr[row] != 0``, or true when there is no mask (``PRESENT`` false)."""
    if PRESENT:
        return tl.load(ptr + row) != 0
    return tl.full([], 1, tl.int1)


def _row_keep(
    row,
    tgt_ptr,
    ce_keep_ptr,
    kl_keep_ptr,
    HAS_TARGET: tl.constexpr,
    HAS_CE_KEEP: tl.constexpr,
    HAS_KL_KEEP: tl.constexpr,
):
    """(CE kept, KL kept, target class or 0) of one row."""
    kl_live = _flag(kl_keep_ptr, row, HAS_KL_KEEP)
    if HAS_TARGET:
        ce_live = _flag(ce_keep_ptr, row, HAS_CE_KEEP)
        # Rows out of the CE may hold ignore_index: never index with it.
        t = tl.where(ce_live, tl.load(tgt_ptr + row).to(tl.int64), 0)
    else:
        ce_live = tl.full([], 0, tl.int1)
        t = tl.full([], 0, tl.int64)
    return ce_live, kl_live, t


def _load_pair(za_row, zb_row, sac, sbc, idx, mask, DT: tl.constexpr):
    """One block of both passes' logits in ``DT``, ``-inf`` outside ``mask``."""
    za = tl.load(za_row + idx * sac, mask=mask, other=float("-inf")).to(DT)
    zb = tl.load(zb_row + idx * sbc, mask=mask, other=float("-inf")).to(DT)
    return za, zb


def _block_lse(z):
    """Log-sum-exp of one block (``-inf`` for an all ``-inf`` block)."""
    mx = tl.max(z, 0)
    base = tl.where(mx == float("-inf"), 0.0, mx)
    return tl.log(tl.sum(tl.exp(z - base), 0)) + base


def _online(z, dz, m, s, acc):
    """One block of the online softmax: running max ``m``, ``sum exp(z - m)`` and
    ``sum exp(z - m) * dz``, rescaled to the new max."""
    m_new = tl.maximum(m, tl.max(z, 0))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no NaN
    scale = tl.exp(m - base)
    e = tl.exp(z - base)
    s = s * scale + tl.sum(e, 0)
    # 0 * (+-inf) = 0: a class with p = 0 contributes nothing, even against q = 0.
    acc = tl.where(scale == 0, 0.0, acc * scale) + tl.sum(tl.where(e == 0, 0.0, e * dz), 0)
    return m_new, s, acc


def _row_stats(za_row, zb_row, sac, sbc, C, live, DT: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a row: ``(lse_a, lse_b, value, KL(p||q), KL(q||p), sum z_a, sum z_b)``."""
    cols = tl.arange(0, BLOCK)
    # Columns to load: none for a dead row (a limit, not `mask & live`: the interpreter
    # turns a bool block `&` a bool scalar into integers, which tl.load rejects).
    limit = tl.where(live, C, 0)
    za, zb = _load_pair(za_row, zb_row, sac, sbc, cols, cols < limit, DT)
    c = _block_lse(za) - _block_lse(zb)
    c = tl.where(c - c == 0, c, 0.0)  # not finite (a block all -inf): no centre
    zero = tl.zeros([], DT)
    m_a = zero + float("-inf")
    m_b = zero + float("-inf")
    s_a, s_b, acc_a, acc_b, sum_a, sum_b = zero, zero, zero, zero, zero, zero
    for start in range(0, C, BLOCK):
        idx = start + cols
        inside = idx < C
        za, zb = _load_pair(za_row, zb_row, sac, sbc, idx, idx < limit, DT)
        both = (za == float("-inf")) & (zb == float("-inf"))
        dz = tl.where(both, 0.0, za - zb) - c
        m_a, s_a, acc_a = _online(za, dz, m_a, s_a, acc_a)
        m_b, s_b, acc_b = _online(zb, dz, m_b, s_b, acc_b)
        sum_a += tl.sum(tl.where(inside, za, 0.0), 0)
        sum_b += tl.sum(tl.where(inside, zb, 0.0), 0)
    lse_a = m_a + tl.log(s_a)
    lse_b = m_b + tl.log(s_b)
    e_a = acc_a / s_a  # E_p[z_a - z_b] - c
    e_b = acc_b / s_b  # E_q[z_a - z_b] - c
    shift = c - (lse_a - lse_b)
    return lse_a, lse_b, 0.5 * (e_a - e_b), e_a + shift, -(e_b + shift), sum_a, sum_b


def _cross_entropy(z_row, sc, t, ce_live, lse, total, C, eps, DT: tl.constexpr):
    """``lse - (1 - eps) z_t - eps mean(z)`` of one row (``total``: ``sum z``)."""
    zt = tl.load(z_row + t * sc, mask=ce_live, other=0.0).to(DT)
    smooth = tl.where(eps == 0, 0.0, eps * total / C)  # eps = 0: no 0 * (-inf)
    return lse - (1.0 - eps) * zt - smooth


def _side_grad(p, q, coef, w, wce, hot):
    """``w (p coef - q) + wce (p - hot)`` with the terms of a zero weight exactly 0."""
    kl = tl.where(p == 0, 0.0, p * coef) - q
    return tl.where(w == 0, 0.0, w * kl) + tl.where(wce == 0, 0.0, wce * (p - hot))


def _row_grads(
    za_row,
    zb_row,
    sac,
    sbc,
    ga_row,
    gb_row,
    sgac,
    sgbc,
    C,
    live,
    t,
    lse_a,
    lse_b,
    kl_pq,
    kl_qp,
    w,
    wa,
    wb,
    eps,
    WRITE_A: tl.constexpr,
    WRITE_B: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass over a row writing the gradients of both passes (0 for a dead row)."""
    cols = tl.arange(0, BLOCK)
    limit = tl.where(live, C, 0)  # columns to load (see _row_stats)
    dl = lse_a - lse_b
    for start in range(0, C, BLOCK):
        idx = start + cols
        inside = idx < C
        za, zb = _load_pair(za_row, zb_row, sac, sbc, idx, idx < limit, DT)
        p = tl.exp(za - lse_a)
        q = tl.exp(zb - lse_b)
        both = (za == float("-inf")) & (zb == float("-inf"))
        d = tl.where(both, 0.0, za - zb - dl)
        hot = tl.where(idx == t, 1.0 - eps, 0.0) + eps / C  # the smoothed one-hot target
        if WRITE_A:
            g = _side_grad(p, q, d + 1.0 - kl_pq, w, wa, hot)
            g = tl.where(live, g, 0.0).to(ga_row.dtype.element_ty)
            tl.store(ga_row + idx * sgac, g, mask=inside)
        if WRITE_B:
            g = _side_grad(q, p, 1.0 - d - kl_qp, w, wb, hot)
            g = tl.where(live, g, 0.0).to(gb_row.dtype.element_ty)
            tl.store(gb_row + idx * sgbc, g, mask=inside)


def _forward_kernel(
    za_ptr,
    zb_ptr,
    sa,
    sac,
    sb,
    sbc,
    C,
    tgt_ptr,
    ce_keep_ptr,
    kl_keep_ptr,
    kl_ptr,
    ce_ptr,
    stats_ptr,
    R,
    eps,
    HAS_TARGET: tl.constexpr,
    HAS_CE_KEEP: tl.constexpr,
    HAS_KL_KEEP: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``program_id``: KL value, both cross-entropies and the backward's statistics."""
    row = tl.program_id(0)
    ce_live, kl_live, t = _row_keep(
        row, tgt_ptr, ce_keep_ptr, kl_keep_ptr, HAS_TARGET, HAS_CE_KEEP, HAS_KL_KEEP
    )
    live = ce_live | kl_live
    za_row = za_ptr + row.to(tl.int64) * sa
    zb_row = zb_ptr + row.to(tl.int64) * sb
    lse_a, lse_b, value, kl_pq, kl_qp, sum_a, sum_b = _row_stats(
        za_row, zb_row, sac, sbc, C, live, DT, BLOCK
    )
    tl.store(kl_ptr + row, tl.where(kl_live, value, 0.0))
    if HAS_TARGET:
        ce_a = _cross_entropy(za_row, sac, t, ce_live, lse_a, sum_a, C, eps, DT)
        ce_b = _cross_entropy(zb_row, sbc, t, ce_live, lse_b, sum_b, C, eps, DT)
        tl.store(ce_ptr + row, tl.where(ce_live, ce_a, 0.0))
        tl.store(ce_ptr + R + row, tl.where(ce_live, ce_b, 0.0))
    tl.store(stats_ptr + row, lse_a)
    tl.store(stats_ptr + R + row, lse_b)
    tl.store(stats_ptr + 2 * R + row, kl_pq)
    tl.store(stats_ptr + 3 * R + row, kl_qp)


def _backward_kernel(
    za_ptr,
    zb_ptr,
    sa,
    sac,
    sb,
    sbc,
    ga_ptr,
    gb_ptr,
    sga,
    sgac,
    sgb,
    sgbc,
    C,
    tgt_ptr,
    ce_keep_ptr,
    kl_keep_ptr,
    stats_ptr,
    w_ptr,
    R,
    eps,
    HAS_TARGET: tl.constexpr,
    HAS_CE_KEEP: tl.constexpr,
    HAS_KL_KEEP: tl.constexpr,
    WRITE_A: tl.constexpr,
    WRITE_B: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``program_id``: gradients from the saved statistics and the per-row weights
    ``w_ptr = [1/2 grad_kl; grad_ce_a; grad_ce_b]``."""
    row = tl.program_id(0)
    ce_live, kl_live, t = _row_keep(
        row, tgt_ptr, ce_keep_ptr, kl_keep_ptr, HAS_TARGET, HAS_CE_KEEP, HAS_KL_KEEP
    )
    live = ce_live | kl_live
    r64 = row.to(tl.int64)
    w = tl.where(kl_live, tl.load(w_ptr + row).to(DT), 0.0)
    wa = tl.where(ce_live, tl.load(w_ptr + R + row).to(DT), 0.0)
    wb = tl.where(ce_live, tl.load(w_ptr + 2 * R + row).to(DT), 0.0)
    _row_grads(
        za_ptr + r64 * sa,
        zb_ptr + r64 * sb,
        sac,
        sbc,
        ga_ptr + r64 * sga,
        gb_ptr + r64 * sgb,
        sgac,
        sgbc,
        C,
        live,
        t,
        tl.load(stats_ptr + row),
        tl.load(stats_ptr + R + row),
        tl.load(stats_ptr + 2 * R + row),
        tl.load(stats_ptr + 3 * R + row),
        w,
        wa,
        wb,
        eps,
        WRITE_A,
        WRITE_B,
        DT,
        BLOCK,
    )


def _loss_grad_kernel(
    z_ptr,
    sz,
    C,
    K,
    tgt_ptr,
    ce_keep_ptr,
    kl_keep_ptr,
    kl_ptr,
    ce_ptr,
    w_kl,
    w_ce,
    eps,
    HAS_TARGET: tl.constexpr,
    HAS_CE_KEEP: tl.constexpr,
    HAS_KL_KEEP: tl.constexpr,
    WRITE: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``program_id`` of a ``[2K, C]`` logits chunk (pass a rows ``0:K``, pass b
    ``K:2K``): values, and (``WRITE``) the loss gradient over the logits, in place."""
    row = tl.program_id(0)
    ce_live, kl_live, t = _row_keep(
        row, tgt_ptr, ce_keep_ptr, kl_keep_ptr, HAS_TARGET, HAS_CE_KEEP, HAS_KL_KEEP
    )
    live = ce_live | kl_live
    za_row = z_ptr + row.to(tl.int64) * sz
    zb_row = z_ptr + (row.to(tl.int64) + K) * sz
    lse_a, lse_b, value, kl_pq, kl_qp, sum_a, sum_b = _row_stats(
        za_row, zb_row, 1, 1, C, live, DT, BLOCK
    )
    tl.store(kl_ptr + row, tl.where(kl_live, value, 0.0))
    if HAS_TARGET:
        ce_a = _cross_entropy(za_row, 1, t, ce_live, lse_a, sum_a, C, eps, DT)
        ce_b = _cross_entropy(zb_row, 1, t, ce_live, lse_b, sum_b, C, eps, DT)
        tl.store(ce_ptr + row, tl.where(ce_live, ce_a + ce_b, 0.0))
    if WRITE:
        w = tl.where(kl_live, w_kl, 0.0).to(DT)
        wce = tl.where(ce_live, w_ce, 0.0).to(DT)
        _row_grads(
            za_row, zb_row, 1, 1, za_row, zb_row, 1, 1, C, live, t,
            lse_a, lse_b, kl_pq, kl_qp, w, wce, wce, eps, True, True, DT, BLOCK,
        )  # fmt: skip


_HELPERS = (
    "_flag",
    "_row_keep",
    "_load_pair",
    "_block_lse",
    "_online",
    "_row_stats",
    "_cross_entropy",
    "_side_grad",
    "_row_grads",
)
_KERNELS = ("_forward_kernel", "_backward_kernel", "_loss_grad_kernel")


@functools.cache
def _kernels() -> dict[str, Any]:
    """Import Triton and JIT-wrap the kernel bodies (once; reads ``TRITON_INTERPRET`` then).

    Returns:
        The launchable kernels by name.
    """
    import triton
    import triton.language as language

    module = globals()
    module["tl"] = language
    for name in (*_HELPERS, *_KERNELS):
        module[name] = triton.jit(module[name])
    return {name: module[name] for name in _KERNELS}


def _launch_options(num_classes: int, block: int | None) -> dict[str, int]:
    """``BLOCK`` and ``num_warps`` of a row kernel over ``num_classes`` columns."""
    import triton

    cap = _INTERPRET_BLOCK if _interpreting() else _GPU_BLOCK
    size = block or min(triton.next_power_of_2(max(num_classes, 1)), cap)
    return {"BLOCK": size, "num_warps": 8 if size >= 2048 else 4}


def _triton_dtype(dtype: torch.dtype) -> Any:
    """The Triton compute dtype of a torch compute dtype (float32 or float64)."""
    _kernels()
    return tl.float64 if dtype == torch.float64 else tl.float32


def _as_u8(keep: Tensor | None, like: Tensor) -> Tensor:
    """A row mask as contiguous ``uint8`` (``like`` as a dummy pointer when ``None``)."""
    if keep is None:
        return like
    return keep.reshape(-1).contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------
# Logits path
# ---------------------------------------------------------------------------------------


def _rows_of(z: Tensor) -> Tensor:
    """``z`` as 2-D rows with unit column stride (a copy only for column-strided inputs:
    the kernels index columns in 32-bit, which a large column stride could overflow)."""
    z2 = z.reshape(-1, z.shape[-1])
    return z2 if z2.stride(-1) == 1 or z2.shape[-1] <= 1 else z2.contiguous()


def _passes(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    """2-D row views ``(z_a, z_b)`` of the two passes (``y=None``: halves of ``x``)."""
    x2 = _rows_of(x)
    if y is None:
        return x2[: x2.shape[0] // 2], x2[x2.shape[0] // 2 :]
    return x2, _rows_of(y)


@dataclass(frozen=True)
class _Spec:
    """The non-tensor options of :class:`_TritonRows`."""

    smoothing: float
    block: int | None


def _mask_args(
    target: Tensor | None, ce_keep: Tensor | None, kl_keep: Tensor | None, dummy: Tensor
) -> tuple[list[Tensor], dict[str, bool]]:
    """Kernel pointers ``[target, ce_keep, kl_keep]`` and their ``HAS_*`` flags."""
    ptrs = [
        dummy if target is None else target.reshape(-1).contiguous(),
        _as_u8(ce_keep, dummy),
        _as_u8(kl_keep, dummy),
    ]
    flags = {
        "HAS_TARGET": target is not None,
        "HAS_CE_KEEP": target is not None and ce_keep is not None,
        "HAS_KL_KEEP": kl_keep is not None,
    }
    return ptrs, flags


class _TritonRows(torch.autograd.Function):
    """Per-row symmetric KL and (optionally) per-row cross-entropy of both passes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        y: Tensor | None,
        target: Tensor | None,
        ce_keep: Tensor | None,
        kl_keep: Tensor | None,
        spec: _Spec,
    ) -> tuple[Tensor, Tensor]:
        za, zb = _passes(x, y)
        rows, num_classes = za.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        kl = torch.empty(rows, dtype=dtype, device=x.device)
        ce = torch.empty(2, rows if target is not None else 0, dtype=dtype, device=x.device)
        stats = torch.empty(4, rows, dtype=dtype, device=x.device)
        ptrs, flags = _mask_args(target, ce_keep, kl_keep, kl)
        if rows:
            _kernels()["_forward_kernel"][(rows,)](
                za, zb, za.stride(0), za.stride(1), zb.stride(0), zb.stride(1), num_classes,
                *ptrs, kl, ce if target is not None else kl, stats, rows, spec.smoothing,
                DT=_triton_dtype(dtype), **flags, **_launch_options(num_classes, spec.block),
            )  # fmt: skip
        if target is None:
            ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(x, y, target, ce_keep, kl_keep, stats)
        ctx.spec = spec
        return kl, ce

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, y, target, ce_keep, kl_keep, stats = ctx.saved_tensors
        spec: _Spec = ctx.spec
        nones = (None,) * 4  # target, ce_keep, kl_keep, spec
        if building_graph():  # double backward: differentiate the plain-autograd rows
            grads = rows_second_order(
                x,
                y,
                target,
                ce_keep,
                kl_keep,
                spec.smoothing,
                grad_kl,
                grad_ce,
                ctx.needs_input_grad[:2],
            )
            return (*grads, *nones)
        concat = y is None
        need_a = ctx.needs_input_grad[0]
        need_b = need_a if concat else ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return (None, None, *nones)
        return (*_rows_backward(x, y, target, ce_keep, kl_keep, stats, grad_kl, grad_ce,
                                spec, need_a, need_b), *nones)  # fmt: skip


def _rows_backward(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    stats: Tensor,
    grad_kl: Tensor,
    grad_ce: Tensor,
    spec: _Spec,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The input gradients of :class:`_TritonRows` (one tensor like ``x`` for ``y=None``).

    Args:
        x, y, target, ce_keep, kl_keep: the forward's inputs.
        stats: the forward's ``[4, R]`` row statistics.
        grad_kl, grad_ce: the incoming gradients (``[R]``, ``[2, R]`` or ``[2, 0]``).
        spec: the forward's options.
        need_a, need_b: which pass's gradient to write.

    Returns:
        ``(grad_x, grad_y)``.
    """
    za, zb = _passes(x, y)
    rows, num_classes = za.shape
    dtype = stats.dtype
    weights = torch.zeros(3, rows, dtype=dtype, device=x.device)
    weights[0] = 0.5 * grad_kl.to(dtype)
    if target is not None:
        weights[1:] = grad_ce.to(dtype)
    if y is None:
        grad_x = torch.empty(2 * rows, num_classes, dtype=x.dtype, device=x.device)
        ga, gb = grad_x[:rows], grad_x[rows:]
        grad_y = None
    else:
        ga = torch.empty(za.shape, dtype=x.dtype, device=x.device) if need_a else stats
        gb = torch.empty(zb.shape, dtype=y.dtype, device=y.device) if need_b else stats
        grad_x, grad_y = (ga if need_a else None), (gb if need_b else None)
    ptrs, flags = _mask_args(target, ce_keep, kl_keep, stats)
    if rows:
        _kernels()["_backward_kernel"][(rows,)](
            za, zb, za.stride(0), za.stride(1), zb.stride(0), zb.stride(1),
            ga, gb, ga.stride(0), ga.stride(1), gb.stride(0), gb.stride(1), num_classes,
            *ptrs, stats, weights, rows, spec.smoothing,
            WRITE_A=need_a, WRITE_B=need_b, DT=_triton_dtype(dtype), **flags,
            **_launch_options(num_classes, spec.block),
        )  # fmt: skip
    return (
        None if grad_x is None else grad_x.view(x.shape),
        None if grad_y is None or y is None else grad_y.view(y.shape),
    )


def fused_rows_triton(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    smoothing: float,
    *,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``(kl [R], ce [2, R])`` of two passes, as :func:`rdrop._fused_kernel.fused_rows`.

    Args:
        x: logits ``[..., C]`` of pass a, or (``y=None``) both passes concatenated along
            the rows (pass a first); the gradient is then one tensor like ``x``.
        y: logits of pass b (same shape as ``x``), or ``None``.
        target: ``[R]`` class ids, or ``None`` for the KL only (``ce`` is then ``[2, 0]``).
        ce_keep: ``[R]`` bool rows of the cross-entropy (``None``: all).
        kl_keep: ``[R]`` bool rows of the KL (``None``: all).
        smoothing: label smoothing ``eps`` of the cross-entropy.
        block_size: vocabulary block of a program (a power of two; ``None``: automatic).

    Returns:
        ``(kl, ce)`` in float32 (float64 for float64 logits); rows not kept are 0.
    """
    spec = _Spec(float(smoothing), block_size)
    return _TritonRows.apply(x, y, target, ce_keep, kl_keep, spec)


# ---------------------------------------------------------------------------------------
# Hidden-state path
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LinearSpec(_fused_kernel._LinearSpec):
    """The non-tensor options of :class:`_TritonLinear`: the CPU kernel's and a block."""

    block: int | None = None  # vocabulary block of a program (None: automatic)


class _LinearGrads:
    """Gradient accumulators of the hidden-state path (float32 bias, weight dtype else)."""

    def __init__(self, h2: Tensor, weight: Tensor) -> None:
        self.h = torch.zeros_like(h2)
        # Accumulated in the weight's dtype: each chunk's matmul accumulates in float32
        # and rounds once, which avoids a [V, H] float32 buffer plus a cast at 128k x 4k.
        self.w = torch.zeros_like(weight)
        self.b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)

    def add(self, g: Tensor, h: Tensor, idx: Tensor, weight: Tensor) -> None:
        """Add a chunk's logits gradient ``g [2k, V]`` of hidden rows ``idx`` (``h``)."""
        self.h.index_copy_(0, idx, torch.mm(g, weight).to(self.h.dtype))
        self.w.addmm_(g.t(), h.to(g.dtype))
        self.b += g.sum(dim=0, dtype=torch.float32)


def _linear_chunk(
    z: Tensor,
    tgt: Tensor | None,
    ce_in: Tensor | None,
    kl_in: Tensor | None,
    spec: _LinearSpec,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Row kernel over one ``[2k, V]`` logits chunk; gradient in place when wanted.

    Args:
        z: the chunk's logits (contiguous, pass a rows first).
        tgt, ce_in, kl_in: the chunk rows' targets and keep masks (``None``: all kept).
        spec: the loss options.
        dtype: the compute dtype.

    Returns:
        Sums of the chunk's kept ``(KL values, CE of both passes)``.
    """
    k, num_classes = z.shape[0] // 2, z.shape[1]
    kl = torch.empty(k, dtype=dtype, device=z.device)
    ce = torch.zeros(k, dtype=dtype, device=z.device)
    ptrs, flags = _mask_args(tgt, ce_in, kl_in, kl)
    w_kl = 0.5 * (spec.alpha / 2.0) / max(spec.n_kl, 1)
    w_ce = 0.5 / spec.n_ce if spec.n_ce else 0.0  # all padding: task loss 0, no gradient
    _kernels()["_loss_grad_kernel"][(k,)](
        z, z.stride(0), num_classes, k, *ptrs, kl, ce, w_kl, w_ce, spec.smoothing,
        WRITE=spec.want_grad, DT=_triton_dtype(dtype), **flags,
        **_launch_options(num_classes, spec.block),
    )  # fmt: skip
    return kl.sum(), ce.sum()


def _pick(rows: Tensor, *per_row: Tensor | None) -> list[Tensor | None]:
    """The entries ``rows`` of each per-row tensor (``None`` stays ``None``)."""
    return [None if v is None else v.index_select(0, rows) for v in per_row]


class _TritonLinear(_LinearRDrop):
    """Loss of ``hidden @ weight.T + bias`` without the full logits; grads made in forward.

    The backward is :class:`rdrop._fused_kernel._LinearRDrop`'s: the forward saves the same
    tensors (the three gradients, then the inputs) and a spec with ``reference_args``.
    """

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
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        num_rows = h2.shape[0] // 2
        # Dead rows (padding) are gathered away: they never reach the matmuls.
        live = live_rows(ce_keep, kl_keep, target is not None)
        rows = live_row_ids(live, num_rows, h2.device)
        grads = _LinearGrads(h2, weight) if spec.want_grad else None
        kl_sum = torch.zeros((), dtype=dtype, device=h2.device)
        ce_sum = torch.zeros((), dtype=dtype, device=h2.device)
        for s in range(0, rows.numel(), spec.rows_per_chunk):
            chunk_rows = rows[s : s + spec.rows_per_chunk]
            idx = torch.cat([chunk_rows, chunk_rows + num_rows])
            h = h2.index_select(0, idx)
            z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
            kl_c, ce_c = _linear_chunk(z, *_pick(chunk_rows, target, ce_keep, kl_keep), spec, dtype)
            kl_sum += kl_c
            ce_sum += ce_c
            if grads is not None:
                grads.add(z, h, idx, weight)  # z now holds d loss / d z
        final = None if grads is None else _final_grads(grads, hidden, bias)
        inputs = (hidden, weight, bias, target, ce_keep, kl_keep)
        return _LinearRDrop.finish(ctx, spec, ce_sum, kl_sum, final, inputs)


def _final_grads(
    grads: _LinearGrads, hidden: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The accumulated gradients shaped and typed like ``hidden``, the weight and ``bias``."""
    grad_b = None if bias is None else grads.b.to(bias.dtype)
    return grads.h.reshape(hidden.shape), grads.w, grad_b


def linear_terms_triton(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor | None,
    alpha: float,
    *,
    ignore_index: int,
    label_smoothing: float,
    mask: Tensor | None,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, task_value, consistency)`` as :func:`rdrop._fused_kernel.linear_terms`.

    Args:
        hidden: hidden states ``[2B, ..., H]`` of both passes (pass a first).
        weight: the output projection ``[V, H]``.
        bias: its bias ``[V]``, or ``None``.
        target: class ids ``[B, ...]``, or ``None`` for the consistency only.
        alpha: weight of the consistency (``loss = task + alpha / 2 * KL``).
        ignore_index: target value of items out of the loss.
        label_smoothing: of the cross-entropy.
        mask: ``[B, ...]`` bool items of the loss (``None``: all).
        chunk_size: rows per pass and chunk (``None``: about 2**28 logits per chunk).
        block_size: vocabulary block of a program (``None``: automatic).

    Returns:
        The loss (differentiable in ``hidden``, ``weight``, ``bias``) and its two
        non-differentiable parts. Two host syncs (the kept-item counts) and one more for
        the kept rows.
    """
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
        alpha=float(alpha),
        smoothing=float(label_smoothing),
        rows_per_chunk=chunk_size or max(1, _LINEAR_CHUNK_NUMEL // (2 * max(num_classes, 1))),
        block=block_size,
        want_grad=torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    flat_target = None if target is None else target.reshape(-1)
    return _TritonLinear.apply(
        hidden.contiguous(), weight, bias, flat_target, ce_keep, kl_keep, spec
    )
