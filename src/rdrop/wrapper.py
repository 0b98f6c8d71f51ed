"""``RDrop``: wrap any model so that a training call returns the R-Drop loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rdrop._batch import LogitsGetter, check_logits_key, extract_logits, find_batch_size
from rdrop._branch import resolve_branch
from rdrop._checks import check_alpha, check_bool, check_int, is_real_number
from rdrop._dropout import active_dropout_modules, dropout_rate, training_batchnorm_modules
from rdrop._fused_kernel import concatenated_base
from rdrop._output_layer import output_layer_bypassed, resolve_output_layer
from rdrop._passes import forward_passes
from rdrop.functional import ConsistencyKind
from rdrop.fused import rdrop_linear_cross_entropy
from rdrop.losses import BuiltinTask, RDropLoss, RDropOutput, TaskLoss
from rdrop.schedules import ConsistencySchedule

__all__ = ["RDrop", "RDropWarning"]

Mode = Literal["concat", "sequential"]


class RDropWarning(UserWarning):
    """A setting that makes R-Drop do nothing or something other than intended."""


class RDrop(nn.Module):
    """Add R-Drop to any model: one forward on ``[x; x]``, task loss + consistency term.

    In training mode, ``wrapped(*args, target=y, **kwargs)`` (``target`` is the wrapper's
    keyword; every other argument goes to the model) concatenates ``num_passes``
    copies of every batched tensor in the inputs (nested tuples, lists, dicts and mappings
    such as a tokenizer's ``BatchEncoding``), runs the model **once** on the doubled batch
    (the paper's way, and the one that is safe under DDP), splits the output and returns an
    :class:`RDropOutput` with::

        loss = 1/2 (task(P_1) + task(P_2)) + (alpha / 2) * D(P_1, P_2)

    (with ``num_passes=m``: the mean task loss over the passes ``+ (alpha / m) * D``, see
    :func:`rdrop.rdrop_loss`). In eval mode it is the bare model: a single pass whose output
    is returned unchanged (with ``target=`` given, an :class:`RDropOutput` holding the task
    loss of that single pass). The caller's inputs are never mutated. The batch dimension is
    dim 0 of inputs and outputs; a tensor is treated as batched when its first dimension
    equals the target's (or, without a target, the first input tensor's).

    Example:
        >>> import torch, rdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                           torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
        >>> model = rdrop.RDrop(net, alpha=1.0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        >>> out = model(x, target=y)            # one forward on [x; x]
        >>> out.loss.backward(); opt.step()
        >>> out.logits.shape                    # first pass's logits
        torch.Size([16, 3])
        >>> _ = model.eval(); model(x).shape    # inference: the bare model, one pass
        torch.Size([16, 3])

    Args:
        model: any ``nn.Module`` with dropout.
        alpha: consistency weight ``>= 0`` (the paper's alpha; default 1.0, or the
            ``loss``'s alpha, which an ``alpha`` given next to ``loss=`` replaces), or a
            callable ``step -> alpha`` (e.g. :func:`rdrop.linear_warmup`); ``step``
            counts labeled training calls from 0 (:meth:`unlabeled` calls count apart,
            in ``unlabeled_step``) and both counters are saved in the state dict. Under
            gradient accumulation a call is a micro-batch: give schedule lengths and
            ``every_k_steps`` in micro-batches (or set ``wrapped.step`` yourself).
            :class:`rdrop.integrations.hf.RDropTrainerMixin` counts optimizer steps
            instead.
        task, consistency, ignore_index, label_smoothing, check_finite: see
            :func:`rdrop.rdrop_loss`; or pass a ready ``loss=RDropLoss(...)`` instead
            (then setting any of these is a ``ValueError``: the loss carries its own).
        num_passes: ``m >= 2`` dropout passes per step (the consistency term averages all
            pairs, see :func:`rdrop.multi_pass_consistency`).
        every_k_steps: apply the consistency term on every ``k``-th training call only
            (steps 0, k, 2k, ...); other steps are a plain single pass (the paper's
            "R-Drop every k steps" ablation).
        mode: ``"concat"`` (default: one forward on the concatenated batch) or
            ``"sequential"`` (``m`` separate forwards, for models whose doubled batch does
            not fit or cannot be taken; not DDP-safe with ``find_unused_parameters``).
        dropout_rates: one dropout probability per pass, applied to every dropout module
            for that pass (the paper's unequal-rates ablation); needs ``mode="sequential"``.
        stop_gradient: run passes 2..m under ``torch.no_grad()`` and use them only as the
            consistency target; the task loss is pass 1's. Cheaper (no backward through
            the extra passes). It always runs separate forwards (whatever ``mode``), so
            like ``mode="sequential"`` it is not DDP-safe with
            ``find_unused_parameters=True``. **Not in the paper.**
        logits_key: where the logits are in the model output: ``None`` (auto: a tensor,
            ``output["logits"]``, ``output.logits`` or ``output[0]``), a key or attribute
            name, a tuple index, or a callable.
        branch_at: partial-depth R-Drop: the module (or its dotted name, e.g.
            ``"encoder.layer.4"``) from which the layers run on ``m`` copies of their
            input; the layers below it run once on ``x``, so their dropout is shared by
            the passes and only the upper layers' dropout differs. Every batched input
            (first dimension ``B``) of a module called from the branch point on is
            repeated too, so attention masks and position embeddings stay consistent;
            the 2-D ``attn_mask``, ``mask``, ``src_mask``, ``tgt_mask`` or
            ``memory_mask`` of PyTorch's own attention and Transformer modules
            (``[L, S]``, shared by every row) is not.
            Cost: ``(c_low + m * c_up) / (c_low + c_up)`` of a plain step, against ``m``.
            The branch module itself, or a dropout at or above it, must be where the
            passes should start to differ (for a Hugging Face classifier's head-only
            variant, branch at the ``dropout`` before ``classifier``). Needs
            ``mode="concat"``, ``stop_gradient=False`` and no ``dropout_rates``. **Not in
            the paper.**
        output_layer: the model's ``nn.Linear`` output projection (or its name, e.g.
            ``"lm_head"``) to compute the R-Drop loss from the hidden states with
            :func:`rdrop.rdrop_linear_cross_entropy`: during the R-Drop forward the layer
            returns its input, so the logits of the doubled batch ``[2B, ..., V]`` never
            exist at once (peak memory ``[2B, ..., H]`` + chunk buffers instead). The
            result then has ``logits=None``; steps without the consistency term
            (``every_k_steps``) and evaluation run the layer as usual. Needs the defaults
            ``num_passes=2``, ``mode="concat"``, ``stop_gradient=False`` and a
            cross-entropy task with the KL; with DDP, keep
            ``find_unused_parameters=False`` (the layer is not used in the forward).
        warn: emit :class:`RDropWarning` for settings that defeat R-Drop (no active
            dropout, the inner model left in eval mode, BatchNorm on the duplicated batch).
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float | Callable[[int], float] | None = None,
        *,
        task: BuiltinTask | TaskLoss = "cross_entropy",
        consistency: ConsistencyKind | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        loss: RDropLoss | None = None,
        num_passes: int = 2,
        every_k_steps: int = 1,
        mode: Mode = "concat",
        dropout_rates: tuple[float, ...] | list[float] | None = None,
        stop_gradient: bool = False,
        logits_key: LogitsGetter = None,
        check_finite: bool = True,
        warn: bool = True,
        output_layer: nn.Module | str | None = None,
        branch_at: nn.Module | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        stop_gradient = check_bool("stop_gradient", stop_gradient)
        warn = check_bool("warn", warn)
        logits_key = check_logits_key(logits_key)
        if alpha is not None and not callable(alpha):
            alpha = check_alpha(alpha)
        num_passes = check_int("num_passes", num_passes, 2, " (m >= 2 dropout passes)")
        every_k_steps = check_int("every_k_steps", every_k_steps, 1)
        if mode not in ("concat", "sequential"):
            raise ValueError(f"mode must be 'concat' or 'sequential', got {mode!r}")
        if dropout_rates is not None:
            if isinstance(dropout_rates, (str, bytes)) or not all(
                is_real_number(p) for p in dropout_rates
            ):
                raise TypeError(
                    f"dropout_rates must be a sequence of numbers, got {dropout_rates!r}"
                )
            rates = tuple(float(p) for p in dropout_rates)
            if mode != "sequential":
                raise ValueError(
                    "dropout_rates needs mode='sequential': in one forward on [x; x] every "
                    "dropout module has a single rate"
                )
            if len(rates) != num_passes:
                raise ValueError(
                    f"dropout_rates must give one rate per pass ({num_passes}), got {len(rates)}"
                )
            for p in rates:
                if not 0.0 <= p < 1.0:
                    raise ValueError(f"dropout_rates must lie in [0, 1), got {rates}")
            self.dropout_rates: tuple[float, ...] | None = rates
        else:
            self.dropout_rates = None
        if loss is not None and not isinstance(loss, RDropLoss):
            raise TypeError(f"loss must be an rdrop.RDropLoss, got {type(loss).__name__}")
        if loss is not None:
            loss_options = {
                "task": (task, "cross_entropy"),
                "consistency": (consistency, None),
                "ignore_index": (ignore_index, -100),
                "label_smoothing": (label_smoothing, 0.0),
                "check_finite": (check_finite, True),
            }
            conflicting = [
                name for name, (value, default) in loss_options.items() if value != default
            ]
            if conflicting:
                raise ValueError(
                    f"{', '.join(conflicting)} would be ignored next to loss=: the loss "
                    "object carries its own; set them on the RDropLoss instead"
                )
        self.model = model
        self.criterion = loss or RDropLoss(
            1.0 if alpha is None or callable(alpha) else alpha,
            task=task,
            consistency=consistency,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            check_finite=check_finite,
        )
        #: When the consistency term is used and with which alpha (``alpha=None``: the
        #: loss's alpha); the same rule as the Trainer mixin's.
        self.schedule = ConsistencySchedule(
            self.criterion.alpha if alpha is None else alpha, every_k_steps
        )
        self.num_passes = num_passes
        self.mode: Mode = mode
        self.stop_gradient = stop_gradient
        self.logits_key = logits_key
        self.warn = warn
        # Kept out of the module tree: the layer is already registered inside ``model``.
        layer = None if output_layer is None else resolve_output_layer(model, output_layer)
        self.output_layer: nn.Linear | None
        object.__setattr__(self, "output_layer", layer)
        if layer is not None:
            self._check_hidden_state_loss()
        self.branch_at: str | None = None
        self._branch: nn.Module | None
        object.__setattr__(self, "_branch", None)
        if branch_at is not None:
            if mode != "concat" or stop_gradient or dropout_rates is not None:
                raise ValueError(
                    "branch_at needs mode='concat', stop_gradient=False and no dropout_rates "
                    "(the upper layers run once on the repeated batch)"
                )
            name, module = resolve_branch(model, branch_at)
            self.branch_at = name
            object.__setattr__(self, "_branch", module)
        self.step = 0
        self.unlabeled_step = 0
        self._warned: set[str] = set()

    # -- state ---------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, int]:
        return {"step": self.step, "unlabeled_step": self.unlabeled_step}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        for name in ("step", "unlabeled_step"):
            if isinstance(state.get(name), int):
                setattr(self, name, state[name])

    @property
    def every_k_steps(self) -> int:
        """The consistency term is used on training calls ``0, k, 2k, ...`` (labeled and
        unlabeled calls counted apart)."""
        return self.schedule.every_k_steps

    def current_alpha(self) -> float:
        """Alpha for the next labeled training call (after the schedule, if any)."""
        return self.schedule.alpha_at(self.step)

    def applies_consistency(self, step: int | None = None) -> bool:
        """Whether the consistency term is used at ``step`` (default: the next labeled
        call)."""
        return self.schedule.applies_at(self.step if step is None else step)

    # -- forward -------------------------------------------------------------------------
    def forward(self, *args: Any, target: Tensor | None = None, **kwargs: Any) -> Any:
        if not self.training:
            output = self.model(*args, **kwargs)
            if target is None:
                return output
            logits = extract_logits(output, self.logits_key)
            value = self.criterion.task_only(logits, target)
            return RDropOutput(value, value, value.new_zeros(()), 0.0, logits, output)
        if target is None:
            raise ValueError(
                "target is required in training mode: call wrapped(*inputs, target=labels); "
                "for an unlabeled batch use wrapped.unlabeled(*inputs) (consistency term only)"
            )
        return self._train_step(args, kwargs, target)

    def unlabeled(self, *args: Any, **kwargs: Any) -> RDropOutput:
        """Semi-supervised step on an unlabeled batch: ``loss = (alpha / m) * D`` only
        (``alpha / 2`` for the default two passes).

        Unlabeled calls count on their own, in ``unlabeled_step``: the alpha schedule and
        ``every_k_steps`` read that counter, so a loop with one labeled and one unlabeled
        call per iteration applies both terms on the same iterations and ramps both
        alphas at the same rate."""
        if not self.training:
            raise RuntimeError("unlabeled() is a training step; the wrapper is in eval mode")
        return self._train_step(args, kwargs, None)

    def _train_step(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None
    ) -> RDropOutput:
        if self.warn:
            self._warn_about_setup()
        if target is None:
            step = self.unlabeled_step
            self.unlabeled_step += 1
        else:
            step = self.step
            self.step += 1
        alpha = self.schedule.alpha_at(step)
        if not self.applies_consistency(step):
            output = self.model(*args, **kwargs)
            logits = extract_logits(output, self.logits_key)
            if target is None:
                zero = logits.float().sum() * 0.0
                return RDropOutput(zero, zero, zero, alpha, logits, output)
            value = self.criterion.task_only(logits, target)
            return RDropOutput(value, value, value.new_zeros(()), alpha, logits, output)

        if self.output_layer is not None:
            return self._hidden_state_step(args, kwargs, target, alpha)
        if self.mode == "concat" and not self.stop_gradient:
            passes, output = self._concat_passes(args, kwargs, target)
        else:
            passes, output = self._sequential_passes(args, kwargs)
        result = self.criterion.multi_pass(
            passes, target, alpha=alpha, task_passes=1 if self.stop_gradient else None
        )
        result.logits = passes[0]
        result.outputs = output
        return result

    def _concat_passes(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None
    ) -> tuple[list[Tensor], Any]:
        m = self.num_passes
        batch_size = target.shape[0] if target is not None and target.ndim > 0 else None
        if batch_size is None:
            batch_size = find_batch_size((args, kwargs))
        if batch_size is None:
            raise ValueError(
                "could not find the batch size: no tensor with a batch dimension in the "
                "inputs or the target"
            )
        return forward_passes(
            self.model,
            args,
            kwargs,
            batch_size=batch_size,
            num_passes=m,
            logits_key=self.logits_key,
            remedy="If it cannot, use RDrop(..., mode='sequential')",
            split_hint="for sequence-first models use batch_first=True, or select the "
            "logits with logits_key=",
            branch=None if self._branch is None else (self.model, self._branch),
        )

    def _check_hidden_state_loss(self) -> None:
        criterion = self.criterion
        unsupported = {
            "num_passes": self.num_passes != 2,
            "mode": self.mode != "concat",
            "stop_gradient": self.stop_gradient,
            "task": criterion.task != "cross_entropy",
            "consistency": criterion.consistency != "kl",
        }
        named = [name for name, bad in unsupported.items() if bad]
        if named:
            raise ValueError(
                f"output_layer= (the loss from the hidden states) needs num_passes=2, "
                f"mode='concat', stop_gradient=False and task='cross_entropy' with "
                f"consistency='kl'; got other values for {', '.join(named)}"
            )

    def _hidden_state_step(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None, alpha: float
    ) -> RDropOutput:
        """One forward on ``[x; x]`` up to the output layer, then the chunked loss."""
        layer = self.output_layer
        assert layer is not None
        with output_layer_bypassed(layer):
            passes, output = self._concat_passes(args, kwargs, target)
        # The model's own [2B, ..., H] output when the passes are its two halves, else a
        # copy (the output was reshaped or transposed after the output layer's input).
        hidden = concatenated_base(*passes)
        if hidden is None or hidden.shape[1:] != passes[0].shape[1:]:
            hidden = torch.cat(passes)
        if hidden.shape[-1] != layer.in_features:
            raise ValueError(
                f"with output_layer= the model output must be the layer's input "
                f"[..., {layer.in_features}], got shape {tuple(hidden.shape)}: the layer's "
                "output is transformed after it (select the right tensor with logits_key=)"
            )
        criterion = self.criterion
        result = rdrop_linear_cross_entropy(
            hidden,
            layer.weight,
            target,
            alpha,
            bias=layer.bias,
            ignore_index=criterion.ignore_index,
            label_smoothing=criterion.label_smoothing,
            check_finite=criterion.check_finite,
        )
        result.outputs = output
        return result

    def _sequential_passes(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Tensor], Any]:
        passes: list[Tensor] = []
        first_output: Any = None
        for i in range(self.num_passes):
            rate = (
                dropout_rate(self.model, self.dropout_rates[i])
                if self.dropout_rates is not None
                else nullcontext()
            )
            grad = torch.no_grad() if self.stop_gradient and i > 0 else nullcontext()
            with rate, grad:
                output = self.model(*args, **kwargs)
            logits = extract_logits(output, self.logits_key)
            if passes and logits.shape != passes[0].shape:
                raise ValueError(
                    f"pass {i} returned logits of shape {tuple(logits.shape)}, pass 0 "
                    f"{tuple(passes[0].shape)}: the passes must agree"
                )
            passes.append(logits)
            if i == 0:
                first_output = output
        return passes, first_output

    # -- warnings ------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RDropWarning, stacklevel=4)

    def _warn_about_setup(self) -> None:
        if not self.model.training:
            self._warn_once(
                "eval",
                "RDrop is in training mode but the wrapped model is in eval mode, so dropout "
                "is off and the consistency term is ~0; call .train() on the RDrop wrapper "
                "(it sets the model's mode), not on an inner module",
            )
        elif self.dropout_rates is not None and not any(self.dropout_rates):
            self._warn_once(
                "dropout",
                f"dropout_rates={self.dropout_rates} are all 0: every pass runs without "
                "dropout, the passes are identical, the consistency term is 0 and R-Drop "
                "does nothing; give at least one rate > 0",
            )
        elif "dropout" not in self._warned and not active_dropout_modules(self.model):
            rates = self.dropout_rates
            if rates is None:
                self._warn_once(
                    "dropout",
                    "the model has no active dropout module (nn.Dropout with p > 0): both "
                    "passes are identical, the consistency term is 0 and R-Drop does nothing. "
                    "Enable dropout (e.g. hidden_dropout_prob in a Hugging Face config); if "
                    "the model uses functional F.dropout, pass warn=False",
                )
        if self.mode == "concat" and not self.stop_gradient and "batchnorm" not in self._warned:
            names = training_batchnorm_modules(self.model)
            if names:
                self._warn_once(
                    "batchnorm",
                    f"BatchNorm layers in training mode ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''}) see the duplicated batch [x; x]: "
                    "their statistics are shared by both passes, so they add no difference "
                    "between passes. This is usually fine; use mode='sequential' for "
                    "per-pass statistics (running stats then update once per pass)",
                )

    def extra_repr(self) -> str:
        alpha = self.schedule.alpha if callable(self.schedule.alpha) else self.current_alpha()
        parts = [f"alpha={alpha}", f"num_passes={self.num_passes}", f"mode={self.mode!r}"]
        if self.every_k_steps != 1:
            parts.append(f"every_k_steps={self.every_k_steps}")
        if self.dropout_rates is not None:
            parts.append(f"dropout_rates={self.dropout_rates}")
        if self.stop_gradient:
            parts.append("stop_gradient=True")
        if self.output_layer is not None:
            parts.append("output_layer=" + type(self.output_layer).__name__)
        if self.branch_at is not None:
            parts.append(f"branch_at={self.branch_at!r}")
        return ", ".join(parts)
