"""RDropLoss / rdrop_loss against Eq. 4 and the documented convention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rdrop
from tests import reference


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_loss_is_paper_eq4_halved() -> None:
    a, b = _logits(8, 5, seed=0), _logits(8, 5, seed=1)
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    for alpha in (0.0, 0.5, 1.0, 5.0):
        out = rdrop.RDropLoss(alpha=alpha)(a, b, y)
        assert out.loss.item() == pytest.approx(reference.paper_eq4(a, b, y, alpha) / 2, rel=1e-5)
        assert out.task_loss.item() == pytest.approx(
            (reference.cross_entropy(a, y) + reference.cross_entropy(b, y)) / 2, rel=1e-5
        )
        assert out.consistency_loss.item() == pytest.approx(
            reference.symmetric_kl(a, b).mean(), rel=1e-5
        )
        assert out.alpha == alpha


def test_convention_does_not_depend_on_batch_size() -> None:
    a, b = _logits(6, 4, seed=3), _logits(6, 4, seed=4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    criterion = rdrop.RDropLoss(alpha=2.0)
    once = criterion(a, b, y).loss
    repeated = criterion(a.repeat(5, 1), b.repeat(5, 1), y.repeat(5)).loss
    torch.testing.assert_close(once, repeated)


def test_token_level_ignore_index_in_task_and_kl_and_padding_invariance() -> None:
    a, b = _logits(2, 6, 9, seed=5), _logits(2, 6, 9, seed=6)
    y = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(7))
    y[0, 4:] = -100
    y[1, 2:] = -100
    out = rdrop.RDropLoss(alpha=1.0)(a, b, y)
    keep = y != -100
    assert out.task_loss.item() == pytest.approx(
        (reference.cross_entropy(a, y) + reference.cross_entropy(b, y)) / 2, rel=1e-5
    )
    assert out.consistency_loss.item() == pytest.approx(
        reference.symmetric_kl(a, b)[keep.numpy()].mean(), rel=1e-5
    )
    # more padding with arbitrary logits changes nothing
    pad_a, pad_b = _logits(2, 4, 9, seed=8) * 50, _logits(2, 4, 9, seed=9) * 50
    padded = rdrop.RDropLoss(alpha=1.0)(
        torch.cat([a, pad_a], 1),
        torch.cat([b, pad_b], 1),
        torch.cat([y, torch.full((2, 4), -100)], 1),
    )
    torch.testing.assert_close(padded.loss, out.loss)


def test_all_padding_batch_is_zero_and_finite() -> None:
    a, b = _logits(2, 3, 5, seed=10), _logits(2, 3, 5, seed=11)
    y = torch.full((2, 3), -100)
    # cross_entropy over zero targets is NaN in PyTorch; the R-Drop loss must not be.
    out = rdrop.RDropLoss(alpha=1.0, label_smoothing=0.1)(a, b, y)
    assert out.consistency_loss.item() == 0.0
    assert out.task_loss.item() == 0.0 and out.loss.item() == 0.0


def test_label_smoothing_only_on_task_part() -> None:
    a, b = _logits(5, 4, seed=12), _logits(5, 4, seed=13)
    y = torch.tensor([0, 1, 2, 3, 0])
    plain = rdrop.RDropLoss(alpha=1.0)(a, b, y)
    smooth = rdrop.RDropLoss(alpha=1.0, label_smoothing=0.1)(a, b, y)
    assert smooth.consistency_loss.item() == plain.consistency_loss.item()
    assert smooth.task_loss.item() == pytest.approx(
        (
            reference.cross_entropy(a, y, smoothing=0.1)
            + reference.cross_entropy(b, y, smoothing=0.1)
        )
        / 2,
        rel=1e-5,
    )


def test_regression_uses_mse_consistency_by_default() -> None:
    a, b = _logits(6, 1, seed=14), _logits(6, 1, seed=15)
    y = torch.rand(6)
    out = rdrop.RDropLoss(alpha=1.0, task="mse")(a, b, y)
    assert out.consistency_loss.item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    want_task = (F.mse_loss(a.squeeze(1), y) + F.mse_loss(b.squeeze(1), y)) / 2
    assert out.task_loss.item() == pytest.approx(want_task.item(), rel=1e-6)


def test_multilabel_uses_bernoulli_kl_by_default() -> None:
    a, b = _logits(4, 3, seed=16), _logits(4, 3, seed=17)
    y = (torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    out = rdrop.RDropLoss(alpha=1.0, task="bce")(a, b, y)
    assert out.consistency_loss.item() == pytest.approx(
        reference.bernoulli_symmetric_kl(a, b).mean(), rel=1e-5
    )


def test_callable_task_and_multi_pass() -> None:
    passes = [_logits(5, 4, seed=s) for s in (18, 19, 20)]
    y = torch.tensor([0, 1, 2, 3, 0])
    out = rdrop.rdrop_loss(passes, y, alpha=2.0, task=F.cross_entropy)
    want_task = sum(reference.cross_entropy(p, y) for p in passes) / 3
    assert out.task_loss.item() == pytest.approx(want_task, rel=1e-5)
    assert out.consistency_loss.item() == pytest.approx(reference.multi_pass_kl(passes), rel=1e-5)
    # The paper's m-pass objective divided by m: alpha / m on D, for every m.
    assert out.loss.item() == pytest.approx(
        reference.paper_multi_pass(passes, y, alpha=2.0) / 3, rel=1e-5
    )
    assert out.loss.item() == pytest.approx(
        want_task + 2.0 / 3 * reference.multi_pass_kl(passes), rel=1e-5
    )
    two = rdrop.rdrop_loss(passes[:2], y, alpha=2.0)
    assert two.loss.item() == pytest.approx(
        reference.paper_multi_pass(passes[:2], y, alpha=2.0) / 2, rel=1e-5
    )
    first_only = rdrop.rdrop_loss(passes, y, alpha=2.0, task_passes=1)
    assert first_only.task_loss.item() == pytest.approx(
        reference.cross_entropy(passes[0], y), rel=1e-5
    )


def test_unlabeled_batch_is_consistency_only() -> None:
    a, b = _logits(3, 4, seed=21), _logits(3, 4, seed=22)
    out = rdrop.rdrop_loss([a, b], None, alpha=4.0)
    assert out.task_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(2.0 * reference.symmetric_kl(a, b).mean(), rel=1e-5)


def test_gradient_matches_autograd_of_reference_formula() -> None:
    a = _logits(4, 6, seed=23).double().requires_grad_()
    b = _logits(4, 6, seed=24).double().requires_grad_()
    y = torch.tensor([1, 0, 5, 2])
    rdrop.RDropLoss(alpha=3.0)(a, b, y).loss.backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    la, lb = F.log_softmax(a2, -1), F.log_softmax(b2, -1)
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="batchmean")  # KL(P_a || P_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    eq4 = F.cross_entropy(a2, y) + F.cross_entropy(b2, y) + 3.0 / 2 * (kl_ab + kl_ba)
    (eq4 / 2).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_non_finite_loss_names_the_component() -> None:
    a, b = _logits(3, 4, seed=25), _logits(3, 4, seed=26)
    a[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"not finite.*task_loss=nan.*pass 0: 1 non-finite"):
        rdrop.RDropLoss()(a, b, torch.tensor([0, 1, 2]))
    a, b = _logits(3, 4, seed=25), _logits(3, 4, seed=26)
    a[0, 1] = float("-inf")  # only in one pass: infinite KL
    with pytest.raises(ValueError, match=r"consistency_loss=inf"):
        rdrop.RDropLoss()(a, b, torch.tensor([0, 0, 2]))


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (
            lambda: rdrop.RDropLoss(alpha=-1.0),
            ValueError,
            "alpha must be a finite number >= 0, got -1.0",
        ),
        (lambda: rdrop.RDropLoss(alpha=float("nan")), ValueError, "alpha"),
        (lambda: rdrop.RDropLoss(alpha="1"), TypeError, "alpha must be a real number"),  # type: ignore[arg-type]
        (lambda: rdrop.RDropLoss(task="hinge"), ValueError, "task must be one of"),  # type: ignore[arg-type]
        (lambda: rdrop.RDropLoss(consistency="js"), ValueError, "consistency must be one of"),  # type: ignore[arg-type]
        (lambda: rdrop.RDropLoss(label_smoothing=1.5), ValueError, "label_smoothing"),
        (
            lambda: rdrop.RDropLoss(task="mse", label_smoothing=0.1),
            ValueError,
            "label_smoothing applies",
        ),
    ],
)
def test_bad_construction(make, error, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=pattern):
        make()


def test_bad_targets() -> None:
    a, b = _logits(3, 4, seed=27), _logits(3, 4, seed=28)
    criterion = rdrop.RDropLoss()
    with pytest.raises(ValueError, match=r"target shape \(4,\) must equal.*\(3,\)"):
        criterion(a, b, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"outside \[0, 4\).*\[7"):
        criterion(a, b, torch.tensor([0, 7, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        criterion(a, b, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="same shape"):
        criterion(a, _logits(3, 5, seed=29), torch.tensor([0, 1, 2]))


def test_callable_task_keeps_float64_and_lifts_half_precision() -> None:
    logits, y = _logits(4, 3, seed=40), torch.tensor([0, 1, 2, 0])
    assert rdrop.task_loss(logits.double(), y, F.cross_entropy).dtype == torch.float64
    assert rdrop.task_loss(logits.bfloat16(), y, F.cross_entropy).dtype == torch.float32
