"""MixUp, Manifold MixUp, FGM and their combinations with R-Drop, against the papers' formulas.

The references are written by hand (NumPy float64 or a manual forward), never by calling
the code under test a second time.
"""

from __future__ import annotations

import copy
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

import rdrop
from tests import reference

# -- helpers -------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def ref_soft_ce(logits: torch.Tensor, soft: np.ndarray) -> float:
    """- sum_c t_c log softmax(z)_c, mean over rows."""
    lp = reference.log_softmax(_np(logits))
    return float(-(soft * lp).sum(-1).mean())


def ref_smoothed_one_hot(y: np.ndarray, classes: int, eps: float) -> np.ndarray:
    out = np.full((len(y), classes), eps / classes)
    out[np.arange(len(y)), y] += 1.0 - eps
    return out


def ref_mixed_ce(logits: torch.Tensor, mixed: rdrop.MixedBatch, eps: float = 0.0) -> float:
    """Zhang et al.: lam CE(out, y) + (1 - lam) CE(out, y[perm])."""
    lam = mixed.lam
    return lam * reference.cross_entropy(logits, mixed.target_a, smoothing=eps) + (
        1 - lam
    ) * reference.cross_entropy(logits, mixed.target_b, smoothing=eps)


def mlp(dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.Tanh(),  # "1"
        nn.Dropout(dropout),
        nn.Linear(7, 7),
        nn.Tanh(),  # "4": after a dropout, so it differs between the R-Drop passes
        nn.Dropout(dropout),
        nn.Linear(7, 3),
    ).double()


def manual_forward(
    net: nn.Sequential, x: torch.Tensor, layer: str, lam: float, perm: torch.Tensor, blocks: int = 1
) -> torch.Tensor:
    """Forward through ``net`` mixing by hand at ``layer``, within each of ``blocks`` copies."""
    h = x
    for name, module in net.named_children():
        h = module(h)
        if name == layer:
            parts = h.chunk(blocks)
            h = torch.cat([lam * p + (1 - lam) * p[perm] for p in parts])
    return h


# -- MixUp ---------------------------------------------------------------------------------


