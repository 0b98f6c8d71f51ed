"""Few-shot draws and unlabeled pools: exact counts, determinism, disjointness."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rdrop_lab.config import ConfigError, RunConfig
from rdrop_lab.data_regimes import (
    few_shot_indices,
    pool_indices,
    select_training_data,
    strip_labels,
)
from rdrop_lab.tasks.base import Example
from tests.experiments._toy import ToyRegression, ToyTask, examples

CLASSES = [i % 3 for i in range(60)] + [0] * 15  # 35 / 20 / 20 examples


def test_few_shot_gives_exactly_k_per_class() -> None:
    for k in (1, 4, 16):
        chosen = few_shot_indices(CLASSES, k, data_seed=0)
        assert Counter(CLASSES[i] for i in chosen) == {0: k, 1: k, 2: k}
        assert chosen == sorted(set(chosen))


def test_few_shot_is_deterministic_per_data_seed_and_draws_differ() -> None:
    draws = [few_shot_indices(CLASSES, 4, seed) for seed in range(4)]
    assert draws[0] == few_shot_indices(CLASSES, 4, 0)
    assert len({tuple(d) for d in draws}) == 4


def test_few_shot_refuses_a_class_that_is_too_small() -> None:
    with pytest.raises(ConfigError, match="class 1 has only 20 training examples"):
        few_shot_indices(CLASSES, 21, 0)


def test_pool_is_disjoint_deterministic_and_sized() -> None:
    labelled = few_shot_indices(CLASSES, 4, 0)
    pool = pool_indices(len(CLASSES), labelled, 30, 0)
    assert len(pool) == 30 and not set(pool) & set(labelled)
    assert pool == pool_indices(len(CLASSES), labelled, 30, 0)
    assert pool != pool_indices(len(CLASSES), labelled, 30, 1)
    with pytest.raises(ConfigError, match="unlabeled_size=64: only 63 training examples"):
        pool_indices(len(CLASSES), labelled, 64, 0)


def test_strip_labels_discards_labels() -> None:
    stripped = strip_labels([Example(("a",), 2), Example(("b",), 3.5)])
    assert [e.label for e in stripped] == [0, 0.0] and stripped[0].texts == ("a",)


def test_select_training_data_few_shot_and_pool() -> None:
    task = ToyTask(examples(60))
    config = RunConfig("toy", "rdrop_semi", alpha=1.0, shots_per_class=3, unlabeled_size=20)
    assert config.train_size is None  # the draw replaces train_size
    data, pool = select_training_data(task, Path("."), config)
    assert Counter(e.label for e in data.train) == {0: 3, 1: 3, 2: 3}
    assert len(pool) == 20 and all(e.label == 0 for e in pool)
    labelled_texts = {e.texts for e in data.train}
    assert not labelled_texts & {e.texts for e in pool}
    assert data.info["shots_per_class"] == 3 and data.info["unlabeled_examples"] == 20
    assert data.info["class_counts"] == {"0": 3, "1": 3, "2": 3}
    again, _ = select_training_data(task, Path("."), config)
    assert [e.texts for e in again.train] == [e.texts for e in data.train]


def test_select_training_data_without_regime_is_the_task_subsample() -> None:
    task = ToyTask(examples(30))
    data, pool = select_training_data(task, Path("."), RunConfig("toy", train_size=10))
    assert data.train == task.examples[:10] and pool == []


def test_pool_beside_a_train_size_subsample() -> None:
    task = ToyTask(examples(30))
    config = RunConfig("toy", "rdrop_semi", alpha=1.0, train_size=10, unlabeled_size=15)
    data, pool = select_training_data(task, Path("."), config)
    assert data.train == task.examples[:10]
    assert len(pool) == 15 and not {e.texts for e in pool} & {e.texts for e in data.train}


def test_few_shot_refuses_regression() -> None:
    with pytest.raises(ConfigError, match="few-shot sampling needs classes"):
        select_training_data(
            ToyRegression(examples(30)), Path("."), RunConfig("toy_regression", shots_per_class=2)
        )
