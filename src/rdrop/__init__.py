"""rdrop: R-Drop (Liang et al., NeurIPS 2021) for any PyTorch model and training loop.

Example:
    >>> import torch, rdrop
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3),
    ...                           torch.nn.Linear(32, 3))
    >>> model = rdrop.RDrop(net, alpha=1.0)
    >>> out = model(torch.randn(4, 8), target=torch.tensor([0, 1, 2, 0]))
    >>> out.loss.backward()

The core (this package's top level) needs torch alone; integrations live in
``rdrop.integrations`` and are imported explicitly.
"""

from rdrop._batch import extract_logits
from rdrop._dropout import dropout_rate
from rdrop.functional import (
    consistency,
    mse_consistency,
    multi_pass_consistency,
    symmetric_bernoulli_kl,
    symmetric_kl,
    symmetric_kl_reference,
)
from rdrop.fused import rdrop_cross_entropy, rdrop_linear_cross_entropy
from rdrop.losses import (
    ConsistencyLoss,
    NonFiniteLossError,
    RDropLoss,
    RDropOutput,
    rdrop_loss,
    task_loss,
)
from rdrop.probe import ProbeResult, dropout_consistency
from rdrop.regularizers import (
    FGM,
    ManifoldMixup,
    MixedBatch,
    MixUp,
    fgm_step,
    mixup,
    rdrop_mixup_loss,
    soft_cross_entropy,
)
from rdrop.schedules import ConsistencySchedule, LinearWarmup, linear_warmup
from rdrop.wrapper import RDrop, RDropWarning

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # functional
    "symmetric_kl",
    "symmetric_kl_reference",
    "symmetric_bernoulli_kl",
    "mse_consistency",
    "consistency",
    "multi_pass_consistency",
    # losses
    "task_loss",
    "rdrop_loss",
    "RDropLoss",
    "ConsistencyLoss",
    "RDropOutput",
    "NonFiniteLossError",
    "rdrop_cross_entropy",
    "rdrop_linear_cross_entropy",
    # wrapper
    "RDrop",
    "RDropWarning",
    "extract_logits",
    "LinearWarmup",
    "linear_warmup",
    "ConsistencySchedule",
    "dropout_rate",
    # probe
    "dropout_consistency",
    "ProbeResult",
    # regularizers that combine with R-Drop
    "mixup",
    "MixUp",
    "MixedBatch",
    "ManifoldMixup",
    "rdrop_mixup_loss",
    "soft_cross_entropy",
    "FGM",
    "fgm_step",
]
