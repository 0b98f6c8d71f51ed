"""Partial-depth R-Drop (``branch_at=``): the layers below the branch point run once, the
layers from it on the repeated batch, with the model's other arguments (masks) repeated
consistently; checked against a hand-written two-stage computation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import rdrop


class MaskedLayer(nn.Module):
    """A residual layer that takes a padding mask from its parent, as Transformer layers do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.dropout = nn.Dropout(0.3)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return h + self.dropout(torch.tanh(self.linear(h))) * mask.unsqueeze(-1)


class TwoStage(nn.Module):
    def __init__(self, d: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.lower_dropout = nn.Dropout(0.3)
        self.layers = nn.ModuleList([MaskedLayer(d) for _ in range(3)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.lower_dropout(self.embed(x))
        for layer in self.layers:
            h = layer(h, mask)
        return self.head(h)


def _data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, generator=g)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0.0
    target = torch.randint(0, 5, (4, 6), generator=g)
    target[1, 4:] = -100
    return x, mask, target


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_branch_equals_the_hand_written_two_stage_computation() -> None:
    torch.manual_seed(0)
    model = TwoStage()
    x, mask, target = _data()
    torch.manual_seed(7)
    out = rdrop.RDrop(model, alpha=2.0, branch_at="layers.1")(x, mask=mask, target=target)
    out.loss.backward()
    got = _grads(model)

    model.zero_grad()
    torch.manual_seed(7)  # the same dropout draws, in the same order
    h = model.lower_dropout(model.embed(x))
    h = model.layers[0](h, mask)  # below the branch point: once, on B rows
    hh, mm = torch.cat([h, h]), torch.cat([mask, mask])
    for layer in model.layers[1:]:
        hh = layer(hh, mm)
    logits = model.head(hh)
    ref = rdrop.rdrop_loss(list(logits.chunk(2)), target, 2.0, implementation="reference")
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lower_layers_run_once_and_upper_layers_on_the_doubled_batch() -> None:
    model = TwoStage()
    rows: dict[str, int] = {}
    for name in ("lower_dropout", "layers.0", "layers.1", "layers.2", "head"):
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, o, name=name: rows.__setitem__(name, o.shape[0]))
    x, mask, target = _data()
    out = rdrop.RDrop(model, alpha=1.0, branch_at=model.layers[1])(x, mask=mask, target=target)
    assert rows == {"lower_dropout": 4, "layers.0": 4, "layers.1": 8, "layers.2": 8, "head": 8}
    assert out.consistency_loss > 0  # the upper layers' dropout differs between the passes
    model.eval()
    assert rdrop.RDrop(model, branch_at="layers.1").eval()(x, mask=mask).shape == (4, 6, 5)


def test_head_only_branch_and_more_passes() -> None:
    model = TwoStage()
    x, mask, target = _data()
    out = rdrop.RDrop(model, branch_at="head", num_passes=3)(x, mask=mask, target=target)
    assert out.consistency_loss == 0  # no dropout at or above the head: the passes agree
    model.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 5))
    out = rdrop.RDrop(model, branch_at="head", num_passes=3)(x, mask=mask, target=target)
    assert out.consistency_loss > 0


def test_branch_at_bad_input_is_named() -> None:
    model = TwoStage()
    with pytest.raises(ValueError, match="branch_at='layer.9' is not a submodule"):
        rdrop.RDrop(model, branch_at="layer.9")
    with pytest.raises(ValueError, match="must be a submodule of the wrapped model"):
        rdrop.RDrop(model, branch_at=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="whole model"):
        rdrop.RDrop(model, branch_at=model)
    with pytest.raises(TypeError, match="branch_at must be"):
        rdrop.RDrop(model, branch_at=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="branch_at needs mode='concat'"):
        rdrop.RDrop(model, branch_at="head", mode="sequential")
    model.unused = nn.Linear(2, 2)
    x, mask, target = _data()
    with pytest.raises(RuntimeError, match="never called"):
        rdrop.RDrop(model, branch_at="unused")(x, mask=mask, target=target)


