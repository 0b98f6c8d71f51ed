"""Benchmark cases: inputs plus one zero-argument callable per variant.

A case is built from a name and a size config, the same way in the timing process and in
the memory subprocesses (``benchmarks.memory``), so both measure identical work.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rdrop
from rdrop.fused import rdrop_cross_entropy, rdrop_linear_cross_entropy

from .references import log_target_kl, official_readme_kl, official_readme_loss, relative_error

ALPHA = 1.0


@dataclass
class Case:
    title: str
    variants: dict[str, Callable[[], Any]]
    baseline: str
    unit_bytes: int = 0  # "one logits tensor", for memory multiples (0: report MB only)
    unit_label: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    check: Callable[[], dict[str, float]] | None = None


# -- torch.compile baselines and the exp floor ---------------------------------------------

# Exponentials per logit (per pass) of the C++ row kernel: exp(z - max) in forward,
# exp(z - lse) again in backward.
EXPS_PER_LOGIT = 2


def naive_kl(a: Tensor, b: Tensor) -> Tensor:
    """The naive symmetric KL, mean over rows: ``0.5 * sum((p - q)(log p - log q)) / N``."""
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum() / a.shape[0]


def naive_loss(logits: Tensor, target: Tensor, alpha: float) -> Tensor:
    """The naive R-Drop loss as rdrop_loss defines it: mean CE over the real targets of both
    passes + alpha/2 x the mean symmetric KL over the rows with a real target."""
    a, b = logits.chunk(2)
    ce = 0.5 * (F.cross_entropy(a, target) + F.cross_entropy(b, target))
    keep = (target != -100).unsqueeze(1)
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    kl = 0.5 * (((la.exp() - lb.exp()) * (la - lb)) * keep).sum() / keep.sum()
    return ce + 0.5 * alpha * kl


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile(fn)`` (inductor, the default backend)."""
    return torch.compile(fn, dynamic=False)


def exp_floor(x: Tensor, exps: int) -> Callable[[], None]:
    """``exps`` passes of ``torch.exp`` over ``x``'s elements into a preallocated buffer."""
    out = torch.empty_like(x)
    src = x.detach()

    def step() -> None:
        for _ in range(exps):
            torch.exp(src, out=out)

    return step


def matmul_exp_floor(hidden: Tensor, weight: Tensor, exps: int) -> Callable[[], None]:
    """What any hidden-state loss must do: the logits ``h @ W.T``, the hidden and weight
    gradients (two more matmuls of that size) and ``exps`` ``torch.exp`` passes over the
    logits, into preallocated buffers."""
    h, w = hidden.detach(), weight.detach()
    z = torch.empty(h.shape[0], w.shape[0])
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)

    def step() -> None:
        torch.mm(h, w.t(), out=z)
        for _ in range(exps):
            torch.exp(z, out=z)
        torch.mm(z, w, out=grad_h)
        torch.mm(z.t(), h, out=grad_w)

    return step


@contextlib.contextmanager
def without_cpp() -> Iterator[None]:
    """Run with ``RDROP_NO_CPP=1``: the ATen formulas instead of the C++ row kernel."""
    before = os.environ.get("RDROP_NO_CPP")
    os.environ["RDROP_NO_CPP"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RDROP_NO_CPP"]
        else:
            os.environ["RDROP_NO_CPP"] = before


def aten_chunk(classes: int) -> int:
    """Rows per chunk of the chunked ATen kernel's default (giving it selects that kernel)."""
    return max(1, (1 << 18) // max(classes, 1))


# -- consistency term ---------------------------------------------------------------------


def kl_case(rows: int, classes: int) -> Case:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, classes, generator=g).requires_grad_()
    b = torch.randn(rows, classes, generator=g).requires_grad_()

    def run(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], Tensor]:
        def step() -> Tensor:
            a.grad = b.grad = None
            value = fn(a, b)
            value.backward()
            return value

        return step

    both = torch.cat([a.detach(), b.detach()]).requires_grad_()

    def halves() -> Tensor:
        both.grad = None
        value = rdrop.symmetric_kl(*both.chunk(2))  # the usual call on a doubled batch
        value.backward()
        return value

    variants = {
        "official README (softmax targets, sum)": run(official_readme_kl),
        "log_target=True reference": run(log_target_kl),
        "rdrop reference (plain autograd)": run(
            lambda x, y: rdrop.symmetric_kl(x, y, implementation="reference")
        ),
        "rdrop chunked kernel (default)": run(lambda x, y: rdrop.symmetric_kl(x, y)),
        "rdrop kernel on the halves of one tensor": halves,
        "rdrop ATen chunked kernel (RDROP_NO_CPP path)": run(
            lambda x, y: rdrop.symmetric_kl(x, y, chunk_size=aten_chunk(classes))
        ),
        "torch.compile of the naive formula": run(compiled(naive_kl)),
        f"exp floor: {2 * EXPS_PER_LOGIT} torch.exp passes over [{rows}, {classes}]": exp_floor(
            a, 2 * EXPS_PER_LOGIT
        ),
    }

    def check() -> dict[str, float]:
        ref = variants["log_target=True reference"]()
        ref_grads = (a.grad.clone(), b.grad.clone())  # type: ignore[union-attr]
        got = variants["rdrop chunked kernel (default)"]()
        return {
            "value_rel_err": relative_error(got, ref),
            "grad_rel_err": max(
                relative_error(a.grad, ref_grads[0]),  # type: ignore[arg-type]
                relative_error(b.grad, ref_grads[1]),  # type: ignore[arg-type]
            ),
        }

    return Case(
        f"Symmetric KL forward+backward, {rows} x {classes}",
        variants,
        baseline="log_target=True reference",
        unit_bytes=rows * classes * 4,
        unit_label=f"one {rows} x {classes} float32 logits tensor",
        check=check,
    )