def test_mixup_inputs_loss_and_soft_targets_match_the_formulas() -> None:
    x = torch.randn(6, 5, generator=_gen(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    logits = torch.randn(6, 4, generator=_gen(1)) * 2
    mixed = rdrop.mixup(x, y, alpha=1.0, num_classes=4, generator=_gen(2))
    lam, perm = mixed.lam, mixed.perm.numpy()

    assert 0.0 < lam < 1.0 and isinstance(lam, float)
    assert sorted(perm.tolist()) == list(range(6))
    np.testing.assert_allclose(_np(mixed.inputs), lam * _np(x) + (1 - lam) * _np(x)[perm])
    assert mixed.target_a.tolist() == y.tolist()
    assert mixed.target_b.tolist() == y.numpy()[perm].tolist()

    for eps in (0.0, 0.1):
        want = ref_mixed_ce(logits, mixed, eps)
        assert mixed.loss(logits, eps).item() == pytest.approx(want, rel=1e-5)
        # the same as the cross-entropy against the mixed soft target
        soft = lam * ref_smoothed_one_hot(y.numpy(), 4, eps) + (1 - lam) * ref_smoothed_one_hot(
            y.numpy()[perm], 4, eps
        )
        np.testing.assert_allclose(
            _np(mixed.soft_targets(label_smoothing=eps)), soft, rtol=1e-6, atol=1e-7
        )
        assert ref_soft_ce(logits, soft) == pytest.approx(want, rel=1e-9)
        got = rdrop.soft_cross_entropy(logits, mixed.soft_targets(label_smoothing=eps))
        assert got.item() == pytest.approx(want, rel=1e-5)


def test_mixup_token_level_targets_with_ignore_index() -> None:
    x = torch.randn(4, 3, 2, generator=_gen(3))
    y = torch.randint(0, 5, (4, 3), generator=_gen(4))
    y[0, 2] = -100
    y[2, 1:] = -100
    logits = torch.randn(4, 3, 5, generator=_gen(5))
    mixed = rdrop.mixup(x, y, alpha=0.4, generator=_gen(6))
    assert mixed.loss(logits).item() == pytest.approx(ref_mixed_ce(logits, mixed), rel=1e-5)

    # A positive padding id: soft targets leave its items out exactly like the mixed loss.
    pad = 0
    y_pad = torch.where(y == -100, pad, y + 1)
    padded = rdrop.mixup(x, y_pad, alpha=0.4, num_classes=6, generator=_gen(6))
    soft = padded.soft_targets(ignore_index=pad)
    lam, a_kept, b_kept = padded.lam, padded.target_a != pad, padded.target_b != pad
    want_mass = lam * a_kept.float() + (1 - lam) * b_kept.float()
    torch.testing.assert_close(soft.sum(-1), want_mass)
    assert bool((soft[..., pad][a_kept & b_kept] == 0).all())  # no mass on the pad class
    assert bool((padded.soft_targets().sum(-1) > 0.999).all())  # default: 0 is a real class
    with pytest.raises(ValueError, match="other than ignore_index=0"):
        rdrop.mixup(x, y, alpha=0.4, num_classes=5).soft_targets(ignore_index=0)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha: float) -> None:
    g = _gen(7)
    x, y = torch.zeros(2, 1), torch.tensor([0, 1])
    lams = np.array([rdrop.mixup(x, y, alpha=alpha, generator=g).lam for _ in range(3000)])
    assert ((lams >= 0) & (lams <= 1)).all()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
    if alpha == 1.0:  # uniform
        assert (lams < 0.25).mean() == pytest.approx(0.25, abs=0.03)


def test_mixup_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    x, y = torch.randn(8, 3), torch.arange(8) % 3
    state = torch.get_rng_state()
    a = rdrop.mixup(x, y, generator=_gen(11))
    b = rdrop.mixup(x, y, generator=_gen(11))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.lam == b.lam and torch.equal(a.perm, b.perm)
    torch.manual_seed(3)
    c = rdrop.mixup(x, y)
    torch.manual_seed(3)
    d = rdrop.mixup(x, y)
    assert c.lam == d.lam and torch.equal(c.perm, d.perm)
    # the class is the function with fixed hyper-parameters
    e = rdrop.MixUp(alpha=0.2, num_classes=3)(x, y, generator=_gen(11))
    assert e.lam == a.lam and torch.equal(e.inputs, a.inputs) and e.num_classes == 3
    assert "alpha=0.2" in repr(rdrop.MixUp(0.2))


def test_soft_cross_entropy_skips_zero_rows_and_masked_classes() -> None:
    logits = torch.tensor([[0.0, 1.0, -math.inf], [2.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
    target = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    lp0 = np.log(np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum())
    want = (-(0.25 * lp0[0] + 0.75 * lp0[1]) + np.log(3)) / 2
    got = rdrop.soft_cross_entropy(logits, target)
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-6)


def _bad_mixup_calls() -> list[tuple[object, type[Exception], str]]:
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 2])
    return [
        (lambda: rdrop.mixup(x, y, alpha=0.0), ValueError, "alpha"),
        (lambda: rdrop.mixup(x, y, alpha=-1.0), ValueError, "alpha"),
        (lambda: rdrop.mixup(x, y, alpha=float("nan")), ValueError, "alpha"),
        (lambda: rdrop.mixup(x, y, alpha=float("inf")), ValueError, "alpha"),
        (lambda: rdrop.mixup(x, y, alpha=True), TypeError, "alpha"),
        (lambda: rdrop.mixup(x, y, alpha="1"), TypeError, "alpha"),
        (lambda: rdrop.mixup(torch.ones(3, 2, dtype=torch.long), y), TypeError, "x must"),
        (lambda: rdrop.mixup(x.numpy(), y), TypeError, "x must"),
        (lambda: rdrop.mixup(x, y.float()), TypeError, "target"),
        (lambda: rdrop.mixup(x, y[:2]), ValueError, "batch size"),
        (lambda: rdrop.mixup(x, torch.tensor(1)), ValueError, "target"),
        (lambda: rdrop.mixup(x, y, num_classes=0), ValueError, "num_classes"),
        (lambda: rdrop.mixup(x, y, num_classes=2.0), TypeError, "num_classes"),
        (lambda: rdrop.mixup(x, y, num_classes=2), ValueError, "num_classes"),
        (lambda: rdrop.mixup(x, y, generator=1), TypeError, "generator"),
        (lambda: rdrop.MixUp(alpha=0), ValueError, "alpha"),
        (lambda: rdrop.mixup(x, y).loss(torch.randn(3, 3), 1.0), ValueError, "label_smoothing"),
        (
            lambda: rdrop.mixup(x, y, num_classes=3).loss(torch.randn(3, 4)),
            ValueError,
            "num_classes",
        ),
        (lambda: rdrop.mixup(x, y).loss(torch.randn(2, 3)), ValueError, "target shape"),
        (lambda: rdrop.mixup(x, y).soft_targets(), ValueError, "num_classes"),
        (lambda: rdrop.soft_cross_entropy(torch.randn(3, 3), y), TypeError, "target"),
        (
            lambda: rdrop.soft_cross_entropy(torch.randn(3, 3), torch.rand(3, 4)),
            ValueError,
            "shape",
        ),
        (
            lambda: rdrop.rdrop_mixup_loss([torch.randn(3, 3)] * 2, "mixed"),
            TypeError,
            "mixed",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_mixup_calls())))
