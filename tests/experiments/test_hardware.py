"""The machine a run is timed on: what records store and how bf16 runs warn."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from rdrop_lab import hardware, runner
from rdrop_lab import tasks as task_registry
from rdrop_lab.config import RunConfig
from rdrop_lab.store import ResultStore, environment
from tests.experiments._toy import ToyTask, examples


def test_environment_names_the_instruction_set_torch_dispatches_to() -> None:
    env = environment()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_bf16"] in (True, False, None)
    assert hardware.machine(env) == hardware.this_machine()


def test_native_bfloat16_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    def flags(value: str | None):  # type: ignore[no-untyped-def]
        return lambda name: value if name == "flags" else None

    monkeypatch.setattr(hardware, "_cpuinfo_field", flags("fpu avx2 avx512f"))
    assert hardware.native_bfloat16() is False
    monkeypatch.setattr(hardware, "_cpuinfo_field", flags("fpu avx2 avx512f avx512_bf16"))
    assert hardware.native_bfloat16() is True
    monkeypatch.setattr(hardware, "_cpuinfo_field", flags("amx_tile amx_bf16"))
    assert hardware.native_bfloat16() is True
    monkeypatch.setattr(hardware, "_cpuinfo_field", flags(None))
    assert hardware.native_bfloat16() is None


class HeadedToyTask(ToyTask):
    """The toy task with an output layer to keep in float32, so it trains under bf16."""

    output_module = "head"


@pytest.mark.parametrize("native", [False, True, None])
def test_bf16_on_a_cpu_without_native_bfloat16_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool | None
) -> None:
    task = HeadedToyTask(examples(16))
    monkeypatch.setitem(task_registry.TASKS, task.name, task)
    monkeypatch.setattr(runner, "native_bfloat16", lambda: native)
    config = RunConfig(
        "toy", precision="bf16", epochs=1.0, train_size=16, batch_size=4, equal_time=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = runner.train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    emulated = [m for m in messages if "without native bfloat16" in m]
    assert len(emulated) == (1 if native is False else 0)
    if emulated:
        assert config.run_id() in emulated[0] and "train it in fp32" in emulated[0]
    assert record["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
