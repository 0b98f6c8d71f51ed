"""Does this CPU multiply bfloat16 natively? float32 against bfloat16 matrix products.

``python -m benchmarks.precision --threads 1`` times a square matrix product (512 × 512 by
default) in float32 and in bfloat16, interleaved in one process, and writes
``results/precision_<machine>.md`` and ``.json``, ``<machine>`` being the instruction set
(``avx2``, ``avx512``, with ``_bf16`` where the CPU reports AVX512-BF16 or AMX). A CPU
without native bfloat16 emulates it, many times slower than float32; there the lab's bf16
runs (``precision = "bf16"``) should train in float32 instead. Throughput is
``2 n³ / seconds``.
"""

from __future__ import annotations

import argparse
import functools
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.timing import side_by_side
from rdrop_lab.hardware import cpu_capability, native_bfloat16, this_machine

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="the matrices' side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be a positive integer, got {args.size}")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(args.size, args.size, generator=generator)
    b = torch.randn(args.size, args.size, generator=generator)
    products = {
        name: functools.partial(torch.mm, a.to(dtype), b.to(dtype))
        for name, dtype in DTYPES.items()
    }
    timings = side_by_side(products, "float32", args.reps, min_seconds=0.2)
    flop = 2 * args.size**3
    rows = [
        {
            "dtype": name,
            "seconds": t.median,
            "gflops": flop / t.median / 1e9,
            "time_ratio": t.ratio,
        }
        for name, t in timings.items()
    ]
    bf16 = native_bfloat16()
    slug = cpu_capability().lower() + ("_bf16" if bf16 else "")
    meta = {
        "command": f"python -m benchmarks.precision --size {args.size} --threads "
        f"{args.threads} --reps {args.reps}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "machine": this_machine(),
        "native_bfloat16": bf16,
        "threads": args.threads,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"precision_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# float32 and bfloat16 matrix products on {meta['machine']}",
        "",
        f"Command: `{meta['command']}`. {meta['date']}, torch {meta['torch']}, "
        f"{args.threads} thread(s); native bfloat16 (AVX512-BF16 or AMX in /proc/cpuinfo): "
        f"{'unknown' if bf16 is None else 'yes' if bf16 else 'no'}. One {args.size} × "
        f"{args.size} product, interleaved repetitions, medians.",
        "",
        "| dtype | time per product | GFLOP/s | time × float32 |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {row['dtype']} | {1000 * row['seconds']:.2f} ms | {row['gflops']:.1f} | "
        f"{row['time_ratio']:.2f}× |"
        for row in rows
    ]
    (out / f"precision_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
