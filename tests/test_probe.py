"""The dropout-consistency probe."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import rdrop
from tests import reference


def net(p: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 5))


def test_probe_measures_the_symmetric_kl_of_two_dropout_passes() -> None:
    model = net(0.3).eval()
    x = torch.randn(16, 8)
    torch.manual_seed(1)
    result = rdrop.dropout_consistency(model, x)
    model.train()
    torch.manual_seed(1)
    a, b = model(torch.cat([x, x])).chunk(2)
    assert result.consistency == pytest.approx(reference.symmetric_kl(a, b).mean(), rel=1e-5)
    assert result.num_items == 16 and result.dropout_modules == ("2",)


def test_probe_restores_mode_and_rng() -> None:
    model = net(0.3).eval()
    torch.manual_seed(3)
    rdrop.dropout_consistency(model, torch.randn(4, 8), repeats=3)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.randn(4, 8)
    assert torch.equal(after, torch.rand(1))
    assert not any(m.training for m in model.modules())


def test_probe_is_zero_without_dropout_and_grows_with_rate() -> None:
    x = torch.randn(64, 8)
    assert rdrop.dropout_consistency(net(0.0), x).consistency == 0.0
    low = rdrop.dropout_consistency(net(0.1), x, repeats=4).consistency
    high = rdrop.dropout_consistency(net(0.5), x, repeats=4).consistency
    assert 0 < low < high


def test_probe_token_mask_and_errors() -> None:
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Dropout(0.2), nn.Linear(8, 10))
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    result = rdrop.dropout_consistency(emb, ids, consistency_mask=mask)
    assert result.num_items == 8
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        rdrop.dropout_consistency(emb, ids, repeats=0)
    with pytest.raises(ValueError, match="could not find a batched tensor"):
        rdrop.dropout_consistency(emb, 3)


class _MaskedMean(nn.Module):
    """Averages token embeddings over the positions its ``mask`` argument keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)
        self.masks_seen: list[Tensor] = []

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        self.masks_seen.append(mask)
        hidden = self.dropout(self.embed(ids)) * mask.unsqueeze(-1)
        return self.head(hidden.sum(1) / mask.sum(1, keepdim=True))


def test_probe_passes_a_mask_argument_to_the_model() -> None:
    model = _MaskedMean()
    ids = torch.randint(0, 10, (4, 6))
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    result = rdrop.dropout_consistency(model, ids, mask=mask)
    assert result.num_items == 4  # one item per row: the mask was not taken as an item mask
    (seen,) = model.masks_seen
    torch.testing.assert_close(seen, torch.cat([mask, mask]))


def test_probe_names_a_sequence_first_output() -> None:
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(x).transpose(0, 1)  # [T, B, V]

    with pytest.raises(ValueError, match="batch in dim 0"):
        rdrop.dropout_consistency(SequenceFirst(), torch.randn(4, 5, 8))
