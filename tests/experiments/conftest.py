"""Resumable checkpoints of the runs the tests start go to a temporary folder, never to
the user's cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _resume_dir_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDROP_RESUME_DIR", str(tmp_path / "resume"))
