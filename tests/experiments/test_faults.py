"""Command-line faults: each bad value, file or folder gets an error that names it, before
any training step; a diverged run is a valid record marked as diverged."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rdrop_lab import tasks as task_registry
from rdrop_lab.cli import main
from rdrop_lab.config import ConfigError, RunConfig, parse_suite
from rdrop_lab.report import write_report
from rdrop_lab.runner import run_suite, train_run
from rdrop_lab.store import ResultStore
from rdrop_lab.tasks import DataError
from rdrop_lab.tasks.glue import GLUE_TASKS, _read_tsv
from tests.experiments._toy import ToyTask, examples

TOY = {"epochs": 1.0, "train_size": 16, "batch_size": 4, "evals_per_epoch": 2, "probe_size": 4}


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyTask:
    task = ToyTask(examples(16))
    monkeypatch.setitem(task_registry.TASKS, "toy", task)
    return task


@pytest.mark.parametrize("method", ["baseline", "rdrop"])
def test_a_diverged_run_is_recorded_as_diverged_and_the_suite_goes_on(
    tmp_path: Path, toy: ToyTask, method: str
) -> None:
    alpha = 1.0 if method == "rdrop" else None
    runs = [
        RunConfig("toy", method, alpha=alpha, lr=1e30, equal_time=False, **TOY),
        RunConfig("toy", method, alpha=alpha, seed=1, equal_time=False, **TOY),
    ]
    store = ResultStore(tmp_path)
    diverged, healthy = run_suite(runs, store, data_dir=tmp_path)
    assert diverged["diverged"] is True and diverged["stop_reason"] == "diverged"
    assert diverged["selections"]["equal_epochs"] is None
    assert healthy["diverged"] is False and healthy["selections"]["equal_epochs"] is not None
    text = store.path(diverged["run_id"]).read_text()
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
    report = write_report(tmp_path).read_text()
    assert "**Diverged:**" in report and "shown as diverged, never as a score" in report
    # A diverged run is finished: the same command does not run it again.
    assert store.has(diverged["run_id"])


def test_a_record_without_content_does_not_block_its_run(tmp_path: Path, toy: ToyTask) -> None:
    config = RunConfig("toy", equal_time=False, **TOY)
    store = ResultStore(tmp_path)
    store.runs_dir.mkdir(parents=True)
    store.path(config.run_id()).write_text(json.dumps({"run_id": config.run_id()}))
    assert not store.has(config.run_id())
    [record] = run_suite([config], store, data_dir=tmp_path)
    assert record["steps"] > 0 and store.has(config.run_id())


def test_records_are_readable_by_others_under_the_umask(tmp_path: Path, toy: ToyTask) -> None:
    old = os.umask(0o022)
    try:
        record = train_run(RunConfig("toy", equal_time=False, **TOY), ResultStore(tmp_path),
                           data_dir=tmp_path)  # fmt: skip
    finally:
        os.umask(old)
    mode = stat.S_IMODE(ResultStore(tmp_path).path(record["run_id"]).stat().st_mode)
    assert mode == 0o644


def test_an_unusable_results_folder_fails_before_training(tmp_path: Path, toy: ToyTask) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        run_suite([RunConfig("toy", equal_time=False, **TOY)], ResultStore(not_a_folder),
                  data_dir=tmp_path)  # fmt: skip
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot write run records"):
            run_suite([RunConfig("toy", equal_time=False, **TOY)], ResultStore(locked),
                      data_dir=tmp_path)  # fmt: skip


def test_cli_names_an_unusable_results_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    argv = ["run", "sst2", "--method", "baseline", "--seeds", "0", "--results-dir", str(target)]
    assert main(argv) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


SUITE = '[suite]\nname = "s"\ntasks = ["sst2"]\nmethods = ["rdrop"]\nseeds = [0]\n'


def _parse(text: str) -> object:
    import tomllib

    return parse_suite(tomllib.loads(text), known_tasks={"sst2": 1.0}, known_methods={"rdrop"})


def test_infinite_alpha_and_huge_seeds_fail_at_parse_time() -> None:
    with pytest.raises(ConfigError, match="alphas: each must be a finite number"):
        _parse(SUITE + "alphas = [inf]\n")
    with pytest.raises(ConfigError, match=r"seeds must be integers in \[0, 2\*\*32\)"):
        _parse(SUITE.replace("seeds = [0]", "seeds = [99999999999999999999]"))
    with pytest.raises(ConfigError, match="seed must be an integer"):
        RunConfig("sst2", seed=2**40)
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        RunConfig("sst2", "rdrop", alpha=float("inf"))


def test_cli_rejects_a_huge_seed_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "sst2", "--seeds", "99999999999999999999"]) == 2
    assert "seed must be an integer in [0, 2**32)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_suite_names_cannot_leave_the_runs_folder(name: str) -> None:
    with pytest.raises(ConfigError, match=r"\[suite\] name must be"):
        _parse(SUITE.replace('name = "s"', f"name = {name!r}".replace("'", '"')))


def test_config_files_bom_invalid_utf8_duplicates_and_aliases(tmp_path: Path) -> None:
    from rdrop_lab.config import read_config_file

    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + SUITE.encode())
    assert read_config_file(bom)["suite"]["name"] == "s"
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[suite]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: not UTF-8 text"):
        read_config_file(bad)
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("suite:\n  name: a\n  name: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        read_config_file(duplicate)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x"]\nb: &b [*a, *a]\nc: &c [*b, *b]\n')
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) are not allowed"):
        read_config_file(bomb)


def test_corrupt_tsv_files_name_the_file(tmp_path: Path) -> None:
    long_field = tmp_path / "long.tsv"
    long_field.write_text("a\tb\n" + "x" * 200_000 + "\t1\n")
    assert _read_tsv(long_field, header=True)[0][1][0] == "x" * 200_000
    huge = tmp_path / "huge.tsv"
    huge.write_text("a\tb\n" + "x" * (1 << 21) + "\t1\n")
    with pytest.raises(DataError, match=r"huge.tsv: unreadable TSV"):
        _read_tsv(huge, header=True)
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"a\tb\n\xff\xfe\t1\n")
    with pytest.raises(DataError, match=r"binary.tsv: not UTF-8 text"):
        _read_tsv(binary, header=True)
    assert "sst2" in GLUE_TASKS


def test_report_out_with_md_suffix_is_the_report_file(tmp_path: Path, toy: ToyTask) -> None:
    results = tmp_path / "results"
    train_run(RunConfig("toy", equal_time=False, **TOY), ResultStore(results), data_dir=tmp_path)
    out = tmp_path / "elsewhere" / "X.md"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert out.is_file() and (out.parent / "plots").is_dir()


def test_probe_checkpoint_errors_name_the_file(
    tmp_path: Path, toy: ToyTask, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import save_file

    from tests.experiments._toy import ToyText

    model = ToyText()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        "truncated": None,
        "pickle": None,
        "missing": {k: v for k, v in list(good.items())[1:]},
        "shapes": {**good, "head.weight": torch.zeros(1, 1)},
        "nan": {**good, "head.weight": torch.full_like(good["head.weight"], float("nan"))},
    }
    expected = {
        "truncated": "not a readable safetensors file",
        "pickle": "not a readable safetensors file",
        "missing": "does not fit this task's model",
        "shapes": "does not fit this task's model",
        "nan": "hold NaN or infinite values",
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if name == "truncated":
            save_file(good, str(path))
            path.write_bytes(path.read_bytes()[:40])
        elif name == "pickle":
            path.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
        else:
            save_file(tensors, str(path))
        assert main(["probe", "toy", "--checkpoint", str(path), "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"--checkpoint {path}" in err and expected[name] in err, (name, err)


def test_a_landed_record_removes_the_temporary_files_of_a_killed_write(tmp_path: Path) -> None:
    from rdrop_lab.store import ResultStore

    store = ResultStore(tmp_path)
    store.runs_dir.mkdir(parents=True)
    leftover = store.runs_dir / ".task__rdrop__s0__abc.x1y2.tmp"  # killed before the rename
    leftover.write_text("{}")
    other = store.runs_dir / ".task__baseline__s0__def.x1y2.tmp"  # another run's, kept
    other.write_text("{}")
    store.write({"run_id": "task__rdrop__s0__abc"})
    assert not leftover.exists() and other.exists()
    assert (store.runs_dir / "task__rdrop__s0__abc.json").is_file()
