"""The C++ row kernel of the fused R-Drop loss on CPU (``csrc/rdrop_cpu.cpp``).

Private; :mod:`rdrop._fused_kernel` dispatches to it. The kernel computes, per row of two
passes, the symmetric KL and the (label-smoothed) cross-entropy of both in one sweep with
vectorised exponentials (``at::vec``), threads over rows (``at::parallel_for``), and in
backward recomputes the probabilities from the saved log-sum-exp and writes the gradient
straight into the tensor autograd returns: no logits-sized temporaries at all.

Build: compiled with the system C++ compiler (``$CXX``, else ``c++``) at the first call
that needs it, never at import, and cached in the torch extensions directory
(``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``) under a name that
hashes the source, the torch version and the CPU capability, so a new torch or a
different machine rebuilds instead of loading a stale binary. The compile (about 10-20 s
once) is announced and timed on the ``rdrop`` logger at WARNING level. Without a
compiler, on a failed build, or with ``RDROP_NO_CPP=1``, :func:`load` returns ``None``
and the callers use the chunked ATen kernel instead (same results up to float rounding).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rdrop._rows import live_rows

__all__ = ["CppRows", "enabled", "load", "pair_terms", "rows", "supports"]

_LOG = logging.getLogger("rdrop")
_SOURCE = Path(__file__).resolve().parent / "csrc" / "rdrop_cpu.cpp"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns of the per-row statistics the kernel writes (see rdrop_cpu.cpp, enum Stat).
_KL, _CE_A, _CE_B, _BAD, _STATS = 0, 1, 2, 7, 8
_CAPABILITY_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
    ],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ops": None}


def enabled() -> bool:
    """Whether the C++ kernel may be used at all (``RDROP_NO_CPP`` unset or ``0``)."""
    return os.environ.get("RDROP_NO_CPP", "0") in ("", "0")


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _CAPABILITY_FLAGS else "DEFAULT"


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    return Path.home() / ".cache" / "torch_extensions" / tag


def _command(compiler: str, out: Path, cap: str) -> list[str]:
    """The compile-and-link command of the kernel for capability ``cap``."""
    from torch.utils import cpp_extension

    torch_lib = str(Path(torch.__file__).resolve().parent / "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [
        compiler,
        str(_SOURCE),
        "-o",
        str(out),
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c++17",
        "-fopenmp",
        "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *_CAPABILITY_FLAGS.get(cap, ["-DCPU_CAPABILITY=DEFAULT"]),
        *includes,
        f"-I{sysconfig.get_paths()['include']}",
        f"-L{torch_lib}",
        f"-Wl,-rpath,{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
    ]


def _library_path(cap: str) -> Path:
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{cap}|{sys.version_info[:2]}".encode())
    return _cache_dir() / f"rdrop_cpu_{key.hexdigest()[:16]}" / "rdrop_cpu.so"


def _build(compiler: str, target: Path, cap: str) -> None:
    """Compile into a temporary file, then move it into place (safe under concurrency)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            _command(compiler, Path(tmp), cap), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_or_build() -> Any:
    cap = _capability()
    target = _library_path(cap)
    if not target.exists():
        compiler = os.environ.get("CXX") or "c++"
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler ({compiler!r} not found)")
        _LOG.warning(
            "rdrop: compiling the C++ CPU loss kernel once (cached in %s; RDROP_NO_CPP=1 skips it)",
            target.parent,
        )
        started = time.perf_counter()
        _build(compiler, target, cap)
        _LOG.warning("rdrop: C++ CPU loss kernel compiled in %.1f s", time.perf_counter() - started)
    torch.ops.load_library(str(target))
    return torch.ops.rdrop_cpu


def load() -> Any:
    """The kernel's ops (``torch.ops.rdrop_cpu``), built on first use; ``None`` when it is
    disabled or cannot be built (the reason is logged once)."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["ops"] = _load_or_build()
            except Exception as error:  # any failure means: use the ATen kernel
                _LOG.warning("rdrop: C++ CPU kernel unavailable, using the ATen kernel: %s", error)
                _state["ops"] = None
            _state["tried"] = True
    return _state["ops"]


def supports(x: Tensor) -> bool:
    """Whether the C++ kernel handles logits like ``x`` (CPU, float32/bf16/fp16)."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and enabled()