def test_mixup_bad_arguments_name_the_argument(case: int) -> None:
    call, error, match = _bad_mixup_calls()[case]
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


# -- Manifold MixUp ------------------------------------------------------------------------


def test_manifold_mixup_equals_a_manual_forward_mixing_at_the_chosen_layer() -> None:
    net = mlp()
    x = torch.randn(6, 5, generator=_gen(20), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mm = rdrop.ManifoldMixup(net, layers=["1", net[4]], alpha=2.0)
    assert mm.layer_names == ["1", "4"]
    chosen = set()
    for seed in range(8):
        with mm.mixing(y, generator=_gen(seed)) as mix:
            logits = net(x)
        chosen.add(mix.layer)
        assert mix.inputs is None and 0 < mix.lam < 1
        assert sorted(mix.perm.tolist()) == list(range(6))
        assert mix.target_b.tolist() == y[mix.perm].tolist()
        want = manual_forward(net, x, mix.layer, mix.lam, mix.perm)
        torch.testing.assert_close(logits, want)
        assert mix.loss(logits).item() == pytest.approx(ref_mixed_ce(logits, mix), rel=1e-9)
    assert chosen == {"1", "4"}
    # the call form
    out, mix = mm(x, target=y, generator=_gen(0))
    torch.testing.assert_close(out, manual_forward(net, x, mix.layer, mix.lam, mix.perm))


def test_manifold_layer_choice_is_uniform() -> None:
    net = mlp()
    mm = rdrop.ManifoldMixup(net, layers=["0", "3", "6"])
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1])
    g = _gen(21)
    counts = dict.fromkeys(mm.layer_names, 0)
    for _ in range(600):
        _, mix = mm(x, target=y, generator=g)
        counts[mix.layer] += 1
    assert all(150 < c < 250 for c in counts.values()), counts


def _no_hooks(net: nn.Module) -> bool:
    return all(not m._forward_hooks for m in net.modules())


def test_manifold_hooks_are_removed_after_the_block_even_on_error() -> None:
    net = mlp()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    before = net(x)
    mm = rdrop.ManifoldMixup(net, layers=["1"])
    with mm.mixing(y, generator=_gen(0)):
        mixed = net(x)
    assert not torch.equal(mixed, before)
    assert _no_hooks(net) and torch.equal(net(x), before)
    with pytest.raises(KeyError), mm.mixing(y):
        net(x)
        raise KeyError("boom")
    assert _no_hooks(net) and torch.equal(net(x), before)
    # an error raised by the hook itself (batch of 4 rows, target of 3)
    with pytest.raises(ValueError, match="multiple of the target's batch size 3"), mm.mixing(y[:3]):
        net(x)
    assert _no_hooks(net) and torch.equal(net(x), before)
    with mm.mixing(y):  # usable again
        net(x)


