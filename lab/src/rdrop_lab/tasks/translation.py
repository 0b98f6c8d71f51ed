"""Multi30k German→English translation with a small Transformer trained from scratch.

Files: ``<data_dir>/multi30k/{train,val,test_2016_flickr}.{de,en}.gz`` (line-aligned,
gzip). The subword tokenizer is a joint German+English BPE (Hugging Face ``tokenizers``)
fitted on the training pairs the run uses, and nothing else. Validation is scored with
greedy decoding (BLEU, and the token loss without label smoothing) to pick checkpoints;
the test split (test_2016_flickr) is decoded once per selected checkpoint with beam
search and scored with detokenized sacreBLEU (its signature is in the record).

The paper's translation setting: label smoothing 0.1 on the task loss, alpha = 5.
"""

from __future__ import annotations

import functools
import gzip
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rdrop_lab.models import Seq2SeqTransformer, count_parameters
from rdrop_lab.tasks.base import Collator, DataError, Example, Task, TaskData

__all__ = [
    "Multi30kTranslation",
    "SpecialTokens",
    "TranslationCollator",
    "read_parallel",
    "train_bpe",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


class SpecialTokens:
    pad, bos, eos, unk = 0, 1, 2, 3


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error}); truncated or corrupt file?") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no lines (empty or truncated file)")
    return lines