def _pair(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous 2-D ``(x2, a, b)``: both passes' rows (``y=None``: halves of ``x``)."""
    num_classes = x.shape[-1]
    x2 = x.reshape(-1, num_classes).contiguous()
    if y is None:
        half = x2.shape[0] // 2
        return x2, x2[:half], x2[half:]
    return x2, x2, y.reshape(-1, num_classes).contiguous()


class CppRows(torch.autograd.Function):
    """Per-row symmetric KL and cross-entropy of both passes through the C++ kernel.

    Same contract as :func:`rdrop._fused_kernel.fused_rows`, plus a third output: a
    non-differentiable flag, true when some kept row was not finite (the caller then
    recomputes with the ATen kernel, which defines those cases).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        y: Tensor | None,
        target: Tensor | None,
        ce_keep: Tensor | None,
        kl_keep: Tensor | None,
        smoothing: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ops = load()
        x2, a, b = _pair(x, y)
        live = live_rows(ce_keep, kl_keep, target is not None)
        live = None if live is None else live.contiguous()
        tgt = None
        if target is not None:
            tgt = target.reshape(-1).to(torch.int64)
            tgt = tgt if ce_keep is None else tgt.masked_fill(~ce_keep, -1)
            tgt = tgt.contiguous()
        stats = torch.empty(a.shape[0], _STATS, dtype=torch.float32)
        ops.rows_forward(a, b, tgt, live, float(smoothing), stats)
        kl_rows = stats[:, _KL].clone()
        if target is None:
            ce_rows = torch.zeros(2, 0, dtype=torch.float32)
        else:
            ce_rows = stats[:, _CE_A : _CE_B + 1].t().contiguous()
        bad = stats[:, _BAD].any()
        ctx.mark_non_differentiable(bad)
        if target is None:
            ctx.mark_non_differentiable(ce_rows)
        ctx.save_for_backward(x, y, x2, b, stats, tgt, target, ce_keep, kl_keep)
        ctx.smoothing = float(smoothing)
        return kl_rows, ce_rows, bad

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_kl: Tensor, grad_ce: Tensor, _: Any
    ) -> tuple[Tensor | None, ...]:
        from rdrop._double_backward import building_graph, rows_second_order

        x, y, x2, b, stats, tgt, target, ce_keep, kl_keep = ctx.saved_tensors
        nones = (None,) * 4  # target, ce_keep, kl_keep, smoothing
        if building_graph():  # double backward: differentiate the plain-autograd rows
            grads = rows_second_order(
                x,
                y,
                target,
                ce_keep,
                kl_keep,
                ctx.smoothing,
                grad_kl,
                grad_ce,
                ctx.needs_input_grad[:2],
            )
            return (*grads, *nones)
        concat = y is None
        need_a = ctx.needs_input_grad[0]
        need_b = (not concat) and ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return (None, None, *nones)
        rows = stats.shape[0]
        a = x2[:rows]
        w = _row_weights(grad_kl, kl_keep, 0.5)
        wce = None
        if tgt is not None:
            wce = _row_weights(grad_ce, ce_keep, 1.0)
        if concat:
            grad = torch.empty_like(x2)
            ga, gb = grad[:rows], grad[rows:]
        else:
            ga = torch.empty_like(a) if need_a else None
            gb = torch.empty_like(b) if need_b else None
        load().rows_backward(a, b, stats, tgt, w, wce, ctx.smoothing, ga, gb)
        if concat:
            return (grad.reshape(x.shape), None, *nones)
        return (
            None if ga is None else ga.reshape(x.shape),
            None if gb is None or y is None else gb.reshape(y.shape),
            *nones,
        )


def _row_weights(grad: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    """``scale * grad`` in float32, exactly 0 on rows not kept (even where grad is NaN)."""
    w = grad.to(torch.float32) * scale
    if keep is not None:
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    return w.contiguous()


def rows(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    smoothing: float,
) -> tuple[Tensor, Tensor] | None:
    """``(kl [R], ce [2, R])`` like :func:`rdrop._fused_kernel.fused_rows`, or ``None``
    when the kernel is unavailable or some kept row is not finite (use the ATen kernel)."""
    if load() is None:
        return None
    kl_rows, ce_rows, bad = CppRows.apply(x, y, target, ce_keep, kl_keep, smoothing)
    if bool(bad):
        return None
    if kl_keep is not None:
        kl_rows = torch.where(kl_keep, kl_rows, torch.zeros((), dtype=kl_rows.dtype))
    return kl_rows, ce_rows


def pair_terms(
    ops: Any,
    za: Tensor,
    zb: Tensor,
    target: Tensor | None,
    smoothing: float,
    kl_weight: Tensor,
    ce_weight: Tensor | None,
    grad: Tensor | None,
) -> tuple[Tensor, Tensor] | None:
    """Per-row ``(kl [k], ce [2, k])`` of the rows ``za``, ``zb`` of two passes, and with
    ``grad`` their weighted gradient, in one forward and one backward sweep of the kernel.

    Args:
        ops: the loaded kernel (:func:`load`).
        za, zb: ``[k, V]`` contiguous float32 logits of pass a and pass b.
        target: ``[k]`` int64 class ids, ``-1`` where a row has no cross-entropy, or
            ``None`` (no cross-entropy).
        smoothing: the cross-entropy's label smoothing.
        kl_weight: ``[k]`` float32 weight of each row's KL, halved (the kernel's
            gradient is that of ``2 * kl``).
        ce_weight: ``[2, k]`` float32 weights of each pass's cross-entropy, or ``None``.
        grad: ``[2k, V]`` float32 output (pass a's rows first), or ``None``: no gradient.

    Returns:
        The per-row values (``ce`` is ``[2, 0]`` without a target), or ``None`` when some
        row is not finite; then ``grad`` is untouched and the caller uses the ATen formulas.
    """
    k = za.shape[0]
    stats = torch.empty(k, _STATS, dtype=torch.float32)
    ops.rows_forward(za, zb, target, None, float(smoothing), stats)
    if bool(stats[:, _BAD].any()):
        return None
    if grad is not None:
        ops.rows_backward(
            za, zb, stats, target, kl_weight, ce_weight, float(smoothing), grad[:k], grad[k:]
        )
    ce = stats[:, _CE_A : _CE_B + 1].t() if target is not None else stats.new_zeros(2, 0)
    return stats[:, _KL], ce