class TupleBlock(nn.Module):
    """A Hugging Face-style layer: returns (hidden_state, attention-like extra)."""

    def __init__(self, kind: str = "tuple") -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4).double()
        self.kind = kind

    def forward(self, h: torch.Tensor):  # type: ignore[no-untyped-def]
        out, extra = torch.tanh(self.linear(h)), h.sum(-1)
        if self.kind == "list":
            return [out, extra]
        if self.kind == "namedtuple":
            return Pair(out, extra)
        if self.kind == "dict":
            return {"h": out}
        return (out, extra)


Pair = namedtuple("Pair", ["hidden", "extra"])


class TupleModel(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = TupleBlock(kind)
        self.head = nn.Linear(4, 2).double()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.block(h)
        hidden, extra = (out["h"], None) if isinstance(out, dict) else (out[0], out[1])
        return self.head(hidden), extra


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple"])
def test_manifold_mixup_handles_tuple_outputs(kind: str) -> None:
    model = TupleModel(kind)
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    mm = rdrop.ManifoldMixup(model, layers=[model.block])
    with mm.mixing(y, generator=_gen(1)) as mix:
        logits, extra = model(x)
    lam, perm = mix.lam, mix.perm
    hidden = torch.tanh(model.block.linear(x))
    torch.testing.assert_close(logits, model.head(lam * hidden + (1 - lam) * hidden[perm]))
    torch.testing.assert_close(extra, x.sum(-1))  # the other items pass through unchanged
    assert mix.layer == "block"


@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_manifold_mixup_with_rdrop_mixes_the_same_way_in_every_pass(mode: str) -> None:
    net = mlp(dropout=0.3, seed=1)
    x = torch.randn(6, 5, generator=_gen(30), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    wrapped = rdrop.RDrop(net, alpha=1.0, task=rdrop.soft_cross_entropy, mode=mode)
    mm = rdrop.ManifoldMixup(net, layers=["1", "4"])
    chosen = set()
    for seed in range(6):
        torch.manual_seed(100 + seed)
        with mm.mixing(y, num_classes=3, generator=_gen(seed)) as mix:
            out = wrapped(x, target=mix.soft_targets())
        # by hand: the same dropout draws, mixing with perm in each half of [x; x]
        torch.manual_seed(100 + seed)
        if mode == "concat":
            logits = manual_forward(net, torch.cat([x, x]), mix.layer, mix.lam, mix.perm, 2)
            torch.testing.assert_close(out.outputs, logits)
            p1, p2 = logits.chunk(2)
        else:
            p1 = manual_forward(net, x, mix.layer, mix.lam, mix.perm)
            p2 = manual_forward(net, x, mix.layer, mix.lam, mix.perm)
        task = (ref_mixed_ce(p1, mix) + ref_mixed_ce(p2, mix)) / 2
        kl = reference.symmetric_kl(p1, p2).mean()
        assert kl > 1e-4  # dropout made the passes differ
        assert out.task_loss.item() == pytest.approx(task, rel=1e-6)
        assert out.consistency_loss.item() == pytest.approx(kl, rel=1e-6)
        assert out.loss.item() == pytest.approx(task + 0.5 * kl, rel=1e-6)
        same = rdrop.rdrop_mixup_loss([p1, p2], mix, alpha=1.0)
        assert same.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
        chosen.add(mix.layer)
    assert chosen == {"1", "4"}  # "4" comes after a dropout: the halves differ there


def test_manifold_mixup_errors_name_the_problem() -> None:
    net = mlp()
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"layers\[0\]='encoder'"):
        rdrop.ManifoldMixup(net, layers=["encoder"])
    with pytest.raises(ValueError, match="at least one"):
        rdrop.ManifoldMixup(net, layers=[])
    with pytest.raises(TypeError, match="layers must be a list"):
        rdrop.ManifoldMixup(net, layers="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layers\[0\]"):
        rdrop.ManifoldMixup(net, layers=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not part of model"):
        rdrop.ManifoldMixup(net, layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="alpha"):
        rdrop.ManifoldMixup(net, layers=["1"], alpha=0.0)
    with pytest.raises(TypeError, match="model"):
        rdrop.ManifoldMixup("net", layers=["1"])  # type: ignore[arg-type]
    mm = rdrop.ManifoldMixup(net, layers=["1"])
    with pytest.raises(TypeError, match="target"):
        mm.mixing(y.float()).__enter__()
    with pytest.raises(RuntimeError, match="not called"), mm.mixing(y):
        pass
    with pytest.raises(RuntimeError, match="nested"), mm.mixing(y), mm.mixing(y):
        pass
    assert _no_hooks(net)
    model = TupleModel("dict")
    with (
        pytest.raises(TypeError, match="cannot mix the output of layer 'block'"),
        rdrop.ManifoldMixup(model, layers=["block"]).mixing(torch.tensor([0, 1])),
    ):
        model(torch.randn(2, 4, dtype=torch.float64))


# -- FGM -----------------------------------------------------------------------------------


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 5, dropout: float = 0.0, sparse: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.word_embeddings = nn.Embedding(vocab, dim, sparse=sparse)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.word_embeddings(ids).mean(1)))


