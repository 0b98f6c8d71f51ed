"""Peak-RSS measurement of one variant in a fresh subprocess.

``python -m benchmarks.memory CASE VARIANT CONFIG_JSON`` builds the case (the inputs are
allocated and touched by then), resets the kernel's peak-RSS counter (``VmHWM``, via
``/proc/self/clear_refs``) to the current RSS, runs the variant once and prints one JSON line
with the peak minus that RSS in bytes. :func:`measure` launches it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _peak_and_current() -> tuple[int, int]:
    """(peak RSS since the last reset, current RSS); falls back to getrusage."""
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    if hwm is None or rss is None:
        value = _maxrss_bytes()
        return value, value
    return hwm, rss


def measure(case: str, variant: str, cfg: dict[str, int], threads: int) -> int:
    """Extra peak RSS (bytes) of one run of ``variant`` in a fresh interpreter."""
    # A fixed mmap threshold makes glibc return every freed buffer above 128 KiB to the OS at
    # once, so RSS follows live memory instead of what the allocator happens to retain.
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", case, variant, json.dumps(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed for {case}/{variant}:\n{proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"])


def main() -> None:
    import torch

    from .cases import build

    case_name, variant, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    case = build(case_name, cfg)
    run = case.variants[variant]
    gc.collect()
    # Without the reset, an import-time peak above the RSS with the inputs would hide
    # everything below it; getrusage's ru_maxrss cannot be reset.
    exact = _reset_peak()
    _, before = _peak_and_current()
    if not exact:
        before = _maxrss_bytes()
    run()
    after, _ = _peak_and_current()
    print(json.dumps({"extra_bytes": after - before, "before_bytes": before, "exact": exact}))


if __name__ == "__main__":
    main()
