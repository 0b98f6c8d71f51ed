"""The Triton kernels (``rdrop._triton_kernel``) against the float64 references, run by
Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before Triton is imported), and
compiled ahead of time for an sm_90 GPU (no GPU needed) in a subprocess."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rdrop import _triton_kernel
from rdrop._double_backward import linear_reference_loss, rows_reference
from rdrop._triton_kernel import fused_rows_triton, linear_terms_triton

# The interpreter evaluates both branches of every `where` in numpy (inf - inf, 0 * inf
# in the branch not taken): those numpy warnings are expected noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]
INF = float("inf")
Grads = tuple[Tensor | None, ...]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(rows: int, classes: int, seed: int, noise: float = 0.7) -> tuple[Tensor, Tensor]:
    """Logits of two passes that differ like dropout passes do (float64)."""
    g = _gen(seed)
    a = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3
    return a, a + noise * torch.randn(rows, classes, generator=g, dtype=torch.float64)


def _rows_and_grads(
    fn: Callable[..., tuple[Tensor, Tensor | None]],
    x: Tensor,
    y: Tensor | None,
    *args: object,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None, Grads]:
    """``(kl, ce, grads of x[, y])`` of ``fn`` under random upstream row weights."""
    x = x.detach().clone().requires_grad_()
    y = None if y is None else y.detach().clone().requires_grad_()
    kl, ce = fn(x, y, *args)
    g = _gen(seed)
    loss = (kl.double() * torch.randn(kl.shape, generator=g, dtype=torch.float64)).sum()
    if ce is not None and ce.numel():
        loss = loss + (ce.double() * torch.rand(ce.shape, generator=g, dtype=torch.float64)).sum()
    inputs = [x] if y is None else [x, y]
    grads = torch.autograd.grad(loss, inputs)
    return kl.detach(), None if ce is None or not ce.numel() else ce.detach(), grads


def _check_rows(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    smoothing: float,
    *,
    block: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> tuple[Tensor, Tensor | None, Grads]:
    """The kernel on ``x``/``y`` against ``rows_reference`` on their float64 values."""
    got = _rows_and_grads(
        lambda a, b, *r: fused_rows_triton(a, b, *r, block_size=block),
        x, y, target, ce_keep, kl_keep, smoothing,
    )  # fmt: skip
    ref = _rows_and_grads(
        rows_reference,
        x.double(), None if y is None else y.double(), target, ce_keep, kl_keep, smoothing,
    )  # fmt: skip
    kl, ce, grads = got
    torch.testing.assert_close(kl.double(), ref[0], rtol=rtol, atol=atol)
    if ref[1] is None:
        assert ce is None
    else:
        assert ce is not None
        torch.testing.assert_close(ce.double(), ref[1], rtol=rtol, atol=atol)
    for g, r in zip(grads, ref[2]):
        assert g is not None and r is not None and g.dtype == x.dtype and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol * float(r.abs().max()))
    return got


# ------------------------------------------------------------------------- logits path


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("block", [None, 16])  # one block per row, and several
def test_rows_match_reference(concat: bool, with_target: bool, block: int | None) -> None:
    a, b = _pair(5, 37, seed=1)
    target = torch.randint(0, 37, (5,), generator=_gen(2)) if with_target else None
    x, y = (torch.cat([a, b]).float(), None) if concat else (a.float(), b.float())
    _check_rows(x, y, target, None, None, 0.0, block=block)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masks_ignore_index_and_label_smoothing(smoothing: float) -> None:
    a, b = _pair(8, 23, seed=3)
    target = torch.randint(0, 23, (8,), generator=_gen(4))
    target[[1, 5]] = -100
    ce_keep = target != -100
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    _check_rows(a.float(), b.float(), target, ce_keep, ce_keep & mask, smoothing, block=8)
    _check_rows(a.float(), b.float(), None, None, mask, smoothing)  # KL only, masked


def test_dead_rows_are_exact_zeros_whatever_they_hold() -> None:
    a, b = _pair(6, 10, seed=5)
    target = torch.randint(0, 10, (6,), generator=_gen(6))
    target[4:] = -100
    a[4], b[5, 3] = float("nan"), INF  # garbage in ignored rows
    keep = target != -100
    kl, ce, grads = _rows_and_grads(
        fused_rows_triton, a.float(), b.float(), target, keep, keep, 0.1
    )
    assert ce is not None
    assert bool((kl[4:] == 0).all()) and bool((ce[:, 4:] == 0).all())
    assert all(g is not None and bool((g[4:] == 0).all()) for g in grads)
    clean = _check_rows(
        a.nan_to_num(0.0, 0.0).float(), b.nan_to_num(0.0, 0.0).float(), target, keep, keep, 0.1
    )
    torch.testing.assert_close(kl, clean[0])


def test_neg_inf_logits() -> None:
    a, b = _pair(4, 12, seed=7)
    a[:, 9:] = b[:, 9:] = -INF  # classes banned in both passes: contribute 0
    target = torch.tensor([0, 1, 2, 3])
    kl, _, grads = _check_rows(a.float(), b.float(), target, None, None, 0.0, block=4)
    assert torch.isfinite(kl).all()
    assert all(g is not None and bool((g[:, 9:] == 0).all()) for g in grads)
    a[1, 0] = -INF  # one-sided -inf: an infinite KL, never NaN
    b[2, 5] = -INF
    a[3, 3] = -INF  # the target class of row 3: an infinite cross-entropy
    b[3, 3] = -INF
    kl, ce = fused_rows_triton(a.float(), b.float(), target, None, None, 0.0, block_size=4)
    ref_kl, ref_ce = rows_reference(a, b, target, None, None, 0.0)
    assert kl[1].item() == kl[2].item() == INF and not torch.isnan(kl).any()
    assert ref_ce is not None and ce[0, 3].item() == ce[1, 3].item() == INF
    torch.testing.assert_close(kl.double(), ref_kl)
    torch.testing.assert_close(ce.double(), ref_ce)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    a, b = _pair(6, 40, seed=8)
    target = torch.randint(0, 40, (6,), generator=_gen(9))
    # The reference sees the same rounded logits; only the gradient's storage rounds (in
    # the interpreter by truncation: Triton 3.9 casts float32 -> bf16 toward zero there,
    # to nearest-even on a GPU), hence an absolute tolerance of a few bf16 ulps.
    kl, ce, _ = _check_rows(a.to(dtype), b.to(dtype), target, None, None, 0.1, rtol=1e-5, atol=1e-2)
    assert kl.dtype == torch.float32 and ce is not None and ce.dtype == torch.float32


def test_non_contiguous_and_batched_inputs() -> None:
    a, b = _pair(2 * 3 * 20, 2, seed=10)
    # [3, 20, C] with the classes along a strided dimension, and a sliced view
    x = a.float().reshape(2, 3, 20, 2).permute(1, 3, 2, 0)[..., 0]  # not contiguous
    y = b.float().reshape(3, 2, 20, 2)[..., 1]
    assert not x.is_contiguous() and not y.is_contiguous()
    target = torch.randint(0, 20, (3 * 2,), generator=_gen(11))
    _check_rows(x, y, target, None, None, 0.0, block=8)
    both = torch.cat([a, b]).float().t().contiguous().t()  # column-major [2R, C]
    assert both.stride() == (1, both.shape[0])
    _check_rows(both, None, None, None, None, 0.0, block=8)


def test_float64_inputs_stay_float64() -> None:
    a, b = _pair(3, 9, seed=12)
    kl, _, _ = _check_rows(a, b, None, None, None, 0.0, rtol=1e-12, atol=1e-12)
    assert kl.dtype == torch.float64


def test_double_backward_uses_the_reference() -> None:
    a, b = _pair(3, 7, seed=13)
    x = a.clone().requires_grad_()
    kl, _ = fused_rows_triton(x, b, None, None, None, 0.0)
    (g,) = torch.autograd.grad(kl.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    x_ref = a.clone().requires_grad_()
    kl_ref, _ = rows_reference(x_ref, b, None, None, None, 0.0)
    (g_ref,) = torch.autograd.grad(kl_ref.sum(), x_ref, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), x_ref)
    torch.testing.assert_close(gg, gg_ref)


# ------------------------------------------------------------------- hidden-state path


def _linear_case(
    dtype: torch.dtype, with_bias: bool, seed: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Hidden states ``[2*3, 4, 8]``, projection ``[29, 8]``, bias, targets ``[3, 4]``."""
    g = _gen(seed)
    hidden = torch.randn(6, 4, 8, generator=g).to(dtype)
    weight = (torch.randn(29, 8, generator=g) * 0.5).to(dtype)
    bias = torch.randn(29, generator=g).to(dtype) if with_bias else None
    target = torch.randint(0, 29, (3, 4), generator=g)
    target[0, 1] = -100
    return hidden, weight, bias, target