def _token_batch(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 12, (n, 4), generator=_gen(seed))
    counts = torch.stack([(ids % 3 == c).sum(1) for c in range(3)], 1)
    return ids, counts.argmax(1)  # the most frequent token class (a bag-of-words task)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fgm_perturbation_has_norm_epsilon_along_the_gradient(dtype: torch.dtype) -> None:
    model = TokenClassifier().to(dtype)
    ids, y = _token_batch()
    rdrop.task_loss(model(ids), y).backward()
    weight = model.word_embeddings.weight
    g = weight.grad.detach().double().clone()
    w0, head0 = weight.detach().clone(), model.head.weight.detach().clone()
    fgm = rdrop.FGM(model, epsilon=0.7)
    assert list(fgm.params) == ["word_embeddings.weight"]
    fgm.attack()
    assert fgm.is_perturbed
    r = weight.detach().double() - w0.double()
    assert r.norm().item() == pytest.approx(0.7, abs=1e-5)
    torch.testing.assert_close(r, 0.7 * g / g.norm(), atol=1e-6, rtol=1e-5)
    assert torch.equal(model.head.weight, head0)
    fgm.restore()
    assert not fgm.is_perturbed and torch.equal(weight, w0)
    fgm.restore()  # a no-op
    assert torch.equal(weight, w0)


def test_fgm_selects_by_module_and_by_several_names() -> None:
    model = TokenClassifier()
    assert list(rdrop.FGM(model, param_names=model.word_embeddings).params) == [
        "word_embeddings.weight"
    ]
    fgm = rdrop.FGM(model, epsilon=0.3, param_names=("word_embeddings", "head.bias"))
    assert sorted(fgm.params) == ["head.bias", "word_embeddings.weight"]
    ids, y = _token_batch()
    rdrop.task_loss(model(ids), y).backward()
    originals = {n: p.detach().clone() for n, p in fgm.params.items()}
    with fgm.perturbed():
        for name, param in fgm.params.items():  # each parameter normalized on its own
            assert (param - originals[name]).norm().item() == pytest.approx(0.3, rel=1e-5)
    assert all(torch.equal(p, originals[n]) for n, p in fgm.params.items())


def test_fgm_sparse_gradient_and_zero_or_nonfinite_gradient() -> None:
    model = TokenClassifier(sparse=True)
    ids, y = _token_batch()
    rdrop.task_loss(model(ids), y).backward()
    assert model.word_embeddings.weight.grad.is_sparse
    w0 = model.word_embeddings.weight.detach().clone()
    fgm = rdrop.FGM(model, epsilon=1.0)
    with fgm.perturbed():
        assert (model.word_embeddings.weight - w0).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(model.word_embeddings.weight, w0)
    model = TokenClassifier()
    fgm = rdrop.FGM(model)
    w0 = model.word_embeddings.weight.detach().clone()
    for grad in (
        torch.zeros_like(w0),
        torch.full_like(w0, math.inf),
        torch.full_like(w0, math.nan),
    ):
        model.word_embeddings.weight.grad = grad
        with fgm.perturbed():
            assert torch.equal(model.word_embeddings.weight, w0)  # r = 0


