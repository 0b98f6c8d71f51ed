"""Step cost of the cheaper R-Drop variants, side by side in one process.

``python -m benchmarks.cheap_variants --threads 1`` times one training step (forward,
backward, gradient clipping, AdamW) of the Fashion-MNIST ViT of the converged suites
(batch 128, the model of ``configs/converged/images.toml``) for the baseline, full R-Drop,
partial-depth R-Drop (``branch_at``), every-2-steps R-Drop and stop-gradient R-Drop;
interleaved repetitions, median of the per-repetition ratios to the plain step. Writes
``results/cheap_variants.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import rdrop
from benchmarks.timing import side_by_side
from rdrop_lab.tasks import get_task
from rdrop_lab.tasks.images import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 3.0
BATCH = 128
VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline (plain step)": None,
    "full R-Drop": {},
    "branch_at='blocks.2'": {"branch_at": "blocks.2"},
    "branch_at='blocks.3'": {"branch_at": "blocks.3"},
    "every_k_steps=2": {"every_k_steps": 2},
    "stop_gradient=True": {"stop_gradient": True},
}


def _step(options: dict[str, Any] | None) -> Callable[[], None]:
    """Two training steps (so that every-2-steps R-Drop is timed over its whole cycle)."""
    torch.manual_seed(0)
    model = VisionTransformer(**get_task("fmnist_vit").model_kwargs).train()
    wrapped = None if options is None else rdrop.RDrop(model, ALPHA, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (BATCH,), generator=g)

    def step() -> None:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            if wrapped is None:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            else:
                loss = wrapped(images, target=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    variants = {name: _step(options) for name, options in VARIANTS.items()}
    timings = side_by_side(variants, "baseline (plain step)", args.reps, min_seconds=0.2)
    rows = [
        {
            "variant": name,
            "seconds_per_step": t.median / 2,
            "ratio": t.ratio,
            "ratio_range": list(t.ratio_range),
        }
        for name, t in timings.items()
    ]
    meta = {
        "command": f"python -m benchmarks.cheap_variants --threads {args.threads} --reps "
        f"{args.reps}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cheap_variants.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Step cost of the cheaper R-Drop variants (Fashion-MNIST ViT, batch 128)",
        "",
        f"Command: `{meta['command']}` ({meta['seconds']} s). {meta['date']}, torch "
        f"{meta['torch']}, {meta['machine']}, {args.threads} thread(s). One training step "
        "(forward, backward, clipping, AdamW), interleaved repetitions, median of the "
        "per-repetition ratios to the plain step (min-max in parentheses).",
        "",
        "| variant | time per step | × plain step |",
        "|---|---:|---:|",
    ]
    for row in rows:
        low, high = row["ratio_range"]
        lines.append(
            f"| {row['variant']} | {1000 * row['seconds_per_step']:.1f} ms | "
            f"{row['ratio']:.2f}× ({low:.2f}-{high:.2f}) |"
        )
    (out / "cheap_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
