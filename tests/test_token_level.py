"""Token-level R-Drop ([B, T, V] logits with padding) against a plain reference, padding
invariance, the all-padding batch and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rdrop
from tests import reference as ref

PAD = -100


def _reference_token_loss(
    a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, alpha: float, smoothing: float
) -> float:
    """Written from the paper, per token: label-smoothed NLL of both passes (smoothing on
    the task part only) + alpha/2 * symmetric KL, both averaged over real tokens only."""
    keep = (target != PAD).numpy().reshape(-1)
    if not keep.any():
        return 0.0
    la = ref.log_softmax(ref._np(a)).reshape(-1, a.shape[-1])[keep]
    lb = ref.log_softmax(ref._np(b)).reshape(-1, b.shape[-1])[keep]
    t = target.reshape(-1).numpy()[keep]
    rows = np.arange(len(t))

    def smoothed_nll(lp: np.ndarray) -> np.ndarray:
        return (1 - smoothing) * -lp[rows, t] + smoothing * -lp.mean(axis=-1)

    task = 0.5 * (smoothed_nll(la).mean() + smoothed_nll(lb).mean())
    # (alpha / 2) * D with D = 1/2 (KL(a||b) + KL(b||a)) per token (the library's convention).
    kl = 0.5 * (ref.kl(la, lb) + ref.kl(lb, la))
    return float(task + alpha / 2 * kl.mean())


def _batch(seed: int, batch: int = 3, length: int = 7, vocab: int = 11, pads: int = 3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    b = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (batch, length), generator=g)
    for row in range(batch):  # a ragged tail of padding per sentence
        target[row, length - (row % (pads + 1)) :] = PAD
    return a, b, target


@pytest.mark.parametrize("implementation", ["reference", "fused"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_level_loss_matches_plain_reference(implementation: str, smoothing: float) -> None:
    a, b, target = _batch(0)
    out = rdrop.rdrop_loss(
        [a, b], target, alpha=5.0, label_smoothing=smoothing, implementation=implementation
    )
    expected = _reference_token_loss(a, b, target, 5.0, smoothing)
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)


def test_criterion_module_on_the_halves_of_one_forward() -> None:
    a, b, target = _batch(1)
    criterion = rdrop.RDropLoss(alpha=5.0, label_smoothing=0.1)
    out = criterion(*torch.cat([a, b]).chunk(2), target)
    assert float(out.loss) == pytest.approx(_reference_token_loss(a, b, target, 5.0, 0.1))


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_padding_invariance(implementation: str) -> None:
    """Appending padded positions (any logits there) changes neither the loss nor the
    gradient at the real positions."""
    a, b, target = _batch(2)
    extra = 4
    noise = torch.randn(a.shape[0], extra, a.shape[-1], dtype=a.dtype) * 50
    a_long = torch.cat([a, noise], dim=1).requires_grad_()
    b_long = torch.cat([b, -noise], dim=1).requires_grad_()
    target_long = torch.cat([target, torch.full((a.shape[0], extra), PAD)], dim=1)
    a_short, b_short = a.clone().requires_grad_(), b.clone().requires_grad_()
    short = rdrop.rdrop_loss([a_short, b_short], target, 2.0, implementation=implementation)
    long = rdrop.rdrop_loss([a_long, b_long], target_long, 2.0, implementation=implementation)
    assert float(long.loss.detach()) == pytest.approx(float(short.loss.detach()), rel=1e-9)
    (short.loss + long.loss).backward()
    torch.testing.assert_close(a_long.grad[:, : a.shape[1]], a_short.grad)
    assert float(a_long.grad[:, a.shape[1] :].abs().max()) == 0.0


def test_padding_invariance_through_a_seq2seq_model() -> None:
    """A real encoder–decoder: extra source and target padding leaves the loss unchanged."""
    from rdrop_lab.models import Seq2SeqTransformer

    torch.manual_seed(0)
    model = Seq2SeqTransformer(30, d_model=16, nhead=2, num_layers=1, dim_feedforward=32).eval()
    src = torch.randint(3, 30, (2, 6))
    tgt = torch.randint(3, 30, (2, 5))
    target = torch.randint(3, 30, (2, 5))
    src_padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    tgt_padded = torch.cat([tgt, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    target_padded = torch.cat([target, torch.full((2, 2), PAD)], dim=1)
    with torch.no_grad():
        short = rdrop.rdrop_loss([model(src, tgt)] * 2, target, 1.0)
        long = rdrop.rdrop_loss([model(src_padded, tgt_padded)] * 2, target_padded, 1.0)
    assert float(long.loss) == pytest.approx(float(short.loss), rel=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_all_padding_batch_is_zero_and_finite(implementation: str) -> None:
    a, b, _ = _batch(3)
    a.requires_grad_()
    target = torch.full(a.shape[:-1], PAD)
    out = rdrop.rdrop_loss([a, b], target, 5.0, label_smoothing=0.1, implementation=implementation)
    assert float(out.loss.detach()) == 0.0 and float(out.task_loss.detach()) == 0.0
    assert float(out.consistency_loss) == 0.0
    out.loss.backward()
    assert torch.isfinite(a.grad).all() and float(a.grad.abs().max()) == 0.0


def test_wrapper_duplicates_source_and_target_side_consistently() -> None:
    """Under RDrop, an encoder–decoder sees [src; src] and [tgt; tgt] (same order)."""
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = torch.nn.Dropout(0.3)
            self.emb = torch.nn.Embedding(20, 8)
            self.out = torch.nn.Linear(8, 20)

        def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
            seen["src"], seen["tgt"] = src_ids, tgt_ids
            memory = self.emb(src_ids).mean(dim=1, keepdim=True)
            return self.out(self.drop(self.emb(tgt_ids) + memory))

    src, tgt = torch.randint(1, 20, (3, 6)), torch.randint(1, 20, (3, 4))
    target = torch.randint(1, 20, (3, 4))
    target[0, 2:] = PAD
    out = rdrop.RDrop(Recorder(), alpha=5.0, label_smoothing=0.1)(src, tgt, target=target)
    torch.testing.assert_close(seen["src"], torch.cat([src, src]))
    torch.testing.assert_close(seen["tgt"], torch.cat([tgt, tgt]))
    assert math.isfinite(float(out.loss)) and out.logits.shape == (3, 4, 20)


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        (torch.zeros(3, 8, dtype=torch.long), {}, "target shape"),
        (torch.full((3, 7), 11), {}, "outside"),
        (torch.zeros(3, 7, dtype=torch.long), {"mask": torch.ones(3, 8, dtype=torch.bool)}, "mask"),
    ],
    ids=["length-mismatch", "vocab-out-of-range", "mask-shape"],
)
def test_bad_token_level_input_is_a_clear_error(
    target: torch.Tensor, kwargs: dict, message: str
) -> None:
    a, b, _ = _batch(4)
    with pytest.raises(ValueError, match=message):
        rdrop.rdrop_loss([a, b], target, 1.0, **kwargs)
