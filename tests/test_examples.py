"""The README's examples run for real (on a tiny budget)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_digits_example_trains_both_and_prints_the_comparison() -> None:
    pytest.importorskip("sklearn")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--seeds", "0", "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "baseline :" in result.stdout and "R-Drop   :" in result.stdout
    assert "paired difference" in result.stdout


def test_import_rdrop_does_not_import_heavy_frameworks() -> None:
    code = (
        "import sys, rdrop; heavy = [m for m in ('transformers', 'lightning', 'matplotlib', "
        "'accelerate', 'pytorch_lightning', 'trl', 'peft', 'datasets') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
