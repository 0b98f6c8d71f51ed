"""The documentation: the site builds with ``mkdocs build --strict`` and its examples run.

Every fenced ```` ```python ```` block in ``README.md`` and ``docs/**/*.md`` runs, in
order, one namespace per page, in one subprocess (so state such as Accelerate's stays out
of the test process). A block right after a line ``<!-- no-run -->`` is not run (it needs
a model, data or processes the page does not build). A page whose block needs an optional
framework that is not installed (transformers, lightning, accelerate, peft, trl) is
skipped from that block on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
OPTIONAL = ("transformers", "lightning", "pytorch_lightning", "accelerate", "peft", "trl")
_BLOCK = re.compile(
    r"^(?P<mark><!--\s*no-run\s*-->\s*\n)?```python[^\n]*\n(?P<code>.*?)^```\s*$", re.M | re.S
)


def python_blocks(text: str) -> list[str]:
    """The runnable ```` ```python ```` blocks of a Markdown text, in order."""
    return [m["code"] for m in _BLOCK.finditer(text) if not m["mark"]]


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


RUNNABLE = [page for page in PAGES if python_blocks(page.read_text(encoding="utf-8"))]

_RUNNER = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
optional = set(sys.argv[2].split(","))
results = {}
for page, blocks in json.loads(open(sys.argv[1], encoding="utf-8").read()).items():
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    outcome = {"status": "passed"}
    for number, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{page} (python block {number})", "exec"), namespace)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] in optional:
                outcome = {"status": "skipped", "reason": f"block {number} needs {error.name}"}
            else:
                outcome = {"status": "failed", "error": traceback.format_exc()}
            break
        except Exception:
            outcome = {"status": "failed", "error": traceback.format_exc()}
            break
    results[page] = outcome
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def block_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("doc_blocks")
    blocks = {_rel(p): python_blocks(p.read_text(encoding="utf-8")) for p in RUNNABLE}
    (folder / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    (folder / "runner.py").write_text(_RUNNER, encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(folder / "runner.py"),
            str(folder / "blocks.json"),
            ",".join(OPTIONAL),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_block_marker_is_understood() -> None:
    text = "```python\na = 1\n```\n\n<!-- no-run -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == ["a = 1\n"]


@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_python_blocks_run(page: Path, block_outcomes: dict[str, dict[str, str]]) -> None:
    outcome = block_outcomes[_rel(page)]
    if outcome["status"] == "skipped":
        pytest.skip(outcome["reason"])
    assert outcome["status"] == "passed", outcome.get("error")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")
    mkdocs = [sys.executable, "-m", "mkdocs"]
    site = tmp_path / "site"
    result = subprocess.run(
        [*mkdocs, "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    # the API reference lists every public name of rdrop
    import rdrop

    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="rdrop\.(?:[A-Za-z_]+\.)*([A-Za-z_]+)"', reference))
    missing = [name for name in rdrop.__all__ if name != "__version__" and name not in anchors]
    assert not missing, f"not in the API reference: {missing}"

    # every committed report is served, plots included
    for report in sorted((ROOT / "results").rglob("REPORT.md")):
        page = site / report.parent.relative_to(ROOT) / "REPORT" / "index.html"
        assert page.is_file(), f"{report.relative_to(ROOT)} is not in the site"
    # the verdict table is the README's, included, not a copy
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| Fashion-MNIST ViT"))
    assert row.split("|")[4].strip() in (site / "results" / "index.html").read_text(
        encoding="utf-8"
    )


def test_readme_stays_short_and_keeps_the_ci_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in (
        "pip install torch==2.13.0",
        'pip install -e ".[dev,hf,lightning]" -e ./lab',
        'python -m pytest -m "not slow"',
    ):
        assert command in readme and command in ci, command
    assert "rdrop demo" in readme