def loss_case(rows: int, classes: int) -> Case:
    """R-Drop objective on concatenated logits ``[2 rows, classes]`` (10% padding)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2 * rows, classes, generator=g).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=g)
    target[torch.rand(rows, generator=g) < 0.1] = -100

    def run(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def step() -> Tensor:
            logits.grad = None
            value = fn()
            value.backward()
            return value

        return step

    def rdrop_loss(impl: str) -> Tensor:
        passes = list(logits.split(rows))
        return rdrop.rdrop_loss(passes, target, ALPHA, implementation=impl).loss  # type: ignore[arg-type]

    compiled_loss = compiled(naive_loss)
    variants = {
        "official README recipe (2x CE + softmax-target KL)": run(
            lambda: official_readme_loss(logits, target, ALPHA)
        ),
        "rdrop_loss reference (CE on cat + plain KL)": run(lambda: rdrop_loss("reference")),
        "rdrop_loss fused (default)": run(lambda: rdrop_loss("auto")),
        "rdrop_cross_entropy ATen chunked kernel (RDROP_NO_CPP path)": run(
            lambda: rdrop_cross_entropy(logits, target, ALPHA, chunk_size=aten_chunk(classes)).loss
        ),
        "torch.compile of the naive formula": run(
            lambda: compiled_loss(logits, target, ALPHA)  # type: ignore[no-any-return]
        ),
        f"exp floor: {EXPS_PER_LOGIT} torch.exp passes over [{2 * rows}, {classes}]": exp_floor(
            logits, EXPS_PER_LOGIT
        ),
    }

    def check() -> dict[str, float]:
        ref = variants["rdrop_loss reference (CE on cat + plain KL)"]()
        ref_grad = logits.grad.clone()  # type: ignore[union-attr]
        got = variants["rdrop_loss fused (default)"]()
        return {
            "value_rel_err": relative_error(got, ref),
            "grad_rel_err": relative_error(logits.grad, ref_grad),  # type: ignore[arg-type]
        }

    return Case(
        f"R-Drop loss (CE of both passes + KL) forward+backward, logits [2 x {rows}, {classes}]",
        variants,
        baseline="rdrop_loss reference (CE on cat + plain KL)",
        unit_bytes=rows * classes * 4,
        unit_label=f"one pass's {rows} x {classes} float32 logits",
        check=check,
    )


def linear_case(rows: int, hidden: int, classes: int) -> Case:
    """Output projection + R-Drop loss from the final hidden states ``[2 rows, hidden]``."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2 * rows, hidden, generator=g).requires_grad_()
    head = nn.Linear(hidden, classes)
    target = torch.randint(0, classes, (rows,), generator=g)

    def zero() -> None:
        h.grad = head.weight.grad = head.bias.grad = None

    def materialized(impl: str) -> Callable[[], Tensor]:
        def step() -> Tensor:
            zero()
            passes = list(head(h).split(rows))
            loss = rdrop.rdrop_loss(passes, target, ALPHA, implementation=impl).loss  # type: ignore[arg-type]
            loss.backward()
            return loss

        return step

    def fused() -> Tensor:
        zero()
        loss = rdrop_linear_cross_entropy(h, head.weight, target, ALPHA, bias=head.bias).loss
        loss.backward()
        return loss

    def fused_aten() -> Tensor:
        with without_cpp():
            return fused()

    compiled_step = compiled(
        lambda x, w, bias, t: naive_loss(F.linear(x, w, bias), t, ALPHA)  # type: ignore[no-any-return]
    )

    def compiled_naive() -> Tensor:
        zero()
        loss = compiled_step(h, head.weight, head.bias, target)
        loss.backward()
        return loss  # type: ignore[no-any-return]

    variants = {
        "linear + rdrop_loss reference": materialized("reference"),
        "linear + rdrop_loss fused": materialized("auto"),
        "rdrop_linear_cross_entropy (no logits)": fused,
        "rdrop_linear_cross_entropy, ATen chunks (RDROP_NO_CPP path)": fused_aten,
        "torch.compile of linear + the naive formula": compiled_naive,
        f"floor: 3 matmuls + {EXPS_PER_LOGIT} torch.exp passes over [{2 * rows}, {classes}]": (
            matmul_exp_floor(h, head.weight, EXPS_PER_LOGIT)
        ),
    }

    def check() -> dict[str, float]:
        ref = variants["linear + rdrop_loss reference"]()
        ref_grads = [t.grad.clone() for t in (h, head.weight, head.bias)]  # type: ignore[union-attr]
        got = fused()
        grads = [t.grad for t in (h, head.weight, head.bias)]
        return {
            "value_rel_err": relative_error(got, ref),
            "grad_rel_err": max(relative_error(x, y) for x, y in zip(grads, ref_grads)),  # type: ignore[arg-type]
        }

    return Case(
        f"Linear head + R-Drop loss, hidden [2 x {rows}, {hidden}] -> {classes} classes",
        variants,
        baseline="linear + rdrop_loss reference",
        unit_bytes=rows * classes * 4,
        unit_label=f"one pass's {rows} x {classes} float32 logits",
        check=check,
    )


