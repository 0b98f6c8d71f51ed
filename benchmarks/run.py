"""Run the rdrop benchmark suite and write ``results/benchmarks.md`` and ``.json``.

Usage::

    python -m benchmarks.run            # full suite (~10 minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # smoke run on small sizes (< 1 minute)
    python benchmarks/run.py --threads 2 --only kl,loss

Times are ratios measured side by side in one process: the variants of a case are
interleaved (rotating order) for several repetitions and the ratio to the baseline is
taken per repetition, then the median is reported (with the min-max range). Memory is the
extra peak RSS of one run in a fresh subprocess per variant (peak after minus peak before
the run, with the inputs already allocated), also as a multiple of one logits tensor.
Benchmark numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.cases import SIZES, SWEEP_SHAPES, Case, build
from benchmarks.memory import measure
from benchmarks.timing import side_by_side

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024

# case -> (variants measured for memory in full / quick mode, repetitions full / quick)
PLAN: dict[str, dict[str, Any]] = {
    "kl": {"memory": ("all", "all"), "reps": (5, 3)},
    "loss": {"memory": ("all", None), "reps": (5, 3)},
    "linear": {"memory": ("all", None), "reps": (5, 3)},
    "classifier": {"memory": (None, None), "reps": (21, 5), "min_seconds": 0.2},
    "translation": {
        "memory": (
            [
                "plain step on the doubled batch (floor)",
                "RDrop (concat, default)",
                "RDrop (concat, reference loss)",
            ],
            None,
        ),
        "reps": (21, 5),
        "min_seconds": 0.2,
    },
    "causal-lm": {"memory": ("all", "all"), "reps": (3, 3)},
    "inference-classifier": {"memory": (None, None), "reps": (21, 5), "min_seconds": 0.2},
    "inference-translation": {"memory": (None, None), "reps": (21, 5), "min_seconds": 0.2},
}


def _sweep_plan() -> dict[str, dict[str, Any]]:
    """One case per (kl | loss, shape) of the sweep; big shapes get fewer repetitions."""
    plan: dict[str, dict[str, Any]] = {}
    for what in ("kl", "loss"):
        for rows, classes in SWEEP_SHAPES:
            numel = rows * classes
            reps = (5, 3) if numel < 1 << 24 else ((3, 1) if numel < 1 << 28 else (1, 1))
            plan[f"sweep-{what}-{rows}x{classes}"] = {
                "memory": (None, None),
                "reps": reps,
                "config": {"what": what, "rows": rows, "classes": classes},
                "quick": numel <= 1 << 21,
            }
    return plan


PLAN.update(_sweep_plan())


def _config(name: str, mode: str) -> dict[str, Any]:
    if name.startswith("sweep-"):
        return dict(PLAN[name]["config"])
    if name.startswith("inference-"):
        which = name.split("-", 1)[1]
        return dict(SIZES[mode][which])
    return dict(SIZES[mode][name])


def _run_case(name: str, mode: str, threads: int, log: Any) -> dict[str, Any]:
    cfg = _config(name, mode)
    full = mode == "full"
    plan = PLAN[name]
    reps = plan["reps"][0 if full else 1]
    log(f"[{name}] building {cfg}")
    case: Case = build(name, cfg)
    started = time.perf_counter()
    check = case.check() if case.check is not None else {}
    min_seconds = plan.get("min_seconds", 0.05) if full else 0.05
    timings = side_by_side(case.variants, case.baseline, reps, min_seconds=min_seconds)
    log(
        f"[{name}] timed {len(case.variants)} variants x {reps} reps in "
        f"{time.perf_counter() - started:.0f} s"
    )
    meta = {
        "title": case.title,
        "baseline": case.baseline,
        "unit_bytes": case.unit_bytes,
        "unit_label": case.unit_label,
    }
    variants = list(case.variants)
    del case  # free the inputs before the memory subprocesses run
    memory_spec = plan["memory"][0 if full else 1]
    memory: dict[str, int] = {}
    if memory_spec is not None:
        for variant in variants if memory_spec == "all" else list(memory_spec):
            memory[variant] = measure(name, variant, cfg, threads)
            log(f"[{name}] memory {variant}: {memory[variant] / MB:.0f} MB")
    return {
        "name": name,
        "config": cfg,
        "reps": reps,
        "check": check,
        "timings": timings,
        "memory": memory,
        "meta": meta,
    }


def _fmt_ratio(t: Any) -> str:
    lo, hi = t.ratio_range
    return f"{t.ratio:.2f}x ({lo:.2f}-{hi:.2f})"


def _markdown_case(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    title, baseline = meta["title"], meta["baseline"]
    unit_bytes, unit_label = meta["unit_bytes"], meta["unit_label"]
    lines = [f"### {title}", ""]
    if unit_bytes:
        lines.append(f"Memory unit: {unit_label} = {unit_bytes / MB:.0f} MB.")
        lines.append("")
    has_mem = bool(result["memory"])
    header = "| variant | median time | time / baseline | speed-up vs baseline |"
    sep = "|---|---:|---:|---:|"
    if has_mem:
        header += " extra peak RSS | x unit |" if unit_bytes else " extra peak RSS |"
        sep += "---:|---:|" if unit_bytes else "---:|"
    lines += [header, sep]
    for variant, t in result["timings"].items():
        mark = " (baseline)" if variant == baseline else ""
        row = (
            f"| {variant}{mark} | {t.median * 1e3:.1f} ms | {_fmt_ratio(t)} | {1 / t.ratio:.2f}x |"
        )
        if has_mem:
            if variant in result["memory"]:
                extra = result["memory"][variant]
                row += f" {extra / MB:.0f} MB |"
                if unit_bytes:
                    row += f" {extra / unit_bytes:.2f} |"
            else:
                row += " - | - |" if unit_bytes else " - |"
        lines.append(row)
    if result["check"]:
        lines += [
            "",
            "Fast path vs reference (float32): relative error "
            + ", ".join(f"{k.replace('_rel_err', '')} {v:.1e}" for k, v in result["check"].items())
            + " (norm of the difference / norm of the reference).",
        ]
    lines.append("")
    return lines


def _targets(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| target | measured | met |", "|---|---:|:---:|"]

    def add(target: str, value: str, ok: bool) -> None:
        rows.append(f"| {target} | {value} | {'yes' if ok else 'no'} |")

    if "kl" in results:
        r = results["kl"]
        t = r["timings"]["rdrop chunked kernel (default)"]
        add(
            "KL fwd+bwd >= 3x faster than the log_target=True reference",
            f"{1 / t.ratio:.2f}x",
            1 / t.ratio >= 3,
        )
        if r["memory"]:
            unit = r["config"]["rows"] * r["config"]["classes"] * 4
            extra = r["memory"]["rdrop chunked kernel (default)"] / unit
            add(
                "KL fwd+bwd extra peak memory <= 2.5x one logits tensor",
                f"{extra:.2f}x",
                extra <= 2.5,
            )
        err = max(r["check"].values())
        add(
            "KL value and gradient within 1e-5 relative of the reference", f"{err:.1e}", err <= 1e-5
        )
    for name, kernel in (
        ("kl", "rdrop chunked kernel (default)"),
        ("loss", "rdrop_loss fused (default)"),
    ):
        if name not in results:
            continue
        timings = results[name]["timings"]
        t = timings[kernel].median
        compiled = timings["torch.compile of the naive formula"].median
        add(
            f"{name}: fwd+bwd >= 1.5x faster than torch.compile of the naive formula",
            f"{compiled / t:.2f}x",
            compiled / t >= 1.5,
        )
        floor = next(v.median for k, v in timings.items() if k.startswith("exp floor"))
        add(f"{name}: within 1.5x of the exp floor", f"{t / floor:.2f}x", t / floor <= 1.5)
        memory = results[name]["memory"]
        if kernel in memory:
            unit = results[name]["config"]["rows"] * results[name]["config"]["classes"] * 4
            extra = memory[kernel] / unit
            add(f"{name}: extra peak memory <= 2.1 logits buffers", f"{extra:.2f}x", extra <= 2.1)
    if "linear" in results:
        timings = results["linear"]["timings"]
        kernel = "rdrop_linear_cross_entropy (no logits)"
        t = timings[kernel].median
        compiled = timings["torch.compile of linear + the naive formula"].median
        add(
            "linear: fwd+bwd >= 1.5x faster than torch.compile of linear + the naive formula",
            f"{compiled / t:.2f}x",
            compiled / t >= 1.5,
        )
        floor = next(v.median for k, v in timings.items() if k.startswith("floor"))
        add("linear: within 1.5x of the matmul + exp floor", f"{t / floor:.2f}x", t / floor <= 1.5)
    sweeps = {n: r for n, r in results.items() if n.startswith("sweep-")}
    wrong = []
    for n, r in sweeps.items():
        t = r["timings"]
        if "auto" not in t:
            continue
        best = min(t["reference"].median, t["fused"].median)
        # auto is one of the two paths: it chose right when it is within noise of the best
        if t["auto"].median > 1.15 * best:
            wrong.append(n.removeprefix("sweep-"))
    if sweeps:
        add(
            "sweep: auto within 15% of the faster path at every size measured",
            "all" if not wrong else "wrong at " + ", ".join(wrong),
            not wrong,
        )
    for name in ("classifier", "translation"):
        if name in results:
            t = results[name]["timings"]
            ratio = t["RDrop (concat, default)"].ratio
            add(
                f"{name}: RDrop step <= 1.05x plain step on the doubled batch",
                f"{ratio:.3f}x",
                ratio <= 1.05,
            )
            seq = t["RDrop (mode='sequential')"].ratio / ratio
            add(f"{name}: sequential / concat (informative)", f"{seq:.2f}x", True)
    for name in ("inference-classifier", "inference-translation"):
        if name in results:
            ratio = results[name]["timings"]["RDrop wrapper (eval)"].ratio
            add(
                f"{name.split('-')[1]}: eval through the wrapper = 1.00x the bare model",
                f"{ratio:.3f}x",
                abs(ratio - 1.0) <= 0.02,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable on a shared machine; with 2 "
        "threads a busy core stalls every parallel region)",
    )
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", default=str(ROOT / "results"), help="output directory")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    torch.set_num_threads(args.threads)
    wanted = args.only.split(",") if args.only else []
    names = [
        n
        for n in PLAN
        if (n in wanted or ("sweep" in wanted and n.startswith("sweep-")))
        or (not wanted and (not args.quick or PLAN[n].get("quick", True)))
    ]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    metas: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = _run_case(name, mode, args.threads, log)
        metas[name] = results[name]["meta"]
    elapsed = time.perf_counter() - started

    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    if args.only:
        command += f" --only {args.only}"
    header = [
        "# rdrop benchmarks",
        "",
        f"Command: `{command}` ({mode} mode, {elapsed / 60:.1f} min). "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()} "
        f"CPU ({torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s).",
        "",
        "Time: variants interleaved in one process, median over repetitions of the "
        "per-repetition ratio to the baseline (min-max in parentheses). Memory: extra peak "
        "RSS of one forward+backward (or training step) in a fresh subprocess, after the "
        "inputs were allocated; it includes the gradients autograd returns. Not asserted "
        "anywhere; correctness is in tests/test_kl_kernel.py and tests/test_fused.py.",
        "",
        "## Targets",
        "",
        *_targets(results),
        "",
        "## Details",
        "",
    ]
    body: list[str] = []
    for name in names:
        body += _markdown_case(results[name], metas[name])
    text = "\n".join(header + body)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "benchmarks" if not args.quick else "benchmarks-quick"
    (out / f"{stem}.md").write_text(text + "\n")
    payload = {
        "command": command,
        "mode": mode,
        "threads": args.threads,
        "torch": torch.__version__,
        "elapsed_seconds": elapsed,
        "cases": {
            name: {
                **metas[name],
                "config": r["config"],
                "reps": r["reps"],
                "check": r["check"],
                "memory_bytes": r["memory"],
                "timings": {
                    v: {"seconds": t.seconds, "ratios": t.ratios, "median_ratio": t.ratio}
                    for v, t in r["timings"].items()
                },
            }
            for name, r in results.items()
        },
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {out / (stem + '.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