def _linear_grads(
    fn: Callable[..., Tensor], hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Grads]:
    """The loss ``fn(hidden, weight, bias)`` and its gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(*leaves, *([None] if bias is None else []))
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    ("with_target", "with_mask", "with_bias", "smoothing"),
    [(True, False, False, 0.0), (True, True, True, 0.1), (False, True, False, 0.0)],
)
def test_linear_matches_reference(
    with_target: bool, with_mask: bool, with_bias: bool, smoothing: float
) -> None:
    hidden, weight, bias, target = _linear_case(torch.float32, with_bias, seed=14)
    tgt = target if with_target else None
    mask = torch.rand(3, 4, generator=_gen(15)) > 0.3 if with_mask else None
    ce_keep = None if tgt is None else (tgt != -100).reshape(-1)
    kl_keep = None if mask is None else mask.reshape(-1)
    if ce_keep is not None:
        kl_keep = ce_keep if kl_keep is None else ce_keep & kl_keep
    n_ce = 0 if ce_keep is None else int(ce_keep.sum())
    n_kl = 12 if kl_keep is None else int(kl_keep.sum())
    flat = None if tgt is None else tgt.reshape(-1)

    def kernel(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        loss, task, kl = linear_terms_triton(
            h, w, b, tgt, 3.0, ignore_index=-100, label_smoothing=smoothing, mask=mask,
            chunk_size=2, block_size=8,
        )  # fmt: skip
        assert not task.requires_grad and not kl.requires_grad
        return loss

    def reference(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return linear_reference_loss(
            h.double(), w.double(), None if b is None else b.double(),
            flat, ce_keep, kl_keep, n_ce, n_kl, 3.0, smoothing,
        )  # fmt: skip

    loss, grads = _linear_grads(kernel, hidden, weight, bias)
    ref_loss, ref_grads = _linear_grads(reference, hidden, weight, bias)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(
            g.double(), r.double(), rtol=1e-4, atol=1e-6 * float(r.abs().max())
        )


def test_linear_bf16_and_all_padding() -> None:
    hidden, weight, bias, target = _linear_case(torch.bfloat16, True, seed=16)
    kw = {"ignore_index": -100, "label_smoothing": 0.0, "mask": None}

    def kernel(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return linear_terms_triton(h, w, b, target, 1.0, **kw)[0]

    def reference(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        keep = (target != -100).reshape(-1)
        n = int(keep.sum())
        return linear_reference_loss(
            h.double(), w.double(), None if b is None else b.double(),
            target.reshape(-1), keep, keep, n, n, 1.0, 0.0,
        )  # fmt: skip

    loss, grads = _linear_grads(kernel, hidden, weight, bias)
    ref_loss, ref_grads = _linear_grads(reference, hidden, weight, bias)
    assert loss.dtype == torch.float32
    # The projection rounds the logits to bf16 (as the CPU path does); the reference not.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=5e-3, atol=1e-6)
    for g, r in zip(grads, ref_grads):  # gradients rounded to bf16 (8 bits) in the kernel
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(
            g.double(), r.double(), rtol=2e-2, atol=2e-2 * float(r.abs().max())
        )
    padding = torch.full_like(target, -100)
    h = hidden.detach().clone().requires_grad_()
    loss, task, kl = linear_terms_triton(h, weight, bias, padding, 1.0, **kw)
    loss.backward()
    assert loss.item() == task.item() == kl.item() == 0.0
    assert h.grad is not None and not bool(h.grad.any())


def test_linear_double_backward_uses_the_reference() -> None:
    hidden, weight, _, target = _linear_case(torch.float64, False, seed=17)
    kw = {"ignore_index": -100, "label_smoothing": 0.0, "mask": None}
    h = hidden.clone().requires_grad_()
    loss = linear_terms_triton(h, weight, None, target, 2.0, **kw)[0]
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), h)
    keep = (target != -100).reshape(-1)
    h_ref = hidden.clone().requires_grad_()
    n = int(keep.sum())
    ref = linear_reference_loss(h_ref, weight, None, target.reshape(-1), keep, keep, n, n, 2.0, 0.0)
    (g_ref,) = torch.autograd.grad(ref, h_ref, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), h_ref)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(gg, gg_ref)


# ------------------------------------------------------------ import and GPU compilation


def test_available_under_the_interpreter() -> None:
    assert _triton_kernel.available()


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import rdrop, rdrop._triton_kernel as K
    assert "triton" not in sys.modules, "import rdrop imported triton"
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        print("SKIP", e)
        raise SystemExit(0)
    import triton.language as tl
    kernels = K._kernels()
    flags = dict(HAS_TARGET=True, HAS_CE_KEEP=True, HAS_KL_KEEP=True, DT=tl.float32,
                 BLOCK=2048)
    ptrs = dict(za_ptr="*bf16", zb_ptr="*bf16", ga_ptr="*bf16", gb_ptr="*bf16",
                z_ptr="*bf16", tgt_ptr="*i64", ce_keep_ptr="*u8", kl_keep_ptr="*u8",
                kl_ptr="*fp32", ce_ptr="*fp32", stats_ptr="*fp32", w_ptr="*fp32",
                eps="fp32", w_kl="fp32", w_ce="fp32")
    extra = {"_forward_kernel": {}, "_backward_kernel": dict(WRITE_A=True, WRITE_B=True),
             "_loss_grad_kernel": dict(WRITE=True)}
    for name, kernel in kernels.items():
        consts = dict(flags, **extra[name])
        sig = {a: ("constexpr" if a in consts else ptrs.get(a, "i32"))
               for a in kernel.arg_names}
        out = compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                      options={"num_warps": 8})
        assert out.asm["cubin"], name
    print("COMPILED", len(kernels))
    """
)