def test_fgm_errors_and_restore_on_error() -> None:
    model = TokenClassifier()
    with pytest.raises(ValueError, match=r"param_names='embed_tokens'.*head\.weight"):
        rdrop.FGM(model, param_names="embed_tokens")
    with pytest.raises(ValueError, match="param_names"):
        rdrop.FGM(model, param_names=nn.Embedding(3, 3))
    with pytest.raises(ValueError, match="param_names"):
        rdrop.FGM(model, param_names=("",))
    with pytest.raises(TypeError, match="param_names"):
        rdrop.FGM(model, param_names=3)  # type: ignore[arg-type]
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            rdrop.FGM(model, epsilon=eps)
    with pytest.raises(TypeError, match="model"):
        rdrop.FGM("model")  # type: ignore[arg-type]
    fgm = rdrop.FGM(model)
    with pytest.raises(RuntimeError, match=r"word_embeddings\.weight.*backward"):
        fgm.attack()
    ids, y = _token_batch()
    rdrop.task_loss(model(ids), y).backward()
    w0 = model.word_embeddings.weight.detach().clone()
    fgm.attack()
    with pytest.raises(RuntimeError, match="restore"):
        fgm.attack()
    fgm.restore()
    with pytest.raises(KeyError), fgm.perturbed():
        raise KeyError("boom")
    assert torch.equal(model.word_embeddings.weight, w0) and not fgm.is_perturbed
    with pytest.raises(TypeError, match="fgm"):
        rdrop.fgm_step("fgm", lambda: torch.zeros(()))  # type: ignore[arg-type]


def test_fgm_step_adds_the_adversarial_gradient_at_the_perturbed_weights() -> None:
    model = TokenClassifier().double()
    ids, y = _token_batch(n=8)
    eps = 0.5
    # reference: grad of the clean loss at w + grad of the loss at w + eps g / ||g||
    ref = copy.deepcopy(model)
    clean = rdrop.task_loss(ref(ids), y)
    grads = torch.autograd.grad(clean, list(ref.parameters()))
    g = grads[0]
    with torch.no_grad():
        ref.word_embeddings.weight += eps * g / torch.sqrt((g**2).sum())
    adv = rdrop.task_loss(ref(ids), y)
    adv_grads = torch.autograd.grad(adv, list(ref.parameters()))

    w0 = model.word_embeddings.weight.detach().clone()
    fgm = rdrop.FGM(model, epsilon=eps)
    got_clean, got_adv = rdrop.fgm_step(fgm, lambda: rdrop.task_loss(model(ids), y))
    assert got_clean.item() == pytest.approx(clean.item(), rel=1e-12)
    assert got_adv.item() == pytest.approx(adv.item(), rel=1e-12)
    assert got_adv.item() > got_clean.item()  # the perturbation goes uphill
    for p, a, b in zip(model.parameters(), grads, adv_grads):
        torch.testing.assert_close(p.grad, a + b)
    assert torch.equal(model.word_embeddings.weight, w0)


# -- R-Drop combinations -------------------------------------------------------------------


def test_rdrop_mixup_loss_matches_the_combination_rule() -> None:
    x = torch.randn(5, 3, generator=_gen(40))
    y = torch.tensor([0, 1, 2, 3, 1])
    mixed = rdrop.mixup(x, y, alpha=0.4, generator=_gen(41))
    a, b = torch.randn(5, 4, generator=_gen(42)), torch.randn(5, 4, generator=_gen(43))
    kl = reference.symmetric_kl(a, b).mean()
    for eps in (0.0, 0.1):
        out = rdrop.rdrop_mixup_loss([a, b], mixed, alpha=2.0, label_smoothing=eps)
        task = (ref_mixed_ce(a, mixed, eps) + ref_mixed_ce(b, mixed, eps)) / 2
        assert out.task_loss.item() == pytest.approx(task, rel=1e-5)
        assert out.consistency_loss.item() == pytest.approx(kl, rel=1e-5)  # no smoothing in D
        assert out.loss.item() == pytest.approx(task + kl, rel=1e-5)
    # token level: items whose both targets are padding are left out of D
    yt = torch.tensor([[0, 1, -100], [2, -100, -100]])
    mixed = rdrop.MixedBatch(None, yt, yt[[1, 0]], 0.7, torch.tensor([1, 0]))
    a, b = torch.randn(2, 3, 4, generator=_gen(44)), torch.randn(2, 3, 4, generator=_gen(45))
    out = rdrop.rdrop_mixup_loss([a, b], mixed, alpha=1.0)
    keep = np.array([[True, True, False], [True, True, False]])
    assert out.consistency_loss.item() == pytest.approx(
        reference.symmetric_kl(a, b)[keep].mean(), rel=1e-5
    )


