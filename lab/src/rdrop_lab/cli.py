"""The ``rdrop`` command: run, resume and report R-Drop experiments.

    rdrop demo                    # baseline vs R-Drop to convergence (14 min of training)
    rdrop run sst2 --method rdrop --alpha 1.0 --seeds 0 1 2
    rdrop run sst2 --method rdrop --every-k-steps 5         # an ablation of the paper
    rdrop run sst2 --method baseline mixup fgm --shots-per-class 16 --data-seeds 0 1 2
    rdrop sweep configs/glue.toml                # a suite file (TOML or YAML)
    rdrop sweep configs/glue.toml --methods rdrop --seeds 1  # a chunk of it
    rdrop report runs/glue                       # Markdown report + PNG plots
    rdrop probe mrpc                             # dropout-consistency diagnostic

Every finished run is saved at once; re-running a command skips finished runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rdrop_lab.config import (
    METHOD_FIELDS,
    PRECISIONS,
    ConfigError,
    RunConfig,
    expand_runs,
    load_suite,
)
from rdrop_lab.methods import METHODS, method_specs
from rdrop_lab.resume import default_resume_dir
from rdrop_lab.store import ResultStore
from rdrop_lab.tasks import TASKS, DataError, default_data_dir, get_task

__all__ = ["main", "DEMO_RUNS"]


#: The demo's converged comparison: the tinyshakespeare character model on 300 blocks of
#: 64 characters (19,200 characters), trained until validation perplexity stops improving
#: for 8 epochs. Chosen on validation by a pilot (seed 0; results/pilots/language_model):
#: the baseline's validation perplexity bottomed out at epoch 56 and rose after it, R-Drop's
#: kept falling until epoch 65. alpha = 1, the task's default, is the only alpha the pilot
#: tried.
_DEMO_LM: dict[str, Any] = {
    "train_size": 300,
    "validation_size": 100,
    "test_size": 300,
    "max_length": 64,
    "batch_size": 16,
    "epochs": 20.0,
    "max_epochs": 200.0,
    "patience": 8,
    "evals_per_epoch": 1,
}
_DEMO_LM_QUICK = {**_DEMO_LM, "train_size": 48, "max_epochs": 4.0, "patience": 2, "epochs": 2.0}

#: ``rdrop demo --minilm``: the pretrained MiniLM on 320 SST-2 sentences, two epochs.
_DEMO_MINILM: dict[str, Any] = {
    "epochs": 2.0,
    "train_size": 320,
    "validation_size": 300,
    "batch_size": 16,
    "evals_per_epoch": 2,
}
_DEMO_MINILM_QUICK = {**_DEMO_MINILM, "epochs": 1.0, "train_size": 64, "validation_size": 64}


def _demo_runs(seeds: Sequence[int], quick: bool, minilm: bool = False) -> list[RunConfig]:
    """The demo's runs: baseline and R-Drop per seed (seed by seed, so each finished seed
    pairs up)."""
    if minilm:
        task, alpha = "sst2", 1.0
        settings = _DEMO_MINILM_QUICK if quick else _DEMO_MINILM
    else:
        task, alpha = "shakespeare", 1.0
        settings = _DEMO_LM_QUICK if quick else _DEMO_LM
    # The task's own defaults (learning rate, weight decay, ...) under the demo's settings,
    # as for `rdrop run` and suite files.
    settings = {**get_task(task).run_defaults, **settings}
    runs = []
    for seed in seeds:
        runs.append(RunConfig(task, "rdrop", alpha=alpha, seed=seed, paper_alpha=1.0, **settings))
        runs.append(RunConfig(task, "baseline", seed=seed, paper_alpha=1.0, **settings))
    return runs


DEMO_RUNS = _demo_runs((0, 1), quick=False)


def _command_line(argv: Sequence[str]) -> str:
    return "rdrop " + " ".join(shlex.quote(a) for a in argv)


def _data_dir(args: argparse.Namespace) -> Path:
    path = Path(args.data_dir) if args.data_dir else default_data_dir()
    if not path.is_dir():
        raise DataError(f"--data-dir {path} is not a folder (see ../shared/data/README.md)")
    return path


def _threads(count: int | None = None) -> None:
    import torch

    if count is not None and count < 1:
        raise ValueError(f"--threads must be >= 1, got {count}")
    torch.set_num_threads(count or max(1, os.cpu_count() or 1))


def _note_clock(runs: Sequence[RunConfig]) -> None:
    """Say when runs that compare methods by training time use more than one thread: the
    training clock (process CPU time) sums the threads, and threads that wait for each
    other spin, so other processes on the machine can then move it."""
    import torch

    timed = [r for r in runs if r.converges or r.equal_time]
    threads = torch.get_num_threads()
    if timed and threads > 1:
        print(
            f"note: {len(timed)} run(s) compare methods by training time, measured as process "
            f"CPU time over {threads} torch threads; with more than one thread, other processes "
            "on the machine can move that clock. Use --threads 1 for time budgets that do not "
            "depend on the machine's load.",
            file=sys.stderr,
        )


def _finish(results_dir: Path, out: Any) -> None:
    from rdrop_lab.report import load_records, summary_table, write_report

    records = load_records(results_dir)
    if not records:
        print(f"no finished runs in {results_dir}", file=out)
        return
    print(summary_table(records), file=out)
    report = write_report(results_dir)
    print(f"\nreport: {report}", file=out)


_RUN_OPTIONS = (
    "epochs",
    "train_size",
    "validation_size",
    "batch_size",
    "lr",
    "dropout",
    "max_length",
    "evals_per_epoch",
    "shots_per_class",
    "every_k_steps",
    "num_passes",
    "dropout_rates",
    "label_smoothing",
    "mixup_alpha",
    "manifold_mixup_alpha",
    "fgm_epsilon",
    "unlabeled_size",
    "branch_at",
    "patience",
    "max_epochs",
    "min_steps",
    "min_delta",
    "precision",
)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    task = get_task(args.task)
    overrides: dict[str, Any] = dict(task.run_defaults)
    for key in _RUN_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.stop_gradient:
        overrides["stop_gradient"] = True
    if args.train_size_all:
        overrides["train_size"] = None
    if args.alpha and not any(METHODS[m].uses_alpha for m in args.method):
        raise ConfigError(
            f"--alpha is only used by the R-Drop methods; --method {' '.join(args.method)} "
            "ignores it"
        )
    for key in sorted(set(overrides) & METHOD_FIELDS):
        if not any(key in METHODS[m].fields for m in args.method):
            users = sorted(m for m, method in METHODS.items() if key in method.fields)
            raise ConfigError(
                f"{_flag(key)} is an option of {', '.join(users)}; "
                f"--method {' '.join(args.method)} does not read it"
            )
    needs_alpha = [m for m in args.method if METHODS[m].uses_alpha]
    if needs_alpha and not args.alpha and task.paper_alpha is None:
        raise ConfigError(
            f"task {task.name!r} has no paper alpha; give one with --alpha "
            f"(method {needs_alpha[0]!r} needs it)"
        )
    runs = expand_runs(
        task.name,
        args.method,
        specs=method_specs(),
        seeds=args.seeds,
        alphas=args.alpha or ["paper"],
        paper_alpha=task.paper_alpha,
        options=overrides,
        data_seeds=args.data_seeds or [None],
        method_first=True,
    )
    return _execute(runs, args, argv)


def _execute(runs: list[RunConfig], args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rdrop_lab.runner import check_run, run_suite

    for run in runs:
        check_run(run)
    _threads(args.threads)
    _note_clock(runs)
    results_dir = Path(args.results_dir)
    store = ResultStore(results_dir)
    checkpoints = results_dir / "checkpoints" if args.save_checkpoints else None
    resume_dir = Path(args.resume_dir) if args.resume_dir else default_resume_dir()
    print(
        f"{len(runs)} run(s); results in {results_dir}; resumable checkpoints every "
        f"{args.checkpoint_every:g} s in {resume_dir}",
        file=sys.stderr,
    )
    run_suite(
        runs,
        store,
        data_dir=_data_dir(args),
        command=_command_line(argv),
        checkpoint_dir=checkpoints,
        resume_dir=resume_dir,
        checkpoint_every=args.checkpoint_every,
    )
    _finish(results_dir, sys.stdout)
    return 0


#: ``rdrop sweep`` flags that run part of a suite (a chunk): flag, the run field it
#: selects on, the flag's value type and its help text.
_CHUNK_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--tasks", "task", str, "run only these tasks of the suite (a chunk)"),
    (
        "--methods",
        "method",
        str,
        "run only the runs of these methods, e.g. rdrop: every alpha and variant of it (a chunk)",
    ),
    (
        "--shots-per-class",
        "shots_per_class",
        int,
        "run only the few-shot runs with these sizes (a chunk)",
    ),
    (
        "--seeds",
        "seed",
        int,
        "run only the runs with these training seeds (a chunk: whole seeds pair up)",
    ),
    ("--data-seeds", "data_seed", int, "run only the runs with these data draws (a chunk)"),
)


def _chunk(runs: list[RunConfig], args: argparse.Namespace) -> list[RunConfig]:
    """The runs that every chunk flag given in ``args`` selects (all runs when none is)."""
    for flag, field, _, _ in _CHUNK_FLAGS:
        wanted = getattr(args, field)
        if not wanted:
            continue
        present = {getattr(r, field) for r in runs}
        unknown = sorted(set(wanted) - present, key=str)
        if unknown:
            known = sorted(present, key=str)
            raise ConfigError(f"{flag}: {unknown} not in the suite (it has {known})")
        runs = [r for r in runs if getattr(r, field) in wanted]
    return runs


def cmd_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    suite = load_suite(
        Path(args.config),
        known_tasks={name: task.paper_alpha for name, task in TASKS.items()},
        known_methods=method_specs(),
        task_defaults={name: task.run_defaults for name, task in TASKS.items()},
    )
    if args.results_dir is None:
        args.results_dir = str(Path("runs") / suite.name)
    runs = _chunk(list(suite.runs), args)
    if args.dry_run:
        from rdrop_lab.runner import check_run

        store = ResultStore(Path(args.results_dir))
        finished = 0
        for run in runs:
            check_run(run)
            print(run.run_id())
            finished += store.has(run.run_id())
        print(
            f"{len(runs)} run(s); {finished} already finished in {args.results_dir} "
            f"(skipped when run), {len(runs) - finished} to run",
            file=sys.stderr,
        )
        return 0
    return _execute(runs, args, argv)


def cmd_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rdrop_lab.report import write_report

    results_dir = Path(args.results_dir)
    if not (results_dir / "runs").is_dir():
        raise ConfigError(f"{results_dir} holds no runs/ folder: nothing to report")
    path = write_report(results_dir, Path(args.out) if args.out else None)
    print(path)
    return 0


def cmd_verdict(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rdrop_lab.report import converged_verdict_table, load_records

    record_sets = []
    for folder in args.results_dirs:
        if not (Path(folder) / "runs").is_dir():
            raise ConfigError(f"{folder} holds no runs/ folder")
        record_sets.append(load_records(folder))
    # One folder's runs are never paired with another's; each row names its folder.
    names = [Path(folder).name for folder in args.results_dirs]
    print(converged_verdict_table(*record_sets, sources=names if len(names) > 1 else None))
    return 0


def cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    runs = _demo_runs(args.seeds, args.quick, args.minilm)
    if args.results_dir is None:
        # Their own folders: a report pairs runs by seed, and runs of another budget must
        # never be paired with these.
        stem = "runs/demo_minilm" if args.minilm else "runs/demo"
        args.results_dir = stem + ("_quick" if args.quick else "")
    first = runs[0]
    if args.minilm:
        text = (
            "fine-tune the pretrained MiniLM encoder on SST-2 (real data, "
            f"{first.train_size} training sentences, {first.epochs:g} epochs), baseline vs "
            "R-Drop (alpha = 1.0); validation picks the checkpoint, the labelled SST-2 test "
            "set (1,821 sentences) scores it."
        )
    else:
        text = (
            "train a character-level Transformer on tinyshakespeare (real data, "
            f"{first.train_size} blocks of {first.max_length} characters) until validation "
            f"perplexity has not improved for {first.patience} epochs, baseline vs R-Drop "
            "(alpha = 1.0); the best validation checkpoint is scored on held-out test text, "
            "and the report shows what each method would have selected at any training time."
        )
    print(f"rdrop demo: {text} Seeds {list(args.seeds)}.", file=sys.stderr)
    return _execute(runs, args, argv)


def _load_probe_checkpoint(model: Any, path: Path) -> None:
    """Load ``--checkpoint`` into ``model`` (safetensors only), with an error naming the
    file for anything that is not a complete, finite checkpoint of this task's model."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file")
    try:
        load_model(model, str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(
            f"--checkpoint {path}: not a readable safetensors file ({error}); give a file "
            "written by --save-checkpoints"
        ) from None
    except RuntimeError as error:  # missing or unexpected keys, wrong shapes
        first = str(error).strip().splitlines()[0][:300]
        raise ConfigError(
            f"--checkpoint {path}: does not fit this task's model ({first}); was it saved "
            "for another task or model size?"
        ) from None
    bad = [name for name, p in model.state_dict().items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ConfigError(
            f"--checkpoint {path}: {len(bad)} tensor(s) hold NaN or infinite values "
            f"(first: {bad[0]}); the run that saved it diverged"
        )


def cmd_probe(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    import rdrop

    _threads()
    if args.batches < 1 or args.batch_size < 1:
        raise ConfigError("--batches and --batch-size must be >= 1")
    task = get_task(args.task)
    # Tasks whose vocabulary is fitted on the training split (translation, the LM) must see
    # the same training examples as the checkpoint's run, or the token ids mean other
    # things: the defaults are those of the task's default run.
    train_size = args.train_size if args.train_size else task.run_defaults.get("train_size")
    max_length = args.max_length or task.run_defaults.get("max_length", 128)
    data = task.load(_data_dir(args), train_size, None, args.data_seed, max_length=max_length)
    torch.manual_seed(args.seed)
    model, collate = task.build(dropout=args.dropout, max_length=max_length, data=data)
    if args.checkpoint:
        _load_probe_checkpoint(model, Path(args.checkpoint))
    kind = task.consistency_kind
    values = []
    for i in range(args.batches):
        inputs, target = collate(data.train[i * args.batch_size : (i + 1) * args.batch_size])
        mask = task.probe_mask(target)
        values.append(rdrop.dropout_consistency(model, **inputs, consistency_mask=mask, kind=kind))
    mean = sum(v.consistency for v in values) / len(values)
    source = f"checkpoint {args.checkpoint}" if args.checkpoint else "freshly built (no training)"
    print(f"task {task.display_name}, model {source}")
    print(f"active dropout modules: {len(values[0].dropout_modules)}")
    print(
        f"consistency ({kind}) between two dropout passes: {mean:.6f} "
        f"(mean over {args.batches} batches of {args.batch_size})"
    )
    if not values[0].dropout_modules or mean == 0:
        print("no active dropout: R-Drop would do nothing for this model")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdrop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    def common(p: argparse.ArgumentParser, default: str | None, shown: str) -> None:
        p.add_argument(
            "--results-dir", default=default, help=f"where run records go (default: {shown})"
        )
        p.add_argument(
            "--data-dir",
            default=None,
            help="folder holding glue/, multi30k/, tinyshakespeare/ and optionally "
            "fashion-mnist/ (default: $RDROP_DATA_DIR or ../shared/data; Fashion-MNIST "
            "also from $RDROP_FASHION_MNIST_DIR or the Debian package)",
        )
        p.add_argument(
            "--save-checkpoints",
            action="store_true",
            help="save each run's selected model (safetensors)",
        )
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch threads (default: all CPU cores; training-time budgets do not depend "
            "on the machine's load only at 1)",
        )
        p.add_argument(
            "--checkpoint-every",
            type=float,
            default=600.0,
            metavar="SECONDS",
            help="write a resumable checkpoint of the run in progress this often (default "
            "600; 0: after every step); the same command resumes a killed run",
        )
        p.add_argument(
            "--resume-dir",
            default=None,
            help="folder for the resumable checkpoints (default: $RDROP_RESUME_DIR or "
            "~/.cache/rdrop/resume; deleted per run once its record is written)",
        )

    demo = sub.add_parser(
        "demo",
        help="baseline vs R-Drop trained to convergence on real data (14 minutes of "
        "training CPU time)",
    )
    common(demo, None, "runs/demo (runs/demo_minilm with --minilm; _quick with --quick)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    demo.add_argument(
        "--quick", action="store_true", help="a tiny budget (smoke test, about a minute)"
    )
    demo.add_argument(
        "--minilm",
        action="store_true",
        help="the pretrained-MiniLM demo instead: SST-2 at a two-epoch budget",
    )
    demo.set_defaults(handler=cmd_demo)

    run = sub.add_parser("run", help="run one task with one or more methods, alphas and seeds")
    run.add_argument("task", choices=sorted(TASKS))
    run.add_argument("--method", nargs="+", default=["rdrop"], choices=sorted(METHODS))
    run.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=None,
        help="R-Drop alpha(s) (default: the paper's for the task)",
    )
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--epochs", type=float)
    run.add_argument("--train-size", type=int)
    run.add_argument("--train-size-all", action="store_true", help="use the whole training set")
    run.add_argument("--validation-size", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--lr", type=float)
    run.add_argument("--dropout", type=float)
    run.add_argument("--max-length", type=int)
    run.add_argument("--evals-per-epoch", type=int)
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32 (default), or bf16: forward and backward under CPU autocast to bfloat16",
    )
    converge = run.add_argument_group("convergence protocol (early stopping on validation)")
    converge.add_argument(
        "--patience",
        type=int,
        help="stop after this many evaluations without a new best validation score",
    )
    converge.add_argument(
        "--max-epochs",
        type=float,
        help="the most epochs a converging run trains (default: --epochs)",
    )
    converge.add_argument(
        "--min-steps", type=int, help="never stop early before this many steps (default 0)"
    )
    converge.add_argument(
        "--min-delta",
        type=float,
        help="the least validation gain that restarts the patience count (default 0: any)",
    )
    run.add_argument(
        "--data-seeds",
        type=int,
        nargs="+",
        default=None,
        help="draws of the training data (few-shot sets, subsamples); default: 0",
    )
    run.add_argument("--shots-per-class", type=int, help="few-shot: k training examples per class")
    ablations = run.add_argument_group("R-Drop ablations (method rdrop)")
    ablations.add_argument(
        "--every-k-steps", type=int, help="the consistency term on every k-th step only"
    )
    ablations.add_argument("--num-passes", type=int, help="m dropout passes (default 2)")
    ablations.add_argument(
        "--dropout-rates",
        type=float,
        nargs="+",
        help="one dropout rate per pass, e.g. 0.1 0.3 (sequential passes)",
    )
    ablations.add_argument(
        "--stop-gradient",
        action="store_true",
        help="passes 2..m without gradient, as the KL target only (not in the paper)",
    )
    ablations.add_argument(
        "--branch-at",
        help="partial-depth R-Drop: the module (dotted name) from which the layers run on "
        "the repeated batch (not in the paper)",
    )
    regularizers = run.add_argument_group("regularizer hyper-parameters")
    regularizers.add_argument(
        "--label-smoothing", type=float, help="label_smoothing methods (default 0.1)"
    )
    regularizers.add_argument(
        "--mixup-alpha", type=float, help="MixUp Beta(a, a) (default 0.2 text, 1.0 images)"
    )
    regularizers.add_argument(
        "--manifold-mixup-alpha", type=float, help="Manifold MixUp Beta(a, a) (default 2.0)"
    )
    regularizers.add_argument("--fgm-epsilon", type=float, help="FGM perturbation norm (1.0)")
    regularizers.add_argument(
        "--unlabeled-size", type=int, help="rdrop_semi: size of the unlabeled pool"
    )
    common(run, "runs/run", "runs/run")
    run.set_defaults(handler=cmd_run)

    sweep = sub.add_parser("sweep", help="run a suite file (TOML/YAML); resumable")
    sweep.add_argument("config")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    for flag, field, kind, text in _CHUNK_FLAGS:
        sweep.add_argument(flag, dest=field, type=kind, nargs="+", default=None, help=text)
    common(sweep, None, "runs/<the suite's name>")
    sweep.set_defaults(handler=cmd_sweep)

    report = sub.add_parser("report", help="write REPORT.md and plots for a results folder")
    report.add_argument("results_dir")
    report.add_argument("--out", default=None)
    report.set_defaults(handler=cmd_report)

    verdict = sub.add_parser(
        "verdict",
        help="one row per task trained to convergence: converged Δ, crossing time, cost",
    )
    verdict.add_argument("results_dirs", nargs="+")
    verdict.set_defaults(handler=cmd_verdict)

    probe = sub.add_parser(
        "probe", help="symmetric KL between two dropout passes of a task's model"
    )
    probe.add_argument("task", choices=sorted(TASKS))
    probe.add_argument(
        "--checkpoint", default=None, help="a .safetensors file saved by --save-checkpoints"
    )
    probe.add_argument("--batches", type=int, default=4)
    probe.add_argument("--batch-size", type=int, default=32)
    probe.add_argument("--dropout", type=float, default=None)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training examples the tokenizer is fitted on, as in the checkpoint's run "
        "(default: the task's run default; matters for multi30k and shakespeare)",
    )
    probe.add_argument(
        "--data-seed", type=int, default=0, help="the checkpoint's run data_seed (default 0)"
    )
    probe.add_argument(
        "--max-length", type=int, default=None, help="default: the task's run default or 128"
    )
    probe.add_argument("--data-dir", default=None)
    probe.set_defaults(handler=cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args, argv))
    except (ConfigError, DataError, ValueError, OSError) as error:
        print(f"rdrop: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nrdrop: interrupted; finished runs are saved, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
