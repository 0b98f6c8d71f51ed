"""Test-session setup shared by every test directory."""

import os

# Triton's CPU interpreter (tests/test_triton_kernel.py) must be chosen before anything
# imports triton, and torch.compile imports it: set it for the whole session. It changes
# nothing else: on CPU torch.compile generates C++, not Triton kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
