"""Fused cross-entropy + KL paths against the reference ``rdrop_loss`` (value and gradient)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rdrop
from rdrop import _cpu_kernel, _fused_kernel
from rdrop.fused import rdrop_cross_entropy, rdrop_linear_cross_entropy
from tests.test_kl_kernel import assert_close_rel

INF = float("inf")


def _logits(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _target(*shape: int, classes: int, seed: int, ignored: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, shape, generator=g)
    return t.masked_fill(torch.rand(shape, generator=g) < ignored, -100)


def _reference(logits: torch.Tensor, target, alpha: float, **kw):  # type: ignore[no-untyped-def]
    """Value parts and gradient of the reference rdrop_loss on the two halves."""
    x = logits.detach().clone().requires_grad_()
    out = rdrop.rdrop_loss(list(x.chunk(2)), target, alpha, implementation="reference", **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _fused(logits: torch.Tensor, target, alpha: float, **kw):  # type: ignore[no-untyped-def]
    x = logits.detach().clone().requires_grad_()
    out = rdrop_cross_entropy(x, target, alpha, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _assert_same(got, want) -> None:  # type: ignore[no-untyped-def]
    (out, grad), (ref, ref_grad) = got, want
    for name in ("loss", "task_loss", "consistency_loss"):
        assert_close_rel(getattr(out, name).detach(), getattr(ref, name).detach())
    assert grad.dtype == ref_grad.dtype
    assert_close_rel(grad, ref_grad)


@pytest.mark.parametrize("shape", [(6, 11), (4, 7, 30), (2, 3, 5, 9)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_cross_entropy_matches_reference(shape, smoothing: float, chunk_size) -> None:  # type: ignore[no-untyped-def]
    logits = _logits(2 * shape[0], *shape[1:], seed=1)
    target = _target(*shape[:-1], classes=shape[-1], seed=2, ignored=0.2)
    kw = {"label_smoothing": smoothing}
    got = _fused(logits, target, 3.0, chunk_size=chunk_size, **kw)
    _assert_same(got, _reference(logits, target, 3.0, **kw))


@pytest.mark.parametrize("ignored", [0.0, 0.05, 0.6, 1.0])
@pytest.mark.parametrize("with_mask", [False, True])
def test_ignore_index_and_masks(ignored: float, with_mask: bool) -> None:
    logits = _logits(2 * 8, 9, 13, seed=3)
    target = _target(8, 9, classes=13, seed=4, ignored=ignored)
    mask = (
        (torch.rand(8, 9, generator=torch.Generator().manual_seed(5)) > 0.3) if with_mask else None
    )
    got = _fused(logits, target, 2.0, mask=mask, chunk_size=5)
    _assert_same(got, _reference(logits, target, 2.0, mask=mask))
    if ignored == 1.0:  # an all-padding batch: 0, not NaN
        assert got[0].loss.item() == 0.0 and not bool(got[1].any())


def test_padding_rows_with_garbage_get_zero_gradient() -> None:
    logits = _logits(2 * 6, 10, seed=6)
    target = _target(6, classes=10, seed=7)
    target[4:] = -100
    logits[4:6] = float("nan")  # garbage in ignored rows of pass 1
    logits[10:12, 3] = INF  # and of pass 2
    out, grad = _fused(logits, target, 1.0)
    assert torch.isfinite(out.loss)
    assert bool((grad[4:6] == 0).all()) and bool((grad[10:12] == 0).all())
    _assert_same((out, grad), _reference(logits.nan_to_num(0.0, 0.0), target, 1.0))


def test_shared_neg_inf_vocabulary_mask() -> None:
    logits = _logits(2 * 5, 4, 12, seed=8)
    logits[..., 9:] = -INF  # classes banned in both passes
    target = _target(5, 4, classes=9, seed=9, ignored=0.1)
    got = _fused(logits, target, 5.0, label_smoothing=0.0, chunk_size=3)
    _assert_same(got, _reference(logits, target, 5.0))
    assert bool((got[1][..., 9:] == 0).all())


def test_neg_inf_target_logit_is_infinite_loss() -> None:
    logits = _logits(2 * 3, 5, seed=10)
    target = torch.tensor([0, 1, 2])
    logits[0, 0] = -INF
    logits[3, 0] = -INF  # same class in both passes: KL finite, CE infinite
    out = rdrop_cross_entropy(logits, target, 1.0, check_finite=False)
    ref = rdrop.rdrop_loss(
        list(logits.chunk(2)), target, 1.0, implementation="reference", check_finite=False
    )
    assert out.task_loss.item() == ref.task_loss.item() == INF
    assert_close_rel(out.consistency_loss, ref.consistency_loss)
    with pytest.raises(ValueError, match="not finite"):
        rdrop_cross_entropy(logits, target, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype: torch.dtype) -> None:
    logits = _logits(2 * 6, 5, 40, seed=11).to(dtype)
    target = _target(6, 5, classes=40, seed=12, ignored=0.3)
    out, grad = _fused(logits, target, 1.0, chunk_size=4)
    ref, ref_grad = _reference(logits.float(), target, 1.0)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_rel(out.loss.detach(), ref.loss.detach())
    eps = torch.finfo(dtype).eps
    scale = float(ref_grad.abs().max())
    torch.testing.assert_close(grad.float(), ref_grad, rtol=eps, atol=1e-5 * scale)


def test_unlabeled_batch_is_consistency_only() -> None:
    logits = _logits(2 * 4, 6, seed=13)
    mask = torch.tensor([True, False, True, True])
    got = _fused(logits, None, 4.0, mask=mask)
    _assert_same(got, _reference(logits, None, 4.0, mask=mask))
    assert got[0].task_loss.item() == 0.0


def test_more_than_two_passes_fall_back_to_rdrop_loss() -> None:
    logits = _logits(3 * 4, 6, seed=14).requires_grad_()
    target = _target(4, classes=6, seed=15)
    out = rdrop_cross_entropy(logits, target, 1.0, num_passes=3)
    ref = rdrop.rdrop_loss(list(logits.chunk(3)), target, 1.0)
    torch.testing.assert_close(out.loss, ref.loss)


def test_float64_gradcheck() -> None:
    logits = _logits(2 * 3, 5, seed=16).double().requires_grad_()
    target = torch.tensor([0, -100, 4])
    mask = torch.tensor([True, True, False])
    assert torch.autograd.gradcheck(
        lambda x: rdrop_cross_entropy(x, target, 2.0, label_smoothing=0.1, mask=mask).loss,
        (logits,),
    )


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda x, t: rdrop_cross_entropy(x[:5], t), ValueError, "multiple"),
        (lambda x, t: rdrop_cross_entropy(x, t.float()), TypeError, "integer"),
        (lambda x, t: rdrop_cross_entropy(x, t + 100), ValueError, "outside"),
        (lambda x, t: rdrop_cross_entropy(x, t[:2]), ValueError, "shape"),
        (lambda x, t: rdrop_cross_entropy(x, t, -1.0), ValueError, "alpha"),
        (lambda x, t: rdrop_cross_entropy(x, t, label_smoothing=1.0), ValueError, "smoothing"),
        (lambda x, t: rdrop_cross_entropy(x, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda x, t: rdrop_cross_entropy(x, t, chunk_size=2.0), TypeError, "chunk_size"),
        (lambda x, t: rdrop_cross_entropy(x, t, num_passes=1), ValueError, "num_passes"),
        (lambda x, t: rdrop_cross_entropy(x, t, num_passes=True), TypeError, "num_passes"),
        (lambda x, t: rdrop_cross_entropy(x, t, mask=(t > 0).long()), TypeError, "bool"),
        (lambda x, t: rdrop_cross_entropy(x, t, mask=t[:2] > 0), ValueError, "mask"),
        (lambda x, t: rdrop_cross_entropy(x.long(), t), TypeError, "floating"),
        (lambda x, t: rdrop_cross_entropy(x[:, :1], t * 0), ValueError, "at least 2 classes"),
    ],
)
def test_cross_entropy_errors(call, error, pattern) -> None:  # type: ignore[no-untyped-def]
    x, t = _logits(2 * 3, 4, seed=17), torch.tensor([0, 1, 3])
    with pytest.raises(error, match=pattern):
        call(x, t)


# -- rdrop_loss / RDropLoss dispatch ---------------------------------------------------------


def test_rdrop_loss_auto_uses_fused_and_writes_one_gradient(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[tuple[int, ...], bool]] = []
    real = _fused_kernel.fused_rows

    def spy(x, y, *args):  # type: ignore[no-untyped-def]
        calls.append((tuple(x.shape), y is None))
        return real(x, y, *args)

    monkeypatch.setattr(_fused_kernel, "fused_rows", spy)
    batch, classes = 4, _fused_kernel.FUSED_MIN_NUMEL // 4  # exactly at the auto threshold
    logits = _logits(2 * batch, classes, seed=18).requires_grad_()
    target = _target(batch, classes=classes, seed=19)
    out = rdrop.rdrop_loss(list(logits.split(batch)), target, 1.0)
    out.loss.backward()
    assert calls == [((2 * batch, classes), True)]  # the concatenated tensor itself
    ref, ref_grad = _reference(logits, target, 1.0)
    assert_close_rel(out.loss.detach(), ref.loss)
    assert_close_rel(logits.grad, ref_grad)
    # below the threshold, and with the switch: the reference graph
    calls.clear()
    small = _logits(2 * 3, 5, seed=20)
    rdrop.rdrop_loss(list(small.chunk(2)), torch.tensor([0, 1, 2]), 1.0)
    rdrop.rdrop_loss(list(logits.split(batch)), target, 1.0, implementation="reference")
    assert calls == []


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_symmetric_kl_of_halves_writes_one_gradient(chunk_size, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``symmetric_kl(*logits.chunk(2))``: the kernel gets the concatenated tensor itself,
    so autograd does not build a zero-filled copy of it per half."""
    seen: list[bool] = []
    for module, name in ((_cpu_kernel, "rows"), (_fused_kernel, "fused_rows")):
        real = getattr(module, name)

        def spy(x, y, *args, _real=real):  # type: ignore[no-untyped-def]
            seen.append(y is None)
            return _real(x, y, *args)

        monkeypatch.setattr(module, name, spy)
    logits = _logits(2 * 6, 4, 50, seed=36).requires_grad_()
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(37)) > 0.3
    value = rdrop.symmetric_kl(
        *logits.chunk(2), mask, implementation="fused", chunk_size=chunk_size
    )
    (grad,) = torch.autograd.grad(value, logits)
    assert seen and all(seen)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = rdrop.symmetric_kl(*ref_logits.chunk(2), mask, implementation="reference")
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert_close_rel(value.detach(), ref.detach())
    assert_close_rel(grad, ref_grad)


