"""The machine a run's seconds were measured on.

Training seconds, steps per second and crossing times compare only between runs on the
same kind of CPU: on this project's machines a one-thread float32 512×512 matrix product
ran at 49 GFLOP/s with AVX2 only, and a bfloat16 one at 1.3 GFLOP/s there, because without
AVX512-BF16 or AMX bfloat16 arithmetic is emulated (torch 2.13.0+cpu, 2-core AMD EPYC). So
every record stores the CPU's name and the vector instruction set torch dispatches to,
a resumed run refuses another machine's checkpoint, and the reports mark time figures
that mix machines.

Example:
    >>> machine({"cpu": "AMD EPYC", "cpu_capability": "AVX2"})
    'AMD EPYC (AVX2)'
    >>> machine({"cpu": "AMD EPYC", "cpu_capability": "AVX512", "cpu_bf16": True})
    'AMD EPYC (AVX512, native bf16)'
    >>> machine({"cpu": "AMD EPYC"})
    'AMD EPYC (instruction set not recorded)'
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["cpu_capability", "cpu_name", "machine", "native_bfloat16", "this_machine"]

#: CPU flags (``/proc/cpuinfo``) with which bfloat16 matrix products run natively.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in ``/proc/cpuinfo``; ``None`` off Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"``."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to: ``"AVX2"``,
    ``"AVX512"``, ``"DEFAULT"`` (:func:`torch.backends.cpu.get_cpu_capability`)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def native_bfloat16() -> bool | None:
    """Whether the CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX);
    ``None`` where its flags cannot be read (off Linux)."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else bool(BFLOAT16_FLAGS & set(flags.split()))


def machine(environment: Mapping[str, Any]) -> str:
    """The machine of a record's ``environment``, as the reports name it: the CPU and
    its instruction set, e.g. ``"AMD EPYC (AVX2)"``.

    Args:
        environment: a record's ``environment`` (:func:`rdrop_lab.store.environment`).

    Returns:
        ``"<cpu> (<cpu_capability>)"``, with ``", native bf16"`` inside the brackets
        when ``cpu_bf16`` is true (AVX-512 machines differ in it); records that predate
        ``cpu_capability`` say it was not recorded, so they never pass for the same
        machine as one that has it.
    """
    cpu = environment.get("cpu") or "CPU not recorded"
    isa = environment.get("cpu_capability") or "instruction set not recorded"
    bf16 = ", native bf16" if environment.get("cpu_bf16") else ""
    return f"{cpu} ({isa}{bf16})"


def this_machine() -> str:
    """:func:`machine` of the running process, e.g. ``"AMD EPYC (AVX2)"``."""
    return machine(
        {"cpu": cpu_name(), "cpu_capability": cpu_capability(), "cpu_bf16": native_bfloat16()}
    )
