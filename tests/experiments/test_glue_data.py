"""GLUE loaders on the real files, and clear errors on corrupt ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rdrop_lab.tasks import TASKS, DataError, default_data_dir
from rdrop_lab.tasks.glue import GLUE_TASKS

try:
    DATA = default_data_dir()
except DataError:  # pragma: no cover - CI always has ../shared/data
    DATA = None
pytestmark = pytest.mark.skipif(
    DATA is None or not (DATA / "glue").is_dir(), reason="no ../shared/data"
)


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_real_files_load_with_disjoint_held_out_test(name: str) -> None:
    task = TASKS[name]
    data = task.load(DATA, 100, 50, 0)
    assert len(data.train) == 100 and len(data.validation) <= 50 and len(data.test) > 100
    assert data.info["train_available"] > 1000
    labels = {e.label for e in data.train}
    if task.kind == "classification":
        assert labels <= {0, 1} and len(labels) == 2
    else:
        assert all(0.0 <= y <= 5.0 for y in labels)
    if "carved" in data.info["test_split"]:
        # validation and test partition dev.tsv by row (CoLA's dev has a few duplicate texts)
        whole = task.load(DATA, 100, None, 0)
        dev_rows = len(task.load(DATA, 100, None, 0).validation) + len(whole.test)
        assert abs(len(whole.validation) - len(whole.test)) <= 1 and dev_rows > 200
        assert data.test == whole.test
    # the same data_seed gives the same subsample, whatever else happens
    again = task.load(DATA, 100, 50, 0)
    assert again.train == data.train


def _copy_task(tmp_path: Path, folder: str) -> Path:
    root = tmp_path / "glue" / folder
    shutil.copytree(DATA / "glue" / folder, root)
    return root


def test_truncated_row_names_file_and_line(tmp_path: Path) -> None:
    root = _copy_task(tmp_path, "MRPC")
    lines = (root / "train.tsv").read_text(encoding="utf-8-sig").splitlines()
    lines[5] = lines[5].split("\t")[0]
    (root / "train.tsv").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"train.tsv:6: expected at least 5 tab-separated columns"):
        TASKS["mrpc"].load(tmp_path, 10, 10, 0)


def test_bad_label_and_empty_file(tmp_path: Path) -> None:
    root = _copy_task(tmp_path, "RTE")
    text = (root / "dev.tsv").read_text(encoding="utf-8").replace("not_entailment", "maybe", 1)
    (root / "dev.tsv").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.tsv:\d+: bad label: label 'maybe'"):
        TASKS["rte"].load(tmp_path, 10, 10, 0)
    (root / "train.tsv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows"):
        TASKS["rte"].load(tmp_path, 10, 10, 1)
    with pytest.raises(DataError, match="not found"):
        TASKS["sst2"].load(tmp_path, 10, 10, 0)


def test_evaluation_batches_by_token_length_and_scores_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rdrop_lab.tasks.base import Task

    task = TASKS["mrpc"]
    examples = task.load(DATA, 10, 40, 0).validation
    model, collate = task.build(dropout=None, max_length=128)
    order = task.evaluation_order(examples, collate)
    assert sorted(order) == list(range(len(examples))) and order != sorted(order)
    lengths = [collate([examples[i]])[0]["input_ids"].shape[1] for i in order]
    assert lengths == sorted(lengths)  # shortest first, in the model's tokens
    by_length = task.evaluate(model, examples, collate, 8)
    monkeypatch.setattr(type(task), "evaluation_order", Task.evaluation_order)
    assert task.evaluate(model, examples, collate, 8) == pytest.approx(by_length, abs=1e-6)
