"""Character-level language modelling on tinyshakespeare with a small causal Transformer.

File: ``<data_dir>/tinyshakespeare/input.txt`` (1,115,394 characters). The text is split by
position: the first 90 % trains, the next 5 % validates (checkpoint selection), the last
5 % is the held-out test split, scored once per selected checkpoint. Each split is cut into
non-overlapping blocks of ``max_length + 1`` characters (an example: the model reads
``max_length`` characters and predicts each next one). The character vocabulary is taken
from the training split only; characters unseen in training map to ``<unk>``.

Metric: perplexity per character, ``exp(mean NLL)`` over every predicted character of the
split (lower is better), and bits per character.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rdrop_lab.models import CausalTransformerLM, count_parameters
from rdrop_lab.tasks.base import Collator, DataError, Example, Task, TaskData

__all__ = ["CharCollator", "CharVocabulary", "TinyShakespeare", "split_text"]

SPLITS = (0.9, 0.05, 0.05)


def split_text(text: str, fractions: tuple[float, float, float] = SPLITS) -> tuple[str, str, str]:
    """Train / validation / test by position (first 90 %, next 5 %, last 5 %)."""
    first = int(len(text) * fractions[0])
    second = first + int(len(text) * fractions[1])
    return text[:first], text[first:second], text[second:]


class CharVocabulary:
    """Characters of a training text; id 0 is ``<unk>`` for characters it never saw."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]


class CharCollator:
    """Blocks of ``max_length + 1`` characters -> ``({"input_ids"}, next-character ids)``."""

    def __init__(self, vocabulary: CharVocabulary) -> None:
        self.vocabulary = vocabulary

    def __call__(self, batch: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        lengths = {len(e.texts[0]) for e in batch}
        if len(lengths) != 1:
            raise ValueError(f"language-model blocks must have one length, got {sorted(lengths)}")
        ids = torch.tensor([self.vocabulary.encode(e.texts[0]) for e in batch], dtype=torch.long)
        return {"input_ids": ids[:, :-1]}, ids[:, 1:]


def _blocks(text: str, size: int) -> list[Example]:
    return [Example((text[i : i + size],), 0) for i in range(0, len(text) - size + 1, size)]


@functools.lru_cache(maxsize=4)
def _load_cached(
    data_dir: Path,
    train_size: int | None,
    validation_size: int | None,
    data_seed: int,
    test_size: int | None,
    block: int,
) -> TaskData:
    path = data_dir / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); corrupt file?") from None
    train_text, validation_text, test_text = split_text(text)
    if min(len(validation_text), len(test_text)) < block + 1:
        raise DataError(
            f"{path}: {len(text)} characters is too short for blocks of {block + 1} characters "
            "in each split (truncated file?)"
        )
    train_all = _blocks(train_text, block + 1)
    train = train_all[:]
    random.Random(data_seed + 1).shuffle(train)
    if train_size is not None:
        train = train[:train_size]
    validation, test = _blocks(validation_text, block + 1), _blocks(test_text, block + 1)
    if validation_size is not None and validation_size < len(validation):
        validation = random.Random(data_seed + 2).sample(validation, validation_size)
    test_split = f"last 5% of input.txt ({len(test_text)} characters)"
    if test_size is not None and test_size < len(test):
        test = random.Random(data_seed + 3).sample(test, test_size)
        test_split += f", subsampled to {test_size} blocks"
    vocabulary = CharVocabulary(train_text)
    info: dict[str, Any] = {
        "train_examples": len(train),
        "train_available": len(train_all),
        "validation_examples": len(validation),
        "test_examples": len(test),
        "test_split": test_split,
        "validation_split": "characters 90-95% of input.txt",
        "tokenizer": f"characters ({len(vocabulary)} ids incl. <unk>), from the training split",
        "block_characters": block,
    }
    return TaskData(train, validation, test, info, resources={"vocabulary": vocabulary})


class TinyShakespeare(Task):
    """Character-level LM; perplexity per character on the last 5 % of the text.

    The default model is sized for 2 CPU cores: a pre-norm causal Transformer with 3 layers,
    d_model 128, 4 heads, dropout 0.2, learned positions, tied embeddings. The default run
    trains on 2,000 blocks of 129 characters (a quarter of the training split) for 5 epochs,
    so that dropout's regularisation matters within a CPU budget.
    """

    name = "shakespeare"
    display_name = "tinyshakespeare (char LM)"
    kind = "sequence"
    metrics = ("perplexity", "bits_per_char")
    primary_metric = "perplexity"
    higher_is_better = False
    paper_alpha = 1.0
    run_defaults: ClassVar[Mapping[str, Any]] = {
        "lr": 1e-3,
        "batch_size": 32,
        "eval_batch_size": 64,
        "epochs": 5.0,
        "train_size": 2000,
        "validation_size": 200,
        "max_length": 128,
        "weight_decay": 0.1,
        "warmup_ratio": 0.05,
        "evals_per_epoch": 4,
    }

    def __init__(
        self, *, d_model: int = 128, nhead: int = 4, num_layers: int = 3, dropout: float = 0.2
    ) -> None:
        self.model_kwargs = {
            "d_model": d_model,
            "nhead": nhead,
            "num_layers": num_layers,
            "dropout": dropout,
        }

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
        block = max_length or self.run_defaults["max_length"]
        data = _load_cached(
            Path(data_dir), train_size, validation_size, data_seed, test_size, block
        )
        return data.with_own_info()  # the splits are cached and shared between loads

    def build(
        self, *, dropout: float | None, max_length: int, data: TaskData | None = None
    ) -> tuple[nn.Module, Collator]:
        if data is None or "vocabulary" not in data.resources:
            raise ValueError(f"task {self.name!r} builds its model from the loaded data (data=)")
        block = data.info["block_characters"]
        if max_length != block:
            raise ValueError(
                f"max_length={max_length} must equal the block length the data were cut "
                f"into ({block}); load the task with max_length={max_length}"
            )
        vocabulary = data.resources["vocabulary"]
        kwargs = dict(self.model_kwargs)
        if dropout is not None:
            kwargs["dropout"] = dropout
        model = CausalTransformerLM(len(vocabulary), max_positions=max_length, **kwargs)
        data.info["parameters"] = count_parameters(model)
        return model, CharCollator(vocabulary)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        collate: Collator,
        batch_size: int,
        *,
        final: bool = False,
    ) -> dict[str, float]:
        """Perplexity and bits per character over every predicted character."""
        was_training = model.training
        model.eval()
        nll, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            inputs, target = collate(examples[start : start + batch_size])
            logits = model(**inputs)
            nll += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            count += target.numel()
        model.train(was_training)
        mean = nll / max(count, 1)
        return {"perplexity": math.exp(mean), "bits_per_char": mean / math.log(2)}


LM_TASKS: dict[str, Task] = {"shakespeare": TinyShakespeare()}
