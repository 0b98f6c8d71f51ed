"""Training methods the runner compares: how one step turns a batch into gradients.

* ``baseline``: dropout only, one pass.
* ``rdrop``: R-Drop (:class:`rdrop.RDrop`), one forward on ``[x; x]``, alpha from the run;
  with the run options ``every_k_steps``, ``num_passes``, ``dropout_rates`` and
  ``stop_gradient`` it runs the paper's ablations.
* ``doubled_batch``: the paper's control: the same forward on ``[x; x]`` and the same task
  loss, without the KL (alpha = 0). If R-Drop beats it, the gain is the KL, not the batch.
* ``label_smoothing``, ``mixup``, ``manifold_mixup``, ``fgm``: the regularizers users pick
  instead of R-Drop, with their papers' hyper-parameters (run options ``label_smoothing``,
  ``mixup_alpha``, ``manifold_mixup_alpha``, ``fgm_epsilon`` override them).
* ``rdrop_label_smoothing``, ``rdrop_mixup``, ``rdrop_manifold_mixup``, ``rdrop_fgm``:
  R-Drop combined with each, by the library's combination rules.
* ``rdrop_semi``: R-Drop plus the consistency term alone on unlabeled batches.

See :mod:`rdrop_lab.methods.core` and
:mod:`rdrop_lab.methods.regularizers` for the exact objectives.
"""

from __future__ import annotations

from rdrop_lab.config import MethodSpec
from rdrop_lab.methods.base import (
    Method,
    RunContext,
    StepOutput,
    TrainStep,
    logits_of,
)
from rdrop_lab.methods.core import (
    Baseline,
    DoubledBatch,
    LabelSmoothing,
    RDropLabelSmoothing,
    RDropMethod,
    RDropSemi,
)
from rdrop_lab.methods.regularizers import (
    FGMMethod,
    ManifoldMixupMethod,
    MixUpMethod,
    RDropFGM,
    RDropManifoldMixup,
    RDropMixUp,
)

__all__ = [
    "METHODS",
    "Method",
    "RunContext",
    "StepOutput",
    "TrainStep",
    "get_method",
    "logits_of",
    "method_specs",
]

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Baseline(),
        RDropMethod(),
        DoubledBatch(),
        LabelSmoothing(),
        MixUpMethod(),
        ManifoldMixupMethod(),
        FGMMethod(),
        RDropLabelSmoothing(),
        RDropMixUp(),
        RDropManifoldMixup(),
        RDropFGM(),
        RDropSemi(),
    )
}


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a clear error listing the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


def method_specs() -> dict[str, MethodSpec]:
    """name -> :class:`MethodSpec` of every registered method (for suite files)."""
    return {name: method.spec() for name, method in METHODS.items()}