def test_mixup_through_the_rdrop_wrapper_equals_rdrop_mixup_loss() -> None:
    """Both dropout passes see the same mixed input: the wrapper's [x_mix; x_mix]."""
    net = mlp(dropout=0.3)
    x, y = torch.randn(6, 5, generator=_gen(50), dtype=torch.float64), torch.arange(6) % 3
    mixed = rdrop.mixup(x, y, alpha=1.0, num_classes=3, generator=_gen(51))
    wrapped = rdrop.RDrop(net, alpha=1.5, task=rdrop.soft_cross_entropy)
    torch.manual_seed(5)
    out = wrapped(mixed.inputs, target=mixed.soft_targets(label_smoothing=0.1))
    torch.manual_seed(5)
    passes = net(torch.cat([mixed.inputs, mixed.inputs])).chunk(2)
    want = rdrop.rdrop_mixup_loss(passes, mixed, alpha=1.5, label_smoothing=0.1)
    assert want.consistency_loss.item() > 1e-4
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert out.consistency_loss.item() == pytest.approx(want.consistency_loss.item(), rel=1e-6)


def _blobs(n: int = 96, seed: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64) * 2
    y = torch.arange(n) % 3
    return centers[y] + torch.randn(n, 5, generator=g, dtype=torch.float64), y


def _train(kind: str, steps: int = 40) -> tuple[float, float, list[float]]:
    """Train a tiny model with R-Drop + ``kind``; return clean CE before/after, step losses."""
    torch.manual_seed(0)
    g = _gen(1)
    if kind == "fgm":
        model: nn.Module = TokenClassifier(vocab=12, dim=8, dropout=0.2).double()
        x, y = _token_batch(seed=2, n=96)
    else:
        model = mlp(dropout=0.2)
        x, y = _blobs()
    wrapped = rdrop.RDrop(
        model,
        alpha=1.0,
        task=rdrop.soft_cross_entropy if kind == "manifold" else "cross_entropy",
        label_smoothing=0.1 if kind == "label_smoothing" else 0.0,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    mm = rdrop.ManifoldMixup(model, layers=["1", "4"]) if kind == "manifold" else None
    fgm = rdrop.FGM(model, epsilon=0.5) if kind == "fgm" else None

    def clean_ce() -> float:
        model.eval()
        with torch.no_grad():
            value = rdrop.task_loss(model(x), y).item()
        model.train()
        return value

    before, losses = clean_ce(), []
    for _ in range(steps):
        optimizer.zero_grad()
        if kind == "mixup":
            mixed = rdrop.mixup(x, y, alpha=0.2, generator=g)
            passes = model(torch.cat([mixed.inputs, mixed.inputs])).chunk(2)
            loss = rdrop.rdrop_mixup_loss(passes, mixed, alpha=1.0, label_smoothing=0.1).loss
            loss.backward()
        elif kind == "manifold":
            assert mm is not None
            with mm.mixing(y, num_classes=3, generator=g) as mix:
                loss = wrapped(x, target=mix.soft_targets()).loss
            loss.backward()
        elif kind == "fgm":
            assert fgm is not None
            loss, _ = rdrop.fgm_step(
                fgm,
                lambda: wrapped(x, target=y).loss,
                lambda: rdrop.task_loss(model(x), y),
            )
        else:
            loss = wrapped(x, target=y).loss
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return before, clean_ce(), losses


@pytest.mark.parametrize("kind", ["mixup", "manifold", "fgm", "label_smoothing"])
def test_training_with_rdrop_and_each_regularizer_decreases_the_loss(kind: str) -> None:
    before, after, losses = _train(kind)
    assert all(math.isfinite(v) for v in losses)
    assert after < 0.6 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