def test_fused_on_separate_or_strided_passes() -> None:
    full = _logits(2 * 4, 6, 9, seed=21)
    target = _target(4, 5, classes=9, seed=22)
    for passes in (
        [full[:4, :5].clone(), full[4:, :5].clone()],  # unrelated tensors
        list(full[:, :5].split(4)),  # views of a larger tensor (not [a; b])
        list(full[:, :5].contiguous().chunk(2)),  # halves of one tensor
    ):
        a, b = (p.detach().clone().requires_grad_() for p in passes)
        out = rdrop.rdrop_loss([a, b], target, 2.0, implementation="fused")
        ga, gb = torch.autograd.grad(out.loss, (a, b))
        a2, b2 = (p.detach().clone().requires_grad_() for p in passes)
        ref = rdrop.rdrop_loss([a2, b2], target, 2.0, implementation="reference")
        ra, rb = torch.autograd.grad(ref.loss, (a2, b2))
        assert_close_rel(out.loss.detach(), ref.loss.detach())
        assert_close_rel(ga, ra)
        assert_close_rel(gb, rb)


def test_concatenated_base_detection() -> None:
    x = torch.randn(8, 5, requires_grad=True)
    y = x * 1.0
    a, b = y.split(4)
    assert _fused_kernel.concatenated_base(a, b) is y
    assert _fused_kernel.concatenated_base(b, a) is None  # wrong order
    assert _fused_kernel.concatenated_base(*y[:, :3].split(4)) is None  # strided views
    assert _fused_kernel.concatenated_base(*y[:6].split(3)) is None  # not the whole tensor
    assert _fused_kernel.concatenated_base(y[:4].clone(), y[4:].clone()) is None
    tokens = torch.randn(8 * 3, 5).view(8, 3, 5)  # a view of a 2-D tensor
    a, b = tokens.chunk(2)
    assert _fused_kernel.concatenated_base(a, b) is tokens._base


