"""Regularizers that combine with R-Drop: MixUp, Manifold MixUp, FGM, label smoothing.

torch only; all names are re-exported from ``rdrop``.

1. **MixUp** (Zhang et al., ICLR 2018) — :func:`mixup`, :class:`MixUp`,
   :class:`MixedBatch`: ``x_mix = lam x + (1 - lam) x[perm]``, ``lam ~ Beta(alpha,
   alpha)``, loss ``lam CE(f(x_mix), y) + (1 - lam) CE(f(x_mix), y[perm])``.
2. **Manifold MixUp** (Verma et al., ICML 2019) — :class:`ManifoldMixup`: the same at the
   output of a layer drawn uniformly from a list, through a forward hook.
3. **FGM** adversarial training (Miyato et al., ICLR 2017) — :class:`FGM`,
   :func:`fgm_step`: ``r = epsilon g / ||g||_2`` added to the embedding weights.
4. **Label smoothing** — not here: ``label_smoothing=`` of :func:`rdrop.task_loss`,
   :func:`rdrop.rdrop_loss`, :class:`rdrop.RDropLoss`, :class:`rdrop.RDrop` and
   :meth:`MixedBatch.loss` (``(1 - eps) onehot(y) + eps / C``).

Combination rules with R-Drop (``loss = mean_i task(P_i) + (alpha / 2) D(P_1, P_2)``):

- **MixUp + R-Drop** (:func:`rdrop_mixup_loss`): mix once (one ``lam``, one ``perm``);
  both dropout passes see the same mixed input ``[x_mix; x_mix]``; the task part is the
  mixed cross-entropy averaged over the passes; ``D`` is the symmetric KL between the
  passes on the mixed input.
- **Manifold MixUp + R-Drop**: both passes mix at the same layer with the same ``lam``
  and ``perm``; in the one forward on ``[x; x]`` the hook permutes within each half
  (``perm`` for the first ``B`` rows, ``perm + B`` for the second). Loss as for MixUp.
- **FGM + R-Drop** (:func:`fgm_step`): R-Drop loss on the clean doubled batch, backward,
  attack, task loss of **one** dropout pass on the perturbed embeddings, backward,
  restore, optimizer step.
- **Label smoothing + R-Drop**: smoothing on the task part only, never on ``D``.

Example:
    >>> import torch, rdrop
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
    ...                           torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    >>> wrapped = rdrop.RDrop(net, alpha=1.0, task=rdrop.soft_cross_entropy)
    >>> x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 1, 0, 2])
    >>> mixed = rdrop.mixup(x, y, alpha=0.2, num_classes=3)
    >>> out = wrapped(mixed.inputs, target=mixed.soft_targets(label_smoothing=0.1))
    >>> out.loss.backward()
"""

from rdrop.regularizers.fgm import FGM, fgm_step
from rdrop.regularizers.manifold import ManifoldMixup
from rdrop.regularizers.mixup import (
    MixedBatch,
    MixUp,
    mixup,
    rdrop_mixup_loss,
    soft_cross_entropy,
)

__all__ = [
    "FGM",
    "ManifoldMixup",
    "MixUp",
    "MixedBatch",
    "fgm_step",
    "mixup",
    "rdrop_mixup_loss",
    "soft_cross_entropy",
]
