"""GPU benchmark of the Triton R-Drop kernels at LLM shapes: time and peak memory of one
forward + backward of the R-Drop loss (cross-entropy of both passes + symmetric KL).

Usage::

    python -m benchmarks.gpu --out results/gpu            # a few minutes on one H200
    python -m benchmarks.gpu --dry-run                    # the plan only (any machine)
    python -m benchmarks.gpu --smoke --out /tmp/gpu-smoke # tiny shapes; CPU: interpreter

Cases (bf16, ``--tokens`` rows per pass, ``--vocab`` classes, ``--hidden`` for the
hidden-state case), each with the variants:

* ``logits``: the loss from the logits ``[2N, V]`` of both passes: eager PyTorch (the
  naive formula, float32 softmaxes), ``torch.compile`` of it, the Triton kernel
  (``fused_rows_triton``) and the library's ``rdrop_cross_entropy``.
* ``hidden``: the loss from the hidden states ``[2N, H]`` and the projection ``[V, H]``:
  eager (``h @ W.T`` then the naive formula), ``torch.compile`` of it, the Triton path
  (``linear_terms_triton``), the library's ``rdrop_linear_cross_entropy`` and, where
  ``liger_kernel`` is installed, Liger-Kernel's fused linear cross-entropy once per pass
  plus an eager KL (which needs the logits, so they are formed for it).

Time: median over ``--reps`` steps of CUDA-event time (after warm-up, which also
compiles). Memory: ``torch.cuda.max_memory_allocated`` during one step minus what was
allocated before it (inputs, weights), also as a multiple of the bf16 ``[2N, V]`` logits.
Each variant also reports its loss and input gradient relative to eager PyTorch. Results
go to ``OUT.md`` and ``OUT.json`` with the hardware and versions. Numbers are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/gpu.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import Tensor

GIB = 1024**3
ALPHA = 1.0
CASES = ("logits", "hidden")


@dataclass(frozen=True)
class Shapes:
    """Problem size of both cases."""

    tokens: int  # rows per pass
    vocab: int
    hidden: int
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def logits_bytes(self) -> int:
        """Bytes of the ``[2N, V]`` logits of both passes in the benchmark dtype."""
        return 2 * self.tokens * self.vocab * self.torch_dtype.itemsize


FULL = Shapes(tokens=8192, vocab=128256, hidden=4096)  # Llama-3 vocabulary and width
SMOKE = Shapes(tokens=16, vocab=300, hidden=32)


@dataclass
class Result:
    """One variant of one case."""

    case: str
    variant: str
    ms: float | None = None  # median step time
    ms_all: list[float] = field(default_factory=list)
    peak_extra_gib: float | None = None
    peak_x_logits: float | None = None
    loss: float | None = None
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None
    note: str = ""


# ------------------------------------------------------------------------ the losses


def naive_rdrop_loss(za: Tensor, zb: Tensor, target: Tensor, alpha: float) -> Tensor:
    """The R-Drop loss as plain PyTorch writes it (float32 softmaxes of both passes).

    Args:
        za, zb: logits ``[N, V]`` of the two passes.
        target: class ids ``[N]``.
        alpha: consistency weight.

    Returns:
        ``1/2 (CE_a + CE_b) + alpha / 2 * mean_rows 1/2 sum (p - q)(log p - log q)``.
    """
    la, lb = F.log_softmax(za.float(), -1), F.log_softmax(zb.float(), -1)
    ce = 0.5 * (F.nll_loss(la, target) + F.nll_loss(lb, target))
    kl = 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()
    return ce + (alpha / 2.0) * kl


def naive_linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, alpha: float) -> Tensor:
    """:func:`naive_rdrop_loss` of ``hidden @ weight.T`` (both passes' logits formed)."""
    za, zb = (hidden @ weight.t()).chunk(2)
    return naive_rdrop_loss(za, zb, target, alpha)


def triton_logits_loss(logits: Tensor, target: Tensor, alpha: float, block: int | None) -> Tensor:
    """The loss through :func:`rdrop._triton_kernel.fused_rows_triton`."""
    from rdrop._triton_kernel import fused_rows_triton

    kl, ce = fused_rows_triton(logits, None, target, None, None, 0.0, block_size=block)
    return ce.sum() / (2 * target.numel()) + (alpha / 2.0) * kl.mean()


def liger_linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, alpha: float) -> Tensor:
    """Liger-Kernel's fused linear cross-entropy once per pass plus an eager KL."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss()
    ha, hb = hidden.chunk(2)
    ce = 0.5 * (flce(weight, ha, target) + flce(weight, hb, target))
    la = F.log_softmax((ha @ weight.t()).float(), -1)
    lb = F.log_softmax((hb @ weight.t()).float(), -1)
    kl = 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()
    return ce + (alpha / 2.0) * kl


# ---------------------------------------------------------------- inputs and variants


@dataclass
class Problem:
    """The inputs of one case and its variants (``name -> loss thunk``)."""

    leaves: list[Tensor]  # tensors whose gradients the step computes (first: compared)
    variants: dict[str, Callable[[], Tensor]]
    skipped: dict[str, str]  # variant -> why it is not run


def _two_passes(rows: int, cols: int, dtype: torch.dtype, device: str, gen: Any) -> Tensor:
    """``[2 rows, cols]`` values whose halves differ like two dropout passes."""
    base = torch.randn(rows, cols, device=device, generator=gen)
    second = base + 0.3 * torch.randn(rows, cols, device=device, generator=gen)
    return torch.cat([base, second]).mul_(2.0).to(dtype)


def _have(module: str) -> str | None:
    """Why ``module`` cannot be imported (``None``: it can)."""
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a broken install
        return f"{module} not importable ({type(e).__name__})"
    return None


def _compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return torch.compile(fn, dynamic=False)


def logits_problem(shapes: Shapes, device: str, block: int | None) -> Problem:
    """The logits case: one ``[2N, V]`` tensor of both passes (pass a first)."""
    import rdrop._triton_kernel as tk
    from rdrop.fused import rdrop_cross_entropy

    gen = torch.Generator(device=device).manual_seed(0)
    n, v = shapes.tokens, shapes.vocab
    logits = _two_passes(n, v, shapes.torch_dtype, device, gen).requires_grad_()
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    compiled = _compiled(naive_rdrop_loss)
    variants: dict[str, Callable[[], Tensor]] = {
        "eager PyTorch (naive formula)": lambda: naive_rdrop_loss(
            logits[:n], logits[n:], target, ALPHA
        ),
        "torch.compile (naive formula)": lambda: compiled(logits[:n], logits[n:], target, ALPHA),
        "Triton (fused_rows_triton)": lambda: triton_logits_loss(logits, target, ALPHA, block),
        "rdrop_cross_entropy (library dispatch)": lambda: (
            rdrop_cross_entropy(logits, target, ALPHA, check_finite=False).loss
        ),
    }
    skipped = {} if tk.available() else {"Triton (fused_rows_triton)": "triton unavailable"}
    return Problem([logits], variants, skipped)


def hidden_problem(shapes: Shapes, device: str, block: int | None) -> Problem:
    """The hidden-state case: ``[2N, H]`` states and a ``[V, H]`` projection."""
    import rdrop._triton_kernel as tk
    from rdrop.fused import rdrop_linear_cross_entropy

    gen = torch.Generator(device=device).manual_seed(1)
    n, v, h = shapes.tokens, shapes.vocab, shapes.hidden
    hidden = _two_passes(n, h, shapes.torch_dtype, device, gen).requires_grad_()
    weight = torch.randn(v, h, device=device, generator=gen) * h**-0.5 * 4
    weight = weight.to(shapes.torch_dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    compiled = _compiled(naive_linear_loss)

    def triton_loss() -> Tensor:
        return tk.linear_terms_triton(
            hidden, weight, None, target, ALPHA,
            ignore_index=-100, label_smoothing=0.0, mask=None, block_size=block,
        )[0]  # fmt: skip

    variants: dict[str, Callable[[], Tensor]] = {
        "eager PyTorch (naive formula)": lambda: naive_linear_loss(hidden, weight, target, ALPHA),
        "torch.compile (naive formula)": lambda: compiled(hidden, weight, target, ALPHA),
        "Triton (linear_terms_triton)": triton_loss,
        "rdrop_linear_cross_entropy (library dispatch)": lambda: (
            rdrop_linear_cross_entropy(hidden, weight, target, ALPHA, check_finite=False).loss
        ),
        "Liger fused linear CE x2 + eager KL": lambda: liger_linear_loss(
            hidden, weight, target, ALPHA
        ),
    }
    skipped: dict[str, str] = {}
    if not tk.available():
        skipped["Triton (linear_terms_triton)"] = "triton unavailable"
    why = _have("liger_kernel.transformers")
    if why is not None or device != "cuda":
        skipped["Liger fused linear CE x2 + eager KL"] = why or "needs CUDA"
    return Problem([hidden, weight], variants, skipped)


PROBLEMS: dict[str, Callable[[Shapes, str, int | None], Problem]] = {
    "logits": logits_problem,
    "hidden": hidden_problem,
}


# ------------------------------------------------------------------------- measuring


def _step(loss_fn: Callable[[], Tensor], leaves: list[Tensor]) -> Tensor:
    """One forward + backward with fresh gradients; the (detached) loss."""
    for t in leaves:
        t.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], device: str, reps: int) -> list[float]:
    """Milliseconds of ``reps`` steps (CUDA events on a GPU, wall clock elsewhere)."""
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def peak_extra_bytes(step: Callable[[], Any], device: str) -> int | None:
    """Peak bytes allocated during one step beyond those allocated before it."""
    if device != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated() - before


def _rel(got: Tensor, want: Tensor) -> float:
    """``||got - want|| / ||want||`` in float64."""
    diff = (got.double() - want.double()).norm()
    return float(diff / want.double().norm().clamp_min(1e-300))


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_variant(
    case: str,
    name: str,
    loss_fn: Callable[[], Tensor],
    problem: Problem,
    ref: dict[str, Any],
    shapes: Shapes,
    args: argparse.Namespace,
) -> Result:
    """Warm up (compiles), check against the eager reference, then memory and time.

    Args:
        case, name: what is measured.
        loss_fn: the variant's loss thunk.
        problem: the case's inputs.
        ref: the eager variant's ``loss`` and first-leaf ``grad`` (filled by the first
            variant that succeeds).
        shapes: the problem size.
        args: the command line (device, reps, warm-up).

    Returns:
        The variant's result (``note`` says what failed, if anything).
    """
    out = Result(case, name)
    leaves = problem.leaves

    def step() -> Tensor:
        return _step(loss_fn, leaves)

    try:
        loss = step()
        for _ in range(args.warmup - 1):
            step()
        _sync(args.device)
        out.loss = float(loss)
        grad = leaves[0].grad
        if "loss" not in ref and grad is not None:
            ref["loss"], ref["grad"], ref["name"] = out.loss, grad.detach().clone(), name
        else:
            out.loss_rel_err = abs(out.loss - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
            out.grad_rel_err = None if grad is None else _rel(grad, ref["grad"])
        _free(args.device)
        peak = peak_extra_bytes(step, args.device)
        if peak is not None:
            out.peak_extra_gib = peak / GIB
            out.peak_x_logits = peak / shapes.logits_bytes()
        out.ms_all = time_steps(step, args.device, args.reps)
        out.ms = statistics.median(out.ms_all)
    except Exception as e:  # OOM, a compile failure, an API change: reported, not fatal
        out.note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    for t in leaves:
        t.grad = None
    _free(args.device)
    return out


def run_case(case: str, shapes: Shapes, args: argparse.Namespace, log: Any) -> list[Result]:
    """All variants of one case, in order (the first, eager, is the reference)."""
    problem = PROBLEMS[case](shapes, args.device, args.block)
    ref: dict[str, Any] = {}
    results = []
    for name, fn in problem.variants.items():
        if name in problem.skipped:
            results.append(Result(case, name, note=f"skipped: {problem.skipped[name]}"))
        else:
            results.append(measure_variant(case, name, fn, problem, ref, shapes, args))
        r = results[-1]
        ms, gib = _fmt(r.ms, ".1f"), _fmt(r.peak_extra_gib, ".2f")
        print(f"  {case:6s} {name:48s} {ms:>8s} ms {gib:>7s} GiB  {r.note}", file=log, flush=True)
    del problem
    _free(args.device)
    return results


# --------------------------------------------------------------------------- reports


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware(device: str) -> dict[str, Any]:
    """The device, library versions and date of the run."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "device": device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    """The results as a Markdown report."""
    hw = meta["hardware"]
    s: Shapes = meta["shapes"]
    lines = [
        "# R-Drop loss on the GPU: Triton kernels vs PyTorch",
        "",
        f"{hw.get('gpu', hw['device'])}, torch {hw['torch']} (CUDA {hw['cuda']}), "
        f"triton {hw['triton']}, liger-kernel {hw['liger_kernel']}; {hw['date']}.",
        "",
        f"One forward + backward of `1/2 (CE_a + CE_b) + alpha/2 KL` (alpha = {ALPHA}), "
        f"{s.dtype}, N = {s.tokens} tokens per pass, V = {s.vocab}, H = {s.hidden} "
        f"(hidden case). Time: median of {meta['reps']} steps (CUDA events). Memory: peak "
        "allocated during a step beyond the inputs, also as a multiple of the "
        f"[2N, V] logits ({s.logits_bytes() / GIB:.2f} GiB). Errors: relative to eager "
        "PyTorch (loss; first input's gradient, L2).",
        "",
    ]
    for case in CASES:
        rows = [r for r in results if r.case == case]
        if not rows:
            continue
        lines += [
            f"## {case}",
            "",
            "| variant | ms | peak extra GiB | x logits | loss rel. err | grad rel. err | note |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r.variant} | {_fmt(r.ms, '.2f')} | {_fmt(r.peak_extra_gib, '.2f')} | "
                f"{_fmt(r.peak_x_logits, '.2f')} | {_fmt(r.loss_rel_err, '.1e')} | "
                f"{_fmt(r.grad_rel_err, '.1e')} | {r.note.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines)


def write(results: list[Result], meta: dict[str, Any], out: Path) -> None:
    """``OUT.md`` and ``OUT.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "shapes": asdict(meta["shapes"]), "results": [asdict(r) for r in results]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, meta) + "\n")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu"), help="OUT.md / OUT.json")
    p.add_argument("--only", default=",".join(CASES), help="cases, comma-separated")
    p.add_argument("--tokens", type=int, help=f"rows per pass (default {FULL.tokens})")
    p.add_argument("--vocab", type=int, help=f"classes (default {FULL.vocab})")
    p.add_argument("--hidden", type=int, help=f"hidden size (default {FULL.hidden})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    p.add_argument("--block", type=int, help="Triton vocabulary block (power of two)")
    p.add_argument("--smoke", action="store_true", help=f"tiny shapes {SMOKE}, any device")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.block is not None and (args.block < 1 or args.block & (args.block - 1)):
        p.error("--block must be a power of two")
    if args.reps < 1 or args.warmup < 1:
        p.error("--reps and --warmup must be >= 1")
    args.cases = cases
    base = SMOKE if args.smoke else FULL
    args.shapes = Shapes(
        tokens=args.tokens or base.tokens,
        vocab=args.vocab or base.vocab,
        hidden=args.hidden or base.hidden,
        dtype=args.dtype,
    )
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or print its plan); 0 on success, 2 without a usable device."""
    args = parse_args(argv)
    plan = {"cases": args.cases, "shapes": asdict(args.shapes), "device": args.device,
            "reps": args.reps, "warmup": args.warmup, "block": args.block,
            "out": str(args.out)}  # fmt: skip
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    if args.device != "cuda" and not args.smoke:
        print("no CUDA device: run with --smoke (interpreter) or on a GPU", file=sys.stderr)
        return 2
    if args.device != "cuda":  # the CPU smoke run: Triton's interpreter, before any import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"benchmarks.gpu: {json.dumps(plan)}", file=sys.stderr, flush=True)
    results: list[Result] = []
    for case in args.cases:
        results += run_case(case, args.shapes, args, sys.stderr)
    meta = {"hardware": hardware(args.device), "shapes": args.shapes, "reps": args.reps,
            "warmup": args.warmup, "block": args.block}  # fmt: skip
    write(results, meta, args.out)
    print(f"wrote {args.out.with_suffix('.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