def test_lazy_import_and_kernels_compile_for_sm90(tmp_path: object) -> None:
    """``import rdrop`` never imports triton, and the kernels compile (no GPU needed) to
    sm_90 code: the interpreter does not check what only the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(f"no CUDA compiler backend in this triton: {done.stdout}")
    assert "COMPILED 3" in done.stdout


def test_the_library_dispatches_cuda_tensors_to_the_triton_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """rdrop_loss and rdrop_linear_cross_entropy reach the Triton kernels for tensors that
    take that path (CUDA ones; here CPU tensors under the interpreter, by patching the
    device test) and give the reference's values."""
    import rdrop
    from rdrop import _fused_kernel
    from rdrop.fused import rdrop_linear_cross_entropy

    calls: list[str] = []
    real_rows, real_linear = _triton_kernel.fused_rows_triton, _triton_kernel.linear_terms_triton

    def rows_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("rows")
        return real_rows(*args, **kwargs)

    def linear_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("linear")
        return real_linear(*args, **kwargs)

    monkeypatch.setattr(_triton_kernel, "fused_rows_triton", rows_spy)
    monkeypatch.setattr(_triton_kernel, "linear_terms_triton", linear_spy)
    monkeypatch.setattr(_fused_kernel, "_uses_triton", lambda x: True)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2 * 4, 37, generator=g)
    target = torch.randint(0, 37, (4,), generator=g)
    got = rdrop.rdrop_loss(list(logits.chunk(2)), target, 2.0, implementation="fused")
    ref = rdrop.rdrop_loss(list(logits.chunk(2)), target, 2.0, implementation="reference")
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    head = torch.nn.Linear(8, 37)
    hidden = torch.randn(2 * 4, 8, generator=g)
    out = rdrop_linear_cross_entropy(hidden, head.weight, target, 2.0, bias=head.bias)
    ref = rdrop.rdrop_loss(list(head(hidden).chunk(2)), target, 2.0, implementation="reference")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert calls == ["rows", "linear"]