# -- models ---------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A small Transformer-encoder sequence classifier."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, classes: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(d, classes))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.emb(tokens)).mean(dim=1))


class Translator(nn.Module):
    """A small encoder-decoder ``nn.Transformer`` with a ``vocab``-way output projection."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, max_len: int = 512) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.transformer = nn.Transformer(
            d, heads, layers, layers, 4 * d, dropout=0.3, batch_first=True
        )
        self.out = nn.Linear(d, vocab)

    def forward(self, src: Tensor, tgt: Tensor, src_pad: Tensor, tgt_pad: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        x = self.emb(src) + self.pos[: src.shape[1]]
        y = self.emb(tgt) + self.pos[: tgt.shape[1]]
        h = self.transformer(
            x,
            y,
            tgt_mask=causal,
            tgt_is_causal=True,
            src_key_padding_mask=src_pad,
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
        )
        return self.out(h)


def _doubled(x: Tensor) -> Tensor:
    return torch.cat([x, x])


def _step_variants(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    target: Tensor,
    smoothing: float,
    plain_loss: Callable[[Tensor, Tensor], Tensor],
    with_reference_loss: bool,
) -> dict[str, Callable[[], Any]]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    doubled = tuple(_doubled(t) for t in inputs)
    doubled_target = _doubled(target)
    concat = rdrop.RDrop(model, alpha=ALPHA, label_smoothing=smoothing)
    sequential = rdrop.RDrop(model, alpha=ALPHA, label_smoothing=smoothing, mode="sequential")
    reference = rdrop.RDrop(
        model,
        loss=rdrop.RDropLoss(ALPHA, label_smoothing=smoothing, implementation="reference"),
    )

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        plain_loss(model(*doubled), doubled_target).backward()
        optimizer.step()

    def wrapped(w: rdrop.RDrop) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            w(*inputs, target=target).loss.backward()
            optimizer.step()

        return step

    variants = {
        "plain step on the doubled batch (floor)": plain,
        "RDrop (concat, default)": wrapped(concat),
    }
    if with_reference_loss:
        variants["RDrop (concat, reference loss)"] = wrapped(reference)
    variants["RDrop (mode='sequential')"] = wrapped(sequential)
    return variants


def classifier_case(batch: int, length: int, d: int, layers: int, vocab: int = 1000) -> Case:
    torch.manual_seed(3)
    model = Classifier(vocab, d, max(1, d // 64), layers, classes=4)
    tokens = torch.randint(0, vocab, (batch, length))
    target = torch.randint(0, 4, (batch,))
    variants = _step_variants(
        model, (tokens,), target, 0.0, lambda z, y: F.cross_entropy(z, y), False
    )
    return Case(
        f"Training step, Transformer classifier (d={d}, {layers} layers, batch {batch} "
        f"doubled to {2 * batch}, length {length})",
        variants,
        baseline="plain step on the doubled batch (floor)",
        notes={"model": "classifier"},
    )


def _translation_batch(
    batch: int, length: int, vocab: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(4)
    src = torch.randint(4, vocab, (batch, length), generator=g)
    tgt = torch.randint(4, vocab, (batch, length + 1), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    positions = torch.arange(length)
    src_pad = positions[None, :] >= lengths[:, None]
    tgt_pad = src_pad.clone()
    src = src.masked_fill(src_pad, 0)
    tgt_in = tgt[:, :-1].masked_fill(tgt_pad, 0)
    tgt_out = tgt[:, 1:].masked_fill(tgt_pad, -100)
    return src, tgt_in, src_pad, tgt_pad, tgt_out


def translation_case(batch: int, length: int, d: int, layers: int, vocab: int) -> Case:
    torch.manual_seed(5)
    model = Translator(vocab, d, max(1, d // 64), layers)
    src, tgt_in, src_pad, tgt_pad, tgt_out = _translation_batch(batch, length, vocab)

    def plain_loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), label_smoothing=0.1)

    variants = _step_variants(
        model, (src, tgt_in, src_pad, tgt_pad), tgt_out, 0.1, plain_loss, True
    )
    return Case(
        f"Training step, encoder-decoder nn.Transformer (d={d}, {layers}+{layers} layers, "
        f"vocab {vocab}, batch {batch} doubled to {2 * batch}, length {length}, "
        "label smoothing 0.1)",
        variants,
        baseline="plain step on the doubled batch (floor)",
        unit_bytes=batch * length * vocab * 4,
        unit_label=f"one pass's {batch} x {length} x {vocab} float32 logits",
        notes={"model": "translation"},
    )


def inference_case(which: str, cfg: dict[str, int]) -> Case:
    if which == "classifier":
        torch.manual_seed(3)
        model: nn.Module = Classifier(1000, cfg["d"], max(1, cfg["d"] // 64), cfg["layers"], 4)
        inputs: tuple[Tensor, ...] = (torch.randint(0, 1000, (cfg["batch"], cfg["length"])),)
    else:
        torch.manual_seed(5)
        model = Translator(cfg["vocab"], cfg["d"], max(1, cfg["d"] // 64), cfg["layers"])
        src, tgt_in, src_pad, tgt_pad, _ = _translation_batch(
            cfg["batch"], cfg["length"], cfg["vocab"]
        )
        inputs = (src, tgt_in, src_pad, tgt_pad)
    wrapped = rdrop.RDrop(model, alpha=ALPHA).eval()

    def bare() -> None:
        with torch.no_grad():
            model(*inputs)

    def through_wrapper() -> None:
        with torch.no_grad():
            wrapped(*inputs)

    return Case(
        f"Inference ({which}), eval mode, no_grad",
        {"bare model": bare, "RDrop wrapper (eval)": through_wrapper},
        baseline="bare model",
        notes={"model": which},
    )


# -- a Llama-shaped causal LM with a 128k vocabulary ---------------------------------------


def causal_lm_case(batch: int, length: int, vocab: int, d: int, layers: int) -> Case:
    """One training step of a Llama-shaped causal LM: a plain single pass (the model's own
    loss), R-Drop through the logits, and R-Drop from the hidden states (``output_layer=``,
    no ``[2B, T, V]`` logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
        max_position_embeddings=length + 1, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length + 1), generator=g)
    inputs, target = ids[:, :-1], ids[:, 1:]
    logits_path = rdrop.RDrop(model, ALPHA, warn=False)
    hidden_path = rdrop.RDrop(model, ALPHA, warn=False, output_layer="lm_head")

    def plain() -> Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=inputs, labels=inputs).loss  # shifts inside: T - 1 targets
        loss.backward()
        return loss

    def wrapped(w: rdrop.RDrop) -> Callable[[], Tensor]:
        def step() -> Tensor:
            model.zero_grad(set_to_none=True)
            loss = w(input_ids=inputs, target=target).loss
            loss.backward()
            return loss

        return step

    return Case(
        f"Llama-shaped causal LM step: batch {batch} x {length} tokens, vocabulary {vocab}, "
        f"d {d}, {layers} layers",
        {
            "plain single-pass step (model's own loss)": plain,
            "RDrop through the logits": wrapped(logits_path),
            "RDrop from the hidden states (output_layer='lm_head')": wrapped(hidden_path),
        },
        baseline="plain single-pass step (model's own loss)",
        unit_bytes=batch * length * vocab * 4,
        unit_label=f"one pass's {batch} x {length} x {vocab} float32 logits",
    )


