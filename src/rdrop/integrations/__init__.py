"""R-Drop inside the training frameworks people already use.

Each integration is a submodule imported explicitly, so ``import rdrop`` (and
``import rdrop.integrations``) never imports an optional framework:

* :mod:`rdrop.integrations.hf` -- Hugging Face ``Trainer``: :class:`~rdrop.integrations.hf.
  RDropTrainer` and :class:`~rdrop.integrations.hf.RDropTrainerMixin` (needs
  ``transformers``).
* :mod:`rdrop.integrations.lightning` -- Lightning: :class:`~rdrop.integrations.lightning.
  RDropLightningMixin` and :func:`~rdrop.integrations.lightning.log_rdrop`, used inside
  ``training_step`` (needs nothing but a ``LightningModule`` to call them on).

Accelerate and ``DistributedDataParallel`` need no adapter: :class:`rdrop.RDrop` runs one
forward on the concatenated batch ``[x; x]``, so it is an ordinary module to
``Accelerator.prepare`` and to DDP (``find_unused_parameters=True`` included). See
``examples/accelerate_train.py`` and ``examples/ddp_train.py``.

Example:
    >>> import rdrop.integrations
    >>> sorted(rdrop.integrations.__all__)
    ['hf', 'lightning']
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["hf", "lightning"]


def __getattr__(name: str) -> ModuleType:
    # Lazy submodules: ``rdrop.integrations.hf`` imports transformers only when touched.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
