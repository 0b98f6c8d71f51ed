"""MkDocs hook: serve the committed reports and keep every number in one place.

- ``on_files`` adds the committed reports under ``results/`` (every ``REPORT.md``, their
  ``plots/*.png`` and ``benchmarks.md``) to the site at the same paths, read from the
  files themselves: the site never holds a copy written by hand.
- ``<!-- include: PATH [section=NAME] [shift=N] -->`` on a line of its own is replaced by
  the file ``PATH`` (relative to the repository root), or by the part of it between
  ``<!-- section: NAME -->`` and ``<!-- /section: NAME -->``; ``shift=N`` moves its
  headings N levels down. The README's verdict table is written once, in the README.
- ``<!-- reports -->`` is replaced by a list of links to every committed report.
- Links are rewritten for the site: a relative link that leaves ``docs/`` (``../README.md``,
  ``../results/glue/REPORT.md``) points at the page that serves that file, and a link to a
  repository file the site does not serve (``examples/digits.py``) keeps its text and loses
  the link. On GitHub the same Markdown files link to the repository as written.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = ROOT / "results"

# Repository paths (file or file#anchor) served by a page of their own under another name.
SITE_PAGE = {
    "README.md#results-trained-to-convergence": "results/index.md#results-trained-to-convergence",
    "README.md": "index.md",
    "CHANGELOG.md": "changelog.md",
    "results": "results/index.md",
    "results/benchmarks.md": "performance.md#benchmarks",
}

_INCLUDE = re.compile(r"^<!--\s*include:\s*(?P<path>\S+)(?P<opts>(?:\s+\w+=\S+)*)\s*-->\s*$", re.M)
_REPORTS = re.compile(r"^<!--\s*reports\s*-->\s*$", re.M)
_LINK = re.compile(r"(?P<text>!?\[(?:[^\[\]]|\[[^\]]*\])*\])\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def report_paths() -> list[Path]:
    """Every committed report, sorted by folder."""
    return sorted(RESULTS.rglob("REPORT.md"))


def on_files(files: Files, config: Any) -> Files:
    served = [*report_paths(), *RESULTS.rglob("plots/*.png")]
    for path in sorted(served):
        uri = path.relative_to(ROOT).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _section(text: str, name: str, source: str) -> str:
    start = re.search(rf"^<!--\s*section:\s*{re.escape(name)}\s*-->\s*$", text, re.M)
    end = re.search(rf"^<!--\s*/section:\s*{re.escape(name)}\s*-->\s*$", text, re.M)
    if start is None or end is None or end.start() < start.end():
        raise ValueError(f"{source} has no section {name!r} (<!-- section: {name} --> ...)")
    return text[start.end() : end.start()].strip("\n")


def _shift(text: str, levels: int) -> str:
    def deeper(heading: re.Match[str]) -> str:
        return "#" * min(6, len(heading[1]) + levels) + " "

    def one(part: str) -> str:
        return re.sub(r"^(#{1,6}) ", deeper, part, flags=re.M)

    return _outside_fences(text, one)


def _outside_fences(text: str, change: Any) -> str:
    out, last = [], 0
    for fence in _FENCE.finditer(text):
        out.append(change(text[last : fence.start()]))
        out.append(fence.group(0))
        last = fence.end()
    out.append(change(text[last:]))
    return "".join(out)


def _site_uri(repo_path: str, anchor: str, files: Files) -> str | None:
    """The site file (with anchor) that serves a repository path, or None."""
    for key in (f"{repo_path}#{anchor}" if anchor else None, repo_path):
        if key and key in SITE_PAGE:
            uri, _, page_anchor = SITE_PAGE[key].partition("#")
            return uri + (f"#{page_anchor or anchor}" if (page_anchor or anchor) else "")
    uri = repo_path.removeprefix("docs/")
    if (ROOT / repo_path).is_dir():
        for index in ("index.md", "REPORT.md", "README.md"):
            if files.get_file_from_path(posixpath.join(uri, index)) is not None:
                uri = posixpath.join(uri, index)
                break
    if files.get_file_from_path(uri) is None:
        return None
    return uri + (f"#{anchor}" if anchor else "")


def rewrite_links(text: str, source_dir: Path, page_uri: str, files: Files) -> str:
    """Relative links written from ``source_dir`` (a folder of the repository), for the site."""
    page_dir = posixpath.dirname(page_uri)

    def one(match: re.Match[str]) -> str:
        target = match["target"]
        if target.startswith(("#", "/")) or _SCHEME.match(target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = (source_dir / path).resolve()
        try:
            repo_path = resolved.relative_to(ROOT).as_posix()
        except ValueError:
            return match["text"].lstrip("!")
        uri = _site_uri(repo_path, anchor, files)
        if uri is None:
            return match["text"].lstrip("!")
        path, hash_, anchor = uri.partition("#")
        return f"{match['text']}({posixpath.relpath(path, page_dir or '.')}{hash_}{anchor})"

    return _outside_fences(text, lambda part: _LINK.sub(one, part))


def _include(match: re.Match[str], page_uri: str, files: Files) -> str:
    source = ROOT / match["path"]
    opts = dict(opt.split("=", 1) for opt in match["opts"].split())
    text = source.read_text(encoding="utf-8")
    if "section" in opts:
        text = _section(text, opts["section"], match["path"])
    text = _shift(text, int(opts.get("shift", "0")))
    return rewrite_links(text, source.parent, page_uri, files)


def _report_list(page_uri: str) -> str:
    lines = []
    for path in report_paths():
        uri = path.relative_to(ROOT).as_posix()
        name = path.parent.relative_to(RESULTS).as_posix()
        lines.append(f"- [`results/{name}`]({posixpath.relpath(uri, posixpath.dirname(page_uri))})")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    uri = page.file.src_uri
    markdown = _INCLUDE.sub(lambda m: _include(m, uri, files), markdown)
    markdown = _REPORTS.sub(lambda m: _report_list(uri), markdown)
    if page.file.abs_src_path is None:
        return markdown
    source_dir = Path(page.file.abs_src_path).parent
    return rewrite_links(markdown, source_dir, uri, files)