# -- shape sweep: the auto crossover ---------------------------------------------------------

SWEEP_SHAPES = [
    (64, 10),
    (64, 100),
    (256, 100),
    (64, 1000),
    (256, 1000),
    (1024, 1000),
    (1024, 8000),
    (2048, 32000),
    (8192, 128000),
]
# From this many logits per pass, only the kernel variants run (a 8192 x 128000 float32
# tensor is 4 GB; the plain graph would need several more of them).
SWEEP_KERNEL_ONLY_NUMEL = 1 << 28


def sweep_case(what: str, rows: int, classes: int) -> Case:
    """``what`` = "kl" or "loss" at one shape: plain graph, fused kernel, and "auto"."""
    g = torch.Generator().manual_seed(6)
    big = rows * classes >= SWEEP_KERNEL_ONLY_NUMEL
    if what == "kl":
        a = torch.randn(rows, classes, generator=g).requires_grad_()
        b = torch.randn(rows, classes, generator=g).requires_grad_()

        def kl(impl: str) -> Callable[[], None]:
            def step() -> None:
                a.grad = b.grad = None
                rdrop.symmetric_kl(a, b, implementation=impl).backward()  # type: ignore[arg-type]

            return step

        impls = {"reference": kl("reference"), "fused": kl("fused"), "auto": kl("auto")}
    else:
        logits = torch.randn(2 * rows, classes, generator=g).requires_grad_()
        target = torch.randint(0, classes, (rows,), generator=g)

        def loss(impl: str) -> Callable[[], None]:
            def step() -> None:
                logits.grad = None
                passes = list(logits.split(rows))
                rdrop.rdrop_loss(passes, target, ALPHA, implementation=impl).loss.backward()  # type: ignore[arg-type]

            return step

        impls = {"reference": loss("reference"), "fused": loss("fused"), "auto": loss("auto")}
    if big:
        impls = {"fused": impls["fused"]}
    return Case(
        f"Sweep {what} {rows} x {classes}",
        impls,
        baseline="fused",
        notes={"kernel_only": str(big)},
    )


