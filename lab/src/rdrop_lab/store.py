"""Where finished runs live: one JSON file per run, written atomically.

A run's record is written once, when the run has finished, to a temporary file in the same
folder, flushed to disk and renamed over the final name (``os.replace`` is atomic on POSIX
and Windows). A program killed at any moment therefore leaves either no record or a
complete one: it loses at most the run in progress, and re-running the same command skips
every run whose record exists.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from rdrop_lab.hardware import cpu_capability, cpu_name, native_bfloat16

__all__ = ["ResultStore", "environment", "finite_json", "is_complete_record"]

#: A finished record holds at least these keys, with these types.
_RECORD_KEYS: dict[str, type | tuple[type, ...]] = {
    "run_id": str,
    "config": dict,
    "task": dict,
    "evals": list,
    "steps": int,
    "selections": dict,
}


def is_complete_record(record: Any, run_id: str | None = None) -> bool:
    """Whether ``record`` is a finished run's record (of ``run_id``, when given): a run is
    skipped as finished only then, so a truncated or hand-made file never blocks it."""
    if not isinstance(record, dict):
        return False
    if run_id is not None and record.get("run_id") != run_id:
        return False
    if not all(isinstance(record.get(k), t) for k, t in _RECORD_KEYS.items()):
        return False
    selections = record["selections"]
    return record.get("diverged") is True or isinstance(selections.get("equal_epochs"), dict)


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (standard JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _file_mode() -> int:
    """The mode a new file gets under the process umask (records are not private)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class ResultStore:
    """Finished-run records under ``<results_dir>/runs/<run_id>.json``."""

    def __init__(self, results_dir: Path | str) -> None:
        self.results_dir = Path(results_dir)
        self.runs_dir = self.results_dir / "runs"

    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def has(self, run_id: str) -> bool:
        return self.load(run_id) is not None

    def load(self, run_id: str) -> dict[str, Any] | None:
        path = self.path(run_id)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            warnings.warn(f"ignoring unreadable run record {path}: {error}", stacklevel=2)
            return None
        return record if is_complete_record(record, run_id) else None

    def records(self) -> list[dict[str, Any]]:
        """Every readable finished record (partial ``.tmp`` files are never read)."""
        if not self.runs_dir.is_dir():
            return []
        found = []
        for path in sorted(self.runs_dir.glob("*.json")):
            record = self.load(path.stem)
            if record is not None:
                found.append(record)
        return found

    def check_writable(self) -> None:
        """Raise :class:`OSError` naming the folder unless records can be written there
        (checked before the first training step, not after hours of training)."""
        if self.results_dir.exists() and not self.results_dir.is_dir():
            raise NotADirectoryError(f"--results-dir {self.results_dir} is a file, not a folder")
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-check.", dir=self.runs_dir)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise PermissionError(
                f"--results-dir {self.results_dir}: cannot write run records there ({error})"
            ) from None

    def write(self, record: dict[str, Any]) -> Path:
        """Atomically write ``record`` (which must carry ``run_id``)."""
        run_id = record["run_id"]
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        final = self.path(run_id)
        handle, temp_name = tempfile.mkstemp(prefix=f".{run_id}.", suffix=".tmp", dir=self.runs_dir)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(finite_json(record), stream, indent=1, sort_keys=True, allow_nan=False)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temp_name, _file_mode())
            os.replace(temp_name, final)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        # A process killed between writing and renaming leaves its temporary file; once
        # this run's record has landed, such leftovers of the same run are garbage.
        for stale in self.runs_dir.glob(f".{run_id}.*.tmp"):
            stale.unlink(missing_ok=True)
        return final


def environment() -> dict[str, Any]:
    """Package versions and hardware, stored with every run.

    ``cpu_capability`` is the instruction set torch's kernels dispatch to and
    ``cpu_bf16`` whether the CPU multiplies bfloat16 natively
    (:mod:`rdrop_lab.hardware`): training seconds compare only between runs that match.
    """
    import torch

    import rdrop

    versions: dict[str, Any] = {
        "rdrop": rdrop.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),
        "cpu_bf16": native_bfloat16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("transformers", "numpy"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", None) if module else None
    return versions
