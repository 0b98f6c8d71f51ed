"""Fault injection: a real ``rdrop sweep`` killed with SIGKILL at random moments, between
and inside runs, several times, then run to the end, leaves the results folder an
uninterrupted sweep leaves (same records, up to clocks and dates)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rdrop_lab.tasks import DataError, default_data_dir
from rdrop_lab.tasks.images import FILES, find_fashion_mnist
from tests.experiments._records import comparable

try:
    DATA = default_data_dir()
except DataError:  # pragma: no cover
    DATA = None
REAL = find_fashion_mnist(None)
HAVE_IMAGES = all((REAL / f"{stem}.gz").is_file() for pair in FILES.values() for stem in pair)
pytestmark = pytest.mark.skipif(
    DATA is None or not HAVE_IMAGES, reason="needs ../shared/data and dataset-fashion-mnist"
)

SUITE = """
[suite]
name = "faults"
tasks = ["fmnist_cnn"]
methods = ["rdrop", "baseline"]
seeds = [0, 1]
alphas = [1.0]

[train]
train_size = 64
validation_size = 32
test_size = 32
batch_size = 16
eval_batch_size = 32
epochs = 2
max_epochs = 5
patience = 3
evals_per_epoch = 2
probe_size = 8
"""


def _records(results: Path) -> dict[str, Any]:
    return {p.name: comparable(json.loads(p.read_text())) for p in (results / "runs").glob("*")}


def test_sigkill_at_random_moments_leaves_the_uninterrupted_results(tmp_path: Path) -> None:
    config = tmp_path / "faults.toml"
    config.write_text(SUITE)
    env = {**os.environ, "RDROP_RESUME_DIR": str(tmp_path / "resume")}

    def command(results: Path) -> list[str]:
        return [
            sys.executable, "-m", "rdrop_lab.cli", "sweep", str(config),
            "--results-dir", str(results), "--data-dir", str(DATA), "--threads", "1",
            "--checkpoint-every", "0",
        ]  # fmt: skip

    whole = tmp_path / "whole"
    subprocess.run(command(whole), env=env, capture_output=True, timeout=600, check=True)

    killed = tmp_path / "killed"
    resume = tmp_path / "resume"

    def progressed(since: float) -> bool:
        """A checkpoint or a record written after ``since``: the sweep moved on."""
        for path in [*resume.rglob("*.safetensors"), *(killed / "runs").glob("*.json")]:
            try:
                if path.stat().st_mtime > since:
                    return True
            except FileNotFoundError:  # a checkpoint deleted as its record landed
                continue
        return False

    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        started = time.time()
        process = subprocess.Popen(
            command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        while process.poll() is None and not progressed(started):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # inside a run, or between two
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    subprocess.run(command(killed), env=env, capture_output=True, timeout=600, check=True)
    assert kills >= 3, "the sweep finished before it could be killed"
    assert _records(killed) == _records(whole)
    assert len(_records(whole)) == 4
    assert not list(resume.rglob("*.safetensors"))