def test_fused_switch_errors_and_unsupported_configurations() -> None:
    a, b, c = _logits(3, 4, seed=23), _logits(3, 4, seed=24), _logits(3, 4, seed=25)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="implementation"):
        rdrop.rdrop_loss([a, b], y, implementation="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="implementation"):
        rdrop.RDropLoss(implementation="fast")  # type: ignore[arg-type]
    for kwargs, passes in (
        ({}, [a, b, c]),
        ({"task": "mse", "consistency": "mse"}, [a, b]),
        ({"consistency": "mse"}, [a, b]),
        ({"task_passes": 1}, [a, b]),
    ):
        target = a if kwargs.get("task") == "mse" else y
        with pytest.raises(ValueError, match="fused"):
            rdrop.rdrop_loss(passes, target, implementation="fused", **kwargs)  # type: ignore[arg-type]
        # "auto" quietly takes the reference path
        rdrop.rdrop_loss(passes, target, **kwargs)  # type: ignore[arg-type]
    assert "implementation='reference'" in repr(rdrop.RDropLoss(implementation="reference"))


def _translation_model(vocab: int = 50) -> nn.Module:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 16)
            self.drop = nn.Dropout(0.3)
            self.out = nn.Linear(16, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.drop(self.emb(tokens)))

    return Tiny()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_wrapper_with_fused_loss_equals_reference(smoothing: float) -> None:
    tokens = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(26))
    target = tokens.masked_fill(tokens < 5, -100)
    grads = {}
    values = {}
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        model = _translation_model()
        loss = rdrop.RDropLoss(2.0, label_smoothing=smoothing, implementation=impl)
        wrapped = rdrop.RDrop(model, loss=loss)
        torch.manual_seed(1)
        out = wrapped(tokens, target=target)
        out.loss.backward()
        values[impl] = (out.loss.item(), out.task_loss.item(), out.consistency_loss.item())
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    assert values["fused"] == pytest.approx(values["reference"], rel=1e-5)
    for g, r in zip(grads["fused"], grads["reference"]):
        assert_close_rel(g, r)


