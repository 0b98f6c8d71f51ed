"""Resumable checkpoints of a run in progress: one safetensors file, written atomically.

A run that is killed (SIGKILL, the end of a session, a power cut) restarts from its last
checkpoint when the same ``rdrop run`` / ``rdrop sweep`` command is given again. The file
holds every tensor (model, optimizer moments, random-generator states, the models kept for
selection) as safetensors, and everything else (step, data order, evaluation history,
training seconds, scheduler and Python / NumPy random states) as JSON in the safetensors
header. Nothing is pickled, so loading a checkpoint never runs code.

The file is written to a temporary name in the same folder, flushed and renamed over the
final name, so a kill during the write leaves the previous checkpoint intact.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "run.safetensors"
    ...     save_resume_state(path, {"step": 3, "w": torch.ones(2)})
    ...     state = load_resume_state(path)
    >>> state["step"], state["w"].tolist()
    (3, [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESUME_FORMAT",
    "ResumeError",
    "default_resume_dir",
    "load_resume_state",
    "resume_path",
    "save_resume_state",
]

#: Version of the checkpoint layout; a file of another version is not resumed from.
RESUME_FORMAT = 1
_HEADER_KEY = "rdrop_resume"


class ResumeError(ValueError):
    """A resumable checkpoint cannot be read (corrupt, truncated, another format)."""


def default_resume_dir() -> Path:
    """``$RDROP_RESUME_DIR``, else ``$XDG_CACHE_HOME/rdrop/resume`` (``~/.cache/...``):
    outside any git work tree, so checkpoints survive a fresh checkout."""
    explicit = os.environ.get("RDROP_RESUME_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "rdrop" / "resume"


def resume_path(resume_dir: Path, results_dir: Path, run_id: str) -> Path:
    """Where the checkpoint of ``run_id`` for ``results_dir`` lives: one sub-folder per
    results folder (by the hash of its absolute path), so two folders holding the same run
    never share a checkpoint."""
    key = hashlib.sha1(str(Path(results_dir).resolve()).encode()).hexdigest()[:12]
    return Path(resume_dir) / key / f"{run_id}.safetensors"


def _encode(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON tree of ``value`` with tensors moved to ``tensors`` under dotted keys."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, tensors, f"{prefix}.{k}") for k, v in value.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            items = [[k, _encode(v, tensors, f"{prefix}.{k}")] for k, v in value.items()]
            return {"__int_dict__": items}
        raise TypeError(f"{prefix}: dict keys must be all str or all int")
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}  # 'nan', 'inf' or '-inf': JSON has no such numbers
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{prefix}: cannot store a {type(value).__name__} in a resume checkpoint")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__dict__" in tree:
        return {k: _decode(v, tensors) for k, v in tree["__dict__"].items()}
    if "__int_dict__" in tree:
        return {int(k): _decode(v, tensors) for k, v in tree["__int_dict__"]}
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__float__" in tree and tree["__float__"] in ("nan", "inf", "-inf"):
        return float(tree["__float__"])
    raise ResumeError(f"unknown entry in a resume checkpoint: {sorted(tree)}")


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts, lists, tuples, numbers, strings and tensors)
    atomically to ``path``.

    Args:
        path: the ``.safetensors`` file; its folder is created.
        state: the run's state. Dict keys must be strings or integers.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "s")
    header = json.dumps({"format": RESUME_FORMAT, "state": tree}, allow_nan=False)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        # Tensors sharing memory (tied weights) must be stored apart.
        save_file({k: v.clone() for k, v in tensors.items()}, temp_name, {_HEADER_KEY: header})
        with open(temp_name, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def load_resume_state(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_resume_state`.

    Raises:
        ResumeError: naming the file, when it is truncated, not safetensors, of another
            format version or incomplete.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ResumeError(f"{path}: not a readable resume checkpoint ({error})") from None
    try:
        header = json.loads(metadata[_HEADER_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ResumeError(f"{path}: no rdrop resume header") from None
    if not isinstance(header, dict) or header.get("format") != RESUME_FORMAT:
        raise ResumeError(
            f"{path}: resume format {header.get('format') if isinstance(header, dict) else '?'}"
            f", expected {RESUME_FORMAT}"
        )
    try:
        state = _decode(header["state"], tensors)
    except KeyError as error:
        raise ResumeError(f"{path}: tensor {error} is missing") from None
    if not isinstance(state, dict):
        raise ResumeError(f"{path}: the stored state is not a mapping")
    return state