def test_mixing_tensors_from_below_and_above_outside_a_module_is_explained() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lower, self.upper = (
                nn.Linear(3, 3),
                nn.Sequential(nn.Dropout(0.1), nn.Linear(3, 3)),
            )

        def forward(self, x: Tensor) -> Tensor:
            h = self.lower(x)
            return h + self.upper(h)  # h (B rows) + upper's output (2B rows)

    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="outside a module"):
        rdrop.RDrop(Residual(), branch_at="upper")(x, target=y)


class EncoderDecoder(nn.Module):
    """``nn.Transformer``'s decoder on a once-run encoder, with its shared causal mask."""

    def __init__(self, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = {"d_model": d, "nhead": 2, "dim_feedforward": 16, "batch_first": True}
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer, dropout=0.0), 1, enable_nested_tensor=False
        )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer, dropout=0.3), 2)
        self.head = nn.Linear(d, vocab)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        memory = self.encoder(self.embed(src))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.decoder(self.embed(tgt), memory, tgt_mask=causal))


@pytest.mark.parametrize("target_length", [4, 5])  # 4: the causal mask is [B, B]
def test_a_shared_2d_attention_mask_is_not_repeated(target_length: int) -> None:
    torch.manual_seed(0)
    model = EncoderDecoder()
    src = torch.randint(0, 11, (4, 6))
    tgt = torch.randint(0, 11, (4, target_length))
    target = torch.randint(0, 11, (4, target_length))
    torch.manual_seed(3)
    out = rdrop.RDrop(model, alpha=1.0, branch_at="decoder")(src, tgt, target=target)

    torch.manual_seed(3)  # by hand: the encoder once, the decoder on [h; h] with one mask
    memory = model.encoder(model.embed(src))
    causal = nn.Transformer.generate_square_subsequent_mask(target_length)
    embedded = model.embed(tgt)
    hidden = model.decoder(
        torch.cat([embedded, embedded]), torch.cat([memory, memory]), tgt_mask=causal
    )
    logits = model.head(hidden)
    ref = rdrop.rdrop_loss(list(logits.chunk(2)), target, 1.0, implementation="reference")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


class OwnMaskLayer(nn.Module):
    """A model's own layer whose ``mask`` keyword is a per-row ``[B, T]`` padding mask."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inner = MaskedLayer(d)

    def forward(self, h: Tensor, *, mask: Tensor) -> Tensor:
        return self.inner(h, mask)


def test_a_models_own_mask_keyword_is_repeated() -> None:
    # B == T == 4: only the module's kind, not the keyword, says the mask is per row.
    torch.manual_seed(0)
    embed, layers, head = (
        nn.Linear(3, 8),
        nn.ModuleList([OwnMaskLayer(), OwnMaskLayer()]),
        nn.Linear(8, 5),
    )

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.layers, self.head = embed, layers, head

        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            h = self.embed(x)
            for layer in self.layers:
                h = layer(h, mask=mask)
            return self.head(h)

    x, mask = torch.randn(4, 4, 3), torch.ones(4, 4)
    mask[2, 3:] = 0.0
    out = rdrop.RDrop(Net(), alpha=1.0, branch_at="layers.1")(
        x, mask, target=torch.zeros(4, 4, dtype=torch.long)
    )
    assert torch.isfinite(out.loss)


class SkipAcrossTheBranch(nn.Module):
    """Adds, outside any module, a tensor from below the branch point to one from above."""

    def __init__(self) -> None:
        super().__init__()
        self.lower = nn.Linear(3, 4)
        self.upper = nn.Sequential(nn.Dropout(0.3), nn.Linear(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.lower(x)
        return self.upper(h) + h


def test_a_model_that_mixes_rows_across_the_branch_point_is_refused_by_name() -> None:
    wrapped = rdrop.RDrop(SkipAcrossTheBranch(), branch_at="upper")
    with pytest.raises(RuntimeError, match=r"failed above the branch point on 2 x 6 rows"):
        wrapped(torch.randn(6, 3), target=torch.randint(0, 4, (6,)))