# -- rdrop_linear_cross_entropy ---------------------------------------------------------------


@pytest.fixture(params=["cpp", "aten"])
def linear_kernel(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Run a hidden-state test with the C++ row kernel per chunk and with the ATen formulas."""
    if request.param == "cpp":
        if _cpu_kernel.load() is None:
            pytest.skip("the C++ kernel cannot be built here")
        monkeypatch.delenv("RDROP_NO_CPP", raising=False)
    else:
        monkeypatch.setenv("RDROP_NO_CPP", "1")
    return str(request.param)


def _count_cpp_chunks(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = _cpu_kernel.pair_terms

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = real(*args, **kwargs)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(_cpu_kernel, "pair_terms", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.usefixtures("linear_kernel")
def test_linear_matches_materialized_reference(dtype, with_bias: bool, smoothing: float) -> None:  # type: ignore[no-untyped-def]
    batch, length, hidden, vocab = 3, 5, 8, 37
    g = torch.Generator().manual_seed(27)
    h = torch.randn(2 * batch, length, hidden, generator=g, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    bias = torch.randn(vocab, generator=g, dtype=dtype) if with_bias else None
    target = _target(batch, length, classes=vocab, seed=28, ignored=0.2)
    mask = torch.rand(batch, length, generator=g) > 0.3
    inputs = [h, weight] + ([bias] if bias is not None else [])
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = rdrop_linear_cross_entropy(
        leaves[0],
        leaves[1],
        target,
        3.0,
        bias=leaves[2] if with_bias else None,
        label_smoothing=smoothing,
        mask=mask,
        chunk_size=2,
    )
    got = torch.autograd.grad(out.loss, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    logits = torch.nn.functional.linear(
        ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None
    )
    ref = rdrop.rdrop_loss(
        list(logits.chunk(2)),
        target,
        3.0,
        label_smoothing=smoothing,
        mask=mask,
        implementation="reference",
    )
    want = torch.autograd.grad(ref.loss, ref_leaves)
    for name in ("loss", "task_loss", "consistency_loss"):
        assert_close_rel(getattr(out, name).detach(), getattr(ref, name).detach())
    assert not out.task_loss.requires_grad and not out.consistency_loss.requires_grad
    for a, b in zip(got, want):
        assert_close_rel(a, b)


@pytest.mark.usefixtures("linear_kernel")
def test_linear_padding_rows_with_garbage_do_not_leak() -> None:
    g = torch.Generator().manual_seed(31)
    h, weight = torch.randn(2 * 6, 4, generator=g), torch.randn(30, 4, generator=g)
    target = torch.randint(0, 30, (6,), generator=g)
    target[5] = -100  # one padding row of six: not the gather threshold of the logits kernel
    h[5] = float("nan")
    h[11] = float("inf")
    leaves = [h.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = rdrop_linear_cross_entropy(leaves[0], leaves[1], target, 1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert bool(torch.isfinite(leaves[1].grad).all())
    assert bool((leaves[0].grad[5] == 0).all()) and bool((leaves[0].grad[11] == 0).all())
    clean = h.nan_to_num(0.0, 0.0)
    ref = rdrop.rdrop_loss(list((clean @ weight.t()).chunk(2)), target, 1.0)
    assert_close_rel(out.loss.detach(), ref.loss.detach())


@pytest.mark.usefixtures("linear_kernel")
def test_linear_unlabeled_no_grad_and_all_padding() -> None:
    g = torch.Generator().manual_seed(29)
    h, weight = torch.randn(2 * 4, 6, generator=g), torch.randn(20, 6, generator=g)
    logits = h @ weight.t()
    with torch.no_grad():
        out = rdrop_linear_cross_entropy(h, weight, None, 2.0)
    ref = rdrop.rdrop_loss(list(logits.chunk(2)), None, 2.0, implementation="reference")
    assert_close_rel(out.loss, ref.loss)
    padding = torch.full((4,), -100)
    leaf = h.clone().requires_grad_()
    out = rdrop_linear_cross_entropy(leaf, weight, padding, 2.0)
    out.loss.backward()
    assert out.loss.item() == 0.0 and not bool(leaf.grad.any())


def test_linear_uses_the_cpp_kernel_per_chunk(linear_kernel: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = _count_cpp_chunks(monkeypatch)
    g = torch.Generator().manual_seed(33)
    h, weight = torch.randn(2 * 10, 8, generator=g), torch.randn(40, 8, generator=g)
    target = torch.randint(0, 40, (10,), generator=g)
    rdrop_linear_cross_entropy(
        h.requires_grad_(), weight, target, 1.0, chunk_size=3
    ).loss.backward()
    assert calls == ([True] * 4 if linear_kernel == "cpp" else [])


def _linear_value_and_grad(h, weight, target, alpha, **kw):  # type: ignore[no-untyped-def]
    leaf = h.clone().requires_grad_()
    out = rdrop_linear_cross_entropy(leaf, weight, target, alpha, **kw)
    return out.loss.detach(), torch.autograd.grad(out.loss, leaf)[0]


def _linear_reference(h, weight, target, alpha, bias=None):  # type: ignore[no-untyped-def]
    leaf = h.clone().requires_grad_()
    logits = torch.nn.functional.linear(leaf, weight, bias)
    ref = rdrop.rdrop_loss(list(logits.chunk(2)), target, alpha, implementation="reference")
    return ref.loss.detach(), torch.autograd.grad(ref.loss, leaf)[0]


def test_linear_shared_neg_inf_class(linear_kernel: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A class impossible in both passes (bias -inf): both kernels define it as the
    reference does (p = q = 0 there), the C++ one without falling back."""
    calls = _count_cpp_chunks(monkeypatch)
    g = torch.Generator().manual_seed(34)
    h, weight = torch.randn(2 * 6, 5, generator=g), torch.randn(12, 5, generator=g)
    bias = torch.randn(12, generator=g)
    bias[4] = -INF
    target = torch.randint(0, 12, (6,), generator=g).masked_fill_(torch.arange(6) == 4, 0)
    got = _linear_value_and_grad(h, weight, target, 2.0, bias=bias)
    want = _linear_reference(h, weight, target, 2.0, bias=bias)
    for a, b in zip(got, want):
        assert_close_rel(a, b)
    assert calls == ([True] if linear_kernel == "cpp" else [])


@pytest.mark.usefixtures("linear_kernel")
def test_linear_chunk_the_cpp_kernel_refuses_takes_the_aten_formulas(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Chunks the C++ kernel refuses (rows not finite) are computed by the ATen formulas,
    next to chunks it computes, and the whole matches the reference."""
    real = _cpu_kernel.pair_terms
    answered: list[bool] = []

    def every_other(*args, **kwargs):  # type: ignore[no-untyped-def]
        answered.append(len(answered) % 2 == 0)
        return real(*args, **kwargs) if answered[-1] else None

    monkeypatch.setattr(_cpu_kernel, "pair_terms", every_other)
    g = torch.Generator().manual_seed(35)
    h, weight = torch.randn(2 * 7, 6, generator=g), torch.randn(25, 6, generator=g)
    target = torch.randint(0, 25, (7,), generator=g)
    got = _linear_value_and_grad(h, weight, target, 3.0, chunk_size=2)
    want = _linear_reference(h, weight, target, 3.0)
    for a, b in zip(got, want):
        assert_close_rel(a, b)


@pytest.mark.usefixtures("linear_kernel")
def test_linear_bf16_and_three_passes() -> None:
    g = torch.Generator().manual_seed(30)
    h, weight = torch.randn(2 * 8, 16, generator=g), torch.randn(64, 16, generator=g) * 0.3
    target = torch.randint(0, 64, (8,), generator=g)
    out = rdrop_linear_cross_entropy(h.bfloat16(), weight.bfloat16(), target, 1.0)
    ref = rdrop_cross_entropy((h.bfloat16() @ weight.bfloat16().t()), target, 1.0)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-3)
    h3 = torch.randn(3 * 8, 16, generator=g)
    out3 = rdrop_linear_cross_entropy(h3, weight, target, 1.0, num_passes=3)
    ref3 = rdrop.rdrop_loss(list((h3 @ weight.t()).chunk(3)), target, 1.0)
    torch.testing.assert_close(out3.loss, ref3.loss)
    with pytest.raises(ValueError, match="weight"):
        rdrop_linear_cross_entropy(h, weight.t(), target)
    with pytest.raises(TypeError, match="dtype"):
        rdrop_linear_cross_entropy(h, weight.double(), target)