# -- registry -------------------------------------------------------------------------------

SIZES: dict[str, dict[str, dict[str, int]]] = {
    "full": {
        "kl": {"rows": 2048, "classes": 32000},
        "loss": {"rows": 2048, "classes": 32000},
        "linear": {"rows": 1024, "hidden": 512, "classes": 32000},
        "classifier": {"batch": 32, "length": 64, "d": 256, "layers": 4},
        "translation": {"batch": 16, "length": 32, "d": 256, "layers": 3, "vocab": 8000},
        "causal-lm": {"batch": 1, "length": 2048, "vocab": 128256, "d": 256, "layers": 2},
    },
    "quick": {
        "kl": {"rows": 256, "classes": 32000},
        "loss": {"rows": 256, "classes": 32000},
        "linear": {"rows": 128, "hidden": 256, "classes": 32000},
        "classifier": {"batch": 16, "length": 32, "d": 64, "layers": 2},
        "translation": {"batch": 8, "length": 16, "d": 64, "layers": 1, "vocab": 8000},
        "causal-lm": {"batch": 1, "length": 128, "vocab": 128256, "d": 64, "layers": 1},
    },
}


def build(name: str, cfg: dict[str, int]) -> Case:
    warnings.filterwarnings("ignore")  # nn.Transformer's nested-tensor / mask notices
    if name == "kl":
        return kl_case(**cfg)
    if name == "loss":
        return loss_case(**cfg)
    if name == "linear":
        return linear_case(**cfg)
    if name == "classifier":
        return classifier_case(**cfg)
    if name == "translation":
        return translation_case(**cfg)
    if name == "causal-lm":
        return causal_lm_case(**cfg)
    if name.startswith("sweep-"):
        return sweep_case(**cfg)  # type: ignore[arg-type]
    if name.startswith("inference-"):
        return inference_case(name.split("-", 1)[1], cfg)
    raise ValueError(f"unknown case {name!r}")


__all__ = ["SIZES", "Case", "build"]
