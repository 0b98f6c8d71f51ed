"""Step cost of the cheaper R-Drop variants, side by side in one process.

``python -m benchmarks.cheap_variants --threads 1`` times one training step (forward,
backward, gradient clipping, AdamW) of the Fashion-MNIST ViT of the converged suites
(batch 128, the model of ``configs/converged/images.toml``) for the baseline, full R-Drop,
partial-depth R-Drop (``branch_at``), every-2-steps R-Drop and stop-gradient R-Drop;
interleaved repetitions, median of the per-repetition ratios to the plain step. Writes
``results/cheap_variants.md`` and ``.json``. ``--task mrpc`` does the same for the
pretrained MiniLM on 16 real MRPC training pairs (the converged GLUE suites' model and
batch), branching at encoder layers 3 and 5 and at the classifier's dropout, and writes
``results/cheap_variants_mrpc.md``. ``--task multi30k`` times the Multi30k translation
Transformer of the translation suites on 64 real training pairs (label smoothing 0.1,
padding ignored), branching at the decoder (the encoder runs once) and at its second and
third layers, and writes ``results/cheap_variants_multi30k.md``. ``--task shakespeare``
times the tinyshakespeare character model of ``configs/converged/language_model.toml`` (16
blocks of 64 characters), branching at its second and third (last) layers, and writes
``results/cheap_variants_shakespeare.md``. ``--precision bf16``
times every step as the lab's bf16 runs train (``rdrop_lab.precision``: bfloat16 autocast,
the output layer in float32; GLUE only) and adds ``_bf16`` to the file name.
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
from rdrop_lab.config import PRECISIONS
from rdrop_lab.methods.base import plain_task_loss
from rdrop_lab.precision import keep_float32, precision_context
from rdrop_lab.tasks import default_data_dir, get_task
from rdrop_lab.tasks.images import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent


def _variants(branch_points: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    """The plain step (``None``), full R-Drop, R-Drop branched at each of ``branch_points``
    (label -> module name), every 2 steps and with stop-gradient: name -> RDrop options."""
    return {
        "baseline (plain step)": None,
        "full R-Drop": {},
        **{label: {"branch_at": module} for label, module in branch_points.items()},
        "every_k_steps=2": {"every_k_steps": 2},
        "stop_gradient=True": {"stop_gradient": True},
    }


#: Per task: the title of the results file, the alpha, the variants and the file name.
TASKS: dict[str, dict[str, Any]] = {
    "fmnist_vit": {
        "title": "Fashion-MNIST ViT, batch 128",
        "alpha": 3.0,
        "file": "cheap_variants",
        "variants": _variants(
            {"branch_at='blocks.2'": "blocks.2", "branch_at='blocks.3'": "blocks.3"}
        ),
    },
    "mrpc": {
        "title": "pretrained MiniLM on MRPC, batch 16",
        "alpha": 1.0,
        "file": "cheap_variants_mrpc",
        "variants": _variants(
            {
                "branch_at='bert.encoder.layer.3'": "bert.encoder.layer.3",
                "branch_at='bert.encoder.layer.5'": "bert.encoder.layer.5",
                "branch_at='dropout' (head only)": "dropout",
            }
        ),
    },
    "shakespeare": {
        "title": "tinyshakespeare character Transformer LM, batch 16 x 64 characters",
        "alpha": 3.0,
        "file": "cheap_variants_shakespeare",
        "variants": _variants(
            {
                "branch_at='blocks.layers.1' (upper 2 of 3 layers)": "blocks.layers.1",
                "branch_at='blocks.layers.2' (last layer)": "blocks.layers.2",
            }
        ),
    },
    "multi30k": {
        "title": "Multi30k translation Transformer, batch 64",
        "alpha": 5.0,
        "file": "cheap_variants_multi30k",
        "variants": _variants(
            {
                "branch_at='transformer.decoder' (decoder only)": "transformer.decoder",
                "branch_at='transformer.decoder.layers.1'": "transformer.decoder.layers.1",
                "branch_at='transformer.decoder.layers.2'": "transformer.decoder.layers.2",
            }
        ),
    },
}

Inputs = tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


def _model_and_batch(task: str) -> tuple[torch.nn.Module, Inputs, torch.Tensor]:
    """The task's model in training mode, one fixed training batch as the model's
    (positional, keyword) inputs, and its labels."""
    torch.manual_seed(0)
    if task == "fmnist_vit":
        model = VisionTransformer(**get_task("fmnist_vit").model_kwargs)
        g = torch.Generator().manual_seed(1)
        images = torch.randn(128, 1, 28, 28, generator=g)
        return model.train(), ((images,), {}), torch.randint(0, 10, (128,), generator=g)
    text_task = get_task(task)
    # The converged suites' batches; Multi30k's vocabulary is fitted on its 10,000 pairs.
    batch, max_length, train_size = {
        "multi30k": (64, 64, 10_000),
        "shakespeare": (16, 64, 300),
    }.get(task, (16, 128, 16))
    data = text_task.load(default_data_dir(), train_size, 16, 0, max_length=max_length)
    model, collate = text_task.build(dropout=None, max_length=max_length, data=data)
    features, labels = collate(data.train[:batch])
    return model.train(), ((), features), labels


def _step(task: str, options: dict[str, Any] | None, precision: str) -> Callable[[], None]:
    """Two training steps (so that every-2-steps R-Drop is timed over its whole cycle)."""
    model, (args, kwargs), labels = _model_and_batch(task)
    spec = get_task(task)
    if precision == "bf16":  # as the lab's bf16 runs: the output layer stays float32
        if spec.output_module is None:
            raise SystemExit(f"--precision bf16: task {task!r} names no output layer; use fp32")
        keep_float32(model.get_submodule(spec.output_module))
    wrapped = (
        None
        if options is None
        else rdrop.RDrop(
            model,
            TASKS[task]["alpha"],
            ignore_index=spec.ignore_index,
            label_smoothing=spec.label_smoothing,
            **options,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision):
                if wrapped is None:
                    output = rdrop.extract_logits(model(*args, **kwargs))
                    loss = plain_task_loss(output, labels, spec)
                else:
                    loss = wrapped(*args, target=labels, **kwargs).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="fmnist_vit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = TASKS[args.task]
    variants = {
        name: _step(args.task, options, args.precision)
        for name, options in spec["variants"].items()
    }
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
        "command": f"python -m benchmarks.cheap_variants --task {args.task} --threads "
        f"{args.threads} --reps {args.reps}"
        + (f" --precision {args.precision}" if args.precision != "fp32" else ""),
        "precision": args.precision,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = spec["file"] + ("" if args.precision == "fp32" else f"_{args.precision}")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Step cost of the cheaper R-Drop variants ({spec['title']})",
        "",
        f"Command: `{meta['command']}` ({meta['seconds']} s). {meta['date']}, torch "
        f"{meta['torch']}, {meta['machine']}, {args.threads} thread(s), "
        f"{'float32' if args.precision == 'fp32' else 'bfloat16 autocast'}. One training step "
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
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