def read_parallel(
    folder: Path, split: str, source: str = "de", target: str = "en"
) -> list[Example]:
    """Line-aligned sentence pairs of ``split``; an error names the files if they disagree."""
    src_path, tgt_path = folder / f"{split}.{source}.gz", folder / f"{split}.{target}.gz"
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: the files must be "
            "line-aligned (truncated or corrupt file?)"
        )
    for number, (s, t) in enumerate(zip(src, tgt, strict=True), start=1):
        if not s.strip() or not t.strip():
            raise DataError(f"{src_path} / {tgt_path}:{number}: empty sentence")
    return [Example((s.strip(), t.strip()), 0) for s, t in zip(src, tgt, strict=True)]


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """A BPE tokenizer (``tokenizers``) fitted on ``texts``; ids 0-3 are pad/bos/eos/unk.

    NFKC-normalised, split on whitespace with the ``▁`` marker (Metaspace), so decoding
    gives back detokenized text.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError as error:  # pragma: no cover - tokenizers comes with transformers
        raise ImportError(
            "the translation task needs `tokenizers`: pip install tokenizers"
        ) from error
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token, expected in ((PAD, 0), (BOS, 1), (EOS, 2), (UNK, 3)):
        assert tokenizer.token_to_id(token) == expected
    return tokenizer


@functools.lru_cache(maxsize=4)
def _load_cached(
    data_dir: Path,
    train_size: int | None,
    validation_size: int | None,
    data_seed: int,
    test_size: int | None,
    vocab_size: int,
) -> TaskData:
    folder = data_dir / "multi30k"
    train_all = read_parallel(folder, "train")
    validation = read_parallel(folder, "val")
    test = read_parallel(folder, "test_2016_flickr")
    train = train_all[:]
    random.Random(data_seed + 1).shuffle(train)
    if train_size is not None:
        train = train[:train_size]
    if validation_size is not None and validation_size < len(validation):
        validation = random.Random(data_seed + 2).sample(validation, validation_size)
    test_split = "test_2016_flickr"
    if test_size is not None and test_size < len(test):
        test = random.Random(data_seed + 3).sample(test, test_size)
        test_split += f", subsampled to {test_size}"
    tokenizer = train_bpe([t for e in train for t in e.texts], vocab_size)
    info: dict[str, Any] = {
        "train_examples": len(train),
        "train_available": len(train_all),
        "validation_examples": len(validation),
        "test_examples": len(test),
        "test_split": test_split,
        "validation_split": "val",
        "tokenizer": f"joint de+en BPE ({tokenizer.get_vocab_size()} tokens, tokenizers), "
        "fitted on the run's training pairs",
        "bleu_signature": _bleu_signature(),
    }
    return TaskData(train, validation, test, info, resources={"tokenizer": tokenizer})


def _bleu() -> Any:
    try:
        import sacrebleu
    except ImportError as error:
        raise ImportError(
            "the translation task needs sacrebleu: pip install 'torch-rdrop[experiments]'"
        ) from error
    return sacrebleu.BLEU()


def _bleu_signature() -> str:
    """sacreBLEU's signature for the settings :meth:`Multi30kTranslation.evaluate` uses
    (one reference per sentence; sacreBLEU only knows ``nrefs`` after a scoring)."""
    bleu = _bleu()
    bleu.corpus_score(["a"], [["a"]])
    return str(bleu.get_signature())


class Multi30kTranslation(Task):
    """Multi30k de→en; BLEU on the test split with beam search, greedy on validation.

    The default model is sized for 2 CPU cores: a pre-norm Transformer with 3 encoder and
    3 decoder layers, d_model 128, 4 heads, feed-forward 512, dropout 0.3 (the paper's
    IWSLT dropout), a 4,000-token joint BPE, tied embeddings: 1.9M parameters, about
    0.5 s per baseline step of 64 sentence pairs on one thread. The default run trains on
    10,000 of the 29,000 training pairs for 4 epochs (628 steps), so that dropout's
    regularisation matters within a CPU budget.
    """

    name = "multi30k"
    display_name = "Multi30k De→En"
    kind = "sequence"
    metrics = ("bleu", "loss")
    primary_metric = "bleu"
    higher_is_better = True
    paper_alpha = 5.0
    label_smoothing = 0.1
    #: Settings this task trains with unless the run overrides them (a small model from
    #: scratch needs a far larger learning rate than fine-tuning).
    run_defaults: ClassVar[Mapping[str, Any]] = {
        "lr": 1e-3,
        "batch_size": 64,
        "eval_batch_size": 100,
        "epochs": 4.0,
        "train_size": 10_000,
        "validation_size": 300,
        "max_length": 64,
        "weight_decay": 1e-4,
        "warmup_ratio": 0.05,
        "evals_per_epoch": 2,
    }

    def __init__(
        self,
        *,
        vocab_size: int = 4000,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 3,
        dim_feedforward: int = 512,
        dropout: float = 0.3,
        beam_size: int = 4,
    ) -> None:
        self.vocab_size, self.beam_size = vocab_size, beam_size
        self.model_kwargs = {
            "d_model": d_model,
            "nhead": nhead,
            "num_layers": num_layers,
            "dim_feedforward": dim_feedforward,
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
        data = _load_cached(
            Path(data_dir), train_size, validation_size, data_seed, test_size, self.vocab_size
        )
        return data.with_own_info()  # the splits are cached and shared between loads

    def build(
        self, *, dropout: float | None, max_length: int, data: TaskData | None = None
    ) -> tuple[nn.Module, Collator]:
        if data is None or "tokenizer" not in data.resources:
            raise ValueError(f"task {self.name!r} builds its model from the loaded data (data=)")
        tokenizer = data.resources["tokenizer"]
        kwargs = dict(self.model_kwargs)
        if dropout is not None:
            kwargs["dropout"] = dropout
        model = Seq2SeqTransformer(
            tokenizer.get_vocab_size(),
            pad_id=SpecialTokens.pad,
            max_positions=max(256, max_length + 2),
            **kwargs,
        )
        data.info["parameters"] = count_parameters(model)
        return model, TranslationCollator(tokenizer, max_length, self.ignore_index)

    def evaluation_order(self, examples: Sequence[Example], collate: Collator) -> list[int]:
        """Shortest source first, in subword tokens: each batch pads less and decodes for
        fewer steps. BLEU and the summed NLL do not depend on the order, up to float
        rounding: a sentence decoded in a batch of different padding can differ in its
        logits by about 1e-6, enough to flip a near-tie between two tokens."""
        lengths = _translation_collator(collate).source_lengths(examples)
        return sorted(range(len(examples)), key=lengths.__getitem__)

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
        """BLEU (greedy on validation, beam search when ``final``) and the token NLL."""
        from rdrop_lab.decoding import beam_search, greedy_decode

        if not isinstance(model, Seq2SeqTransformer):
            raise TypeError(f"expected a Seq2SeqTransformer, got {type(model).__name__}")
        collate = _translation_collator(collate)
        tokenizer = collate.tokenizer
        examples = [examples[i] for i in self.evaluation_order(examples, collate)]
        was_training = model.training
        model.eval()
        hypotheses: list[str] = []
        nll, tokens = 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            inputs, target = collate(batch)
            logits = model(**inputs)
            keep = target != self.ignore_index
            nll += float(nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            tokens += int(keep.sum())
            if final:
                ids = beam_search(
                    model,
                    inputs["src_ids"],
                    bos_id=SpecialTokens.bos,
                    eos_id=SpecialTokens.eos,
                    beam_size=self.beam_size,
                )
            else:
                ids = greedy_decode(
                    model, inputs["src_ids"], bos_id=SpecialTokens.bos, eos_id=SpecialTokens.eos
                )
            hypotheses += tokenizer.decode_batch(ids)
        model.train(was_training)
        references = [e.texts[1] for e in examples]
        bleu = _bleu().corpus_score(hypotheses, [references]).score
        return {"bleu": float(bleu), "loss": nll / max(tokens, 1)}


class TranslationCollator:
    """Examples -> ``({"src_ids", "tgt_ids"}, target)``: source + EOS, BOS + target as the
    decoder input, target + EOS as labels (padding: ``pad`` in inputs, ``ignore_index`` in
    labels). Sentences are cut to ``max_length`` subword tokens."""

    def __init__(self, tokenizer: Any, max_length: int, ignore_index: int) -> None:
        self.tokenizer, self.max_length, self.ignore_index = tokenizer, max_length, ignore_index

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids[: self.max_length] for e in self.tokenizer.encode_batch(texts)]

    def source_lengths(self, examples: Sequence[Example]) -> list[int]:
        """The number of subword tokens of each source sentence, as cut to ``max_length``."""
        return [len(ids) for ids in self._encode([e.texts[0] for e in examples])]

    def __call__(self, batch: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        sources = self._encode([e.texts[0] for e in batch])
        targets = self._encode([e.texts[1] for e in batch])
        src = _pad([[*s, SpecialTokens.eos] for s in sources], SpecialTokens.pad)
        tgt_in = _pad([[SpecialTokens.bos, *t] for t in targets], SpecialTokens.pad)
        target = _pad([[*t, SpecialTokens.eos] for t in targets], self.ignore_index)
        return {"src_ids": src, "tgt_ids": tgt_in}, target


def _translation_collator(collate: Collator) -> TranslationCollator:
    if not isinstance(collate, TranslationCollator):
        raise TypeError(f"expected the task's TranslationCollator, got {type(collate).__name__}")
    return collate


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


TRANSLATION_TASKS: dict[str, Task] = {"multi30k": Multi30kTranslation()}
