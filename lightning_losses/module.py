"""``LossModule``: one LightningModule for any model and any loss.

How a step finds its inputs
---------------------------
1. The batch becomes a dict: a mapping stays as it is; a tuple/list is named by ``batch_keys``
   (default ``("inputs", "target")``, what a ``TensorDataset`` yields); a tensor is ``batch_keys[0]``.
2. The model is called with its ``forward`` parameters looked up by name in the batch (renamed by
   ``model_input_map``). A model with a single required parameter the batch does not name gets
   ``batch[batch_keys[0]]`` (so ``nn.Sequential`` and torchvision-style ``forward(x)`` work as they are).
3. The model's result becomes the *outputs*: a dict stays as it is; a tensor is stored under
   ``output_key`` (default ``"logits"``).
4. The loss is called with its ``forward`` parameters (``__call__``'s, when a class overrides it as the
   guide's protocol does) looked up by name in outputs, then batch (renamed by ``input_map``). Special
   names: ``data`` (the whole batch), ``model`` (the model), ``global_valid_toks`` and
   ``global_valid_seqs`` (the numbers of valid tokens / sequences of the global batch, summed over
   DDP ranks, from the batch keys ``loss.token_mask_key`` / ``loss.sample_mask_key``, defaults
   ``token_mask`` / ``sample_mask``; without a sample mask every sequence counts).
   Half-precision floating inputs are cast to float32 first (losses compute in fp32).

Exact DDP gradients
-------------------
DDP averages gradients over ranks. A loss given ``global_valid_toks`` / ``global_valid_seqs`` (a
``TOKEN_LEVEL``/``SEQUENCE_LEVEL`` loss) is a rank's *share* of the global batch's loss (its sum divided
by the global count), so the backward pass uses ``world_size × loss``: after DDP's average, the gradient
is exactly the gradient of the whole global batch's loss in one process. Logged values of the loss (and
of ``loss.partial_metrics``) are scaled the same way, so their epoch means, synced over ranks, equal a
single-process run's. Losses given no global count (``torch.nn.CrossEntropyLoss``) are means over
their own rank's batch, as usual.

Micro-batches (``micro_batch_size``)
------------------------------------
With ``micro_batch_size=m`` each loaded batch is this rank's share of one optimizer step. The global
counts are taken once for the whole loaded batch (one all-reduce over ranks), the batch is cut into
micro-batches of ``m`` rows (every tensor whose first dimension is the batch size; other values are
passed whole), each micro-batch's loss, a partial sum over that count, is backpropagated at once (so
only one micro-batch's activations are alive), DDP gradient synchronization waits for the last
micro-batch, and one optimizer step follows. The accumulated gradient is exactly the gradient of the
loaded batch's loss (for a loss given no count, a local mean, each micro-batch is weighed by its
share of the rows). This uses Lightning's manual optimization, which refuses the Trainer's
``gradient_clip_val`` and ``accumulate_grad_batches``: clip with this module's ``gradient_clip_val`` /
``gradient_clip_algorithm`` instead (applied in ``on_before_optimizer_step``, after a ``16-mixed``
gradient scaler has unscaled the gradients, so the threshold is in true gradient units);
``precision="bf16-mixed"`` / ``"16-mixed"`` work as usual (``manual_backward`` scales the loss,
the optimizer step unscales and skips steps with inf gradients). LR schedulers are stepped here as
Lightning would (per step or per epoch, ``ReduceLROnPlateau`` with ``lr_scheduler_monitor``).

How it differs from ``Trainer(accumulate_grad_batches=k)``: there each of the ``k`` loaded batches is
a separate step with its *own* global counts, so a token-level loss averages each batch over its own
tokens and the ``k`` means are added: batches with few valid tokens weigh as much as batches with
many. Here the counts cover the whole loaded batch, so every valid token weighs the same, as in one
big batch. Use ``micro_batch_size`` to fit a large global batch in memory with exact normalization;
``accumulate_grad_batches`` when per-batch means are what you want.

Non-finite losses and gradients (``nan_policy``)
------------------------------------------------
Checked once per optimizer step, after the backward pass: a non-finite training loss (any batch of an
``accumulate_grad_batches`` window, any micro-batch) or a non-finite gradient (even with a finite loss:
e.g. ``sqrt`` at 0). One fused op, a gradient scaler's exact check of every element (with a scale of 1: no
value changes), flags a non-finite loss or gradient element; on several ranks the flags are all-reduced,
so every rank takes the same branch; one host read reads the flag. ``"raise"``: ``FloatingPointError`` on
every rank. ``"skip"``: the gradients are discarded and the optimizer step is not taken (weights and
optimizer state untouched; Lightning still counts it in ``global_step``, and in automatic optimization a
per-step LR scheduler still steps), ``train/skipped_steps`` counts such steps (logged at each epoch's end;
the buffer ``skipped_steps`` is the live count); a non-finite loss is logged as 0 with weight 0, so it
stays out of the epoch means (task metrics still see the step's predictions). On an accelerator, with a
fused ``torch.optim.Adam`` / ``AdamW`` (``fused=True``; without ``micro_batch_size`` or a ``16-mixed``
scaler) ``"skip"`` reads nothing: the check becomes the optimizer's ``found_inf``, as a gradient scaler's
result does, and its kernel skips the step on the device (``on_before_optimizer_step`` hooks see the
step's gradients: a gradient-norm callback logs a non-finite norm). Fused SGD is not used so: its kernel's
skip of a first step leaves the momentum buffer uninitialized. On the CPU, where a read is no sync, the
host check stays. ``"warn"``: like ``"skip"`` and a warning. Under ``precision="16-mixed"`` the gradient
scaler already skips steps with inf/NaN gradients (and lowers its scale): only losses are checked there.
``"ignore"``: no check and no host read (a NaN reaches the weights); on a GPU the read is a sync: the host
waits for the device to finish the step before it queues the next one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.torch_version import TorchVersion
from torchmetrics import Metric, MetricCollection

from lightning_losses.binding import Binding
from lightning_losses.callbacks.resume import check_checkpoint
from lightning_losses.loss_logger import LossLogger
from lightning_losses.metrics import CounterValue
from lightning_losses.protocol import LossType, micro_batch_share, split_output

try:  # set by LightningCLI while it instantiates the module: the config (class paths) to save
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older/newer Lightning without it
    _given_hyperparameters = None

__all__ = ["LossModule"]

Stage = Literal["train", "val", "test"]
_STAGES: tuple[Stage, ...] = ("train", "val", "test")
_MODULE_ARGUMENTS = ["model", "loss", "optimizer", "lr_scheduler", "metrics"]
# Their fused kernels leave weights and state untouched when the optimizer's `found_inf` is 1 (what
# GradScaler sets). Fused SGD does not: a skipped first step leaves its momentum buffer uninitialized.
_SKIP_ON_DEVICE = (torch.optim.Adam, torch.optim.AdamW)
# The dtypes the non-finite check runs through a gradient scaler's fused op on, per device type: CUDA's
# kernel has no bfloat16 (and checks float64 values as float32), the CPU's exists from torch 2.3. The
# other tensors are checked by their norms (NaN and inf propagate; a norm that overflows flags too).
_FUSED_CHECK_DTYPES: dict[str, frozenset[torch.dtype]] = {
    "cuda": frozenset({torch.float16, torch.float32, torch.float64}),
}
if TorchVersion(torch.__version__) >= "2.3":
    _FUSED_CHECK_DTYPES["cpu"] = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class LossModule(pl.LightningModule):
    """Train any ``model`` with any ``loss``; log every metric the loss returns.

    Args:
        model: the network. Called with its ``forward`` parameters resolved by name from the batch.
        loss: any ``nn.Module`` loss: a library loss returning ``LossOutput``, a loss written to the
            guide's protocol, or a plain ``torch.nn`` loss returning a tensor (logged as ``loss``).
        optimizer: a callable taking the trainable parameters; when the loss has some (learned task
            weights), two parameter groups: the others, and the loss's with ``weight_decay=0``.
        lr_scheduler: a callable taking the optimizer, or None.
        metrics: task metrics computed on ``outputs[preds_key]`` against ``batch[target_key]``,
            logged per stage as ``<stage>/<name>`` at epoch end.
        input_map: loss parameter name → key in the model outputs or batch.
        model_input_map: model parameter name → key in the batch.
        output_key: the name of a model's tensor output.
        batch_keys: names of the elements of a tuple/list batch.
        preds_key / target_key: where the task metrics read predictions and targets.
        nan_policy: what a non-finite training loss or gradient does: ``"raise"``, ``"skip"`` (no
            optimizer step; on a GPU no host read with a fused Adam/AdamW), ``"warn"`` (skip and warn) or
            ``"ignore"`` (no check, no host read per step); see the module docstring.
        lr_scheduler_interval / lr_scheduler_monitor: how Lightning steps the scheduler.
        upcast_inputs: cast fp16/bf16 floating loss inputs to float32.
        micro_batch_size: split each loaded training batch into micro-batches of this many rows and take
            one optimizer step per loaded batch, with the counts of the whole batch (see the module
            docstring). ``None``: one forward/backward per loaded batch.
        gradient_clip_val / gradient_clip_algorithm: clip gradients before each optimizer step (by
            ``"norm"`` or ``"value"``), after AMP unscaling. Required instead of the Trainer's
            options with ``micro_batch_size``; usable without it too (not both at once).

    Metrics are logged as ``train/<key>`` (each step, this rank's value, no sync),
    ``train/<key>_epoch``, ``val/<key>`` and ``test/<key>`` (epoch means synced over ranks).

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> module = LossModule(
        ...     torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss(), input_map={"input": "logits"}
        ... )
        >>> trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
        >>> sorted(trainer.callback_metrics)
        ['train/loss', 'train/loss_epoch']
    """

    # where `nan_policy="skip"` keeps the host check with a fused Adam/AdamW: on the CPU a read is no
    # sync, and costs less than the ops that replace it (4-5 points of `benchmarks.module_overhead`'s step)
    _host_check_device_types: frozenset[str] = frozenset({"cpu"})

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        metrics: MetricCollection | dict[str, Metric] | None = None,
        input_map: dict[str, str] | None = None,
        model_input_map: dict[str, str] | None = None,
        output_key: str = "logits",
        batch_keys: Sequence[str] = ("inputs", "target"),
        preds_key: str = "logits",
        target_key: str = "target",
        nan_policy: Literal["raise", "skip", "warn", "ignore"] = "raise",
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        upcast_inputs: bool = True,
        micro_batch_size: int | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
    ) -> None:
        super().__init__()
        if _given_hyperparameters is not None and _given_hyperparameters.get() is not None:
            self.save_hyperparameters()  # under LightningCLI: class paths, so checkpoints rebuild
        else:
            self.save_hyperparameters(ignore=_MODULE_ARGUMENTS)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(loss, nn.Module):
            raise TypeError(f"`loss` must be an nn.Module, got {type(loss).__name__}")
        if nan_policy not in ("raise", "skip", "warn", "ignore"):
            raise ValueError(f"`nan_policy` must be 'raise', 'skip', 'warn' or 'ignore', got {nan_policy!r}")
        if len(batch_keys) == 0:
            raise ValueError("`batch_keys` must name at least one element")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"`micro_batch_size` must be a positive integer or None, got {micro_batch_size}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"`gradient_clip_val` must be positive or None, got {gradient_clip_val}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"`gradient_clip_algorithm` must be 'norm' or 'value', got {gradient_clip_algorithm!r}"
            )
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.output_key = output_key
        self.batch_keys = tuple(batch_keys)
        self.preds_key = preds_key
        self.target_key = target_key
        self.nan_policy = nan_policy
        self._skips_steps = nan_policy in ("skip", "warn")
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.upcast_inputs = upcast_inputs
        self.micro_batch_size = micro_batch_size
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.automatic_optimization = micro_batch_size is None
        self.loss_binding = Binding(loss, input_map)
        self.model_binding = Binding(model, model_input_map)
        # the global counts the loss asks for by parameter name (unless renamed to a batch key)
        unrenamed = set(self.loss_binding.names) - set(self.loss_binding.rename)
        self._wanted_counts = frozenset({"global_valid_toks", "global_valid_seqs"} & unrenamed)
        self._wants_data, self._wants_model = "data" in unrenamed, "model" in unrenamed
        self._has_special_inputs = bool(self._wanted_counts) or self._wants_data or self._wants_model
        # the loss's metrics: a weighted mean per key and stage; task metrics: `<stage>_task_metrics`
        self.loss_logger = LossLogger()
        if metrics is not None and not isinstance(metrics, MetricCollection):
            metrics = MetricCollection(dict(metrics))
        self.has_task_metrics = metrics is not None
        if metrics is not None:
            for stage in _STAGES:
                setattr(self, f"{stage}_task_metrics", metrics.clone(prefix=f"{stage}/"))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        if self._skips_steps:  # `train/skipped_steps`, logged once per epoch (see `_log_skipped_steps`)
            self.skipped_steps_value = CounterValue()
        # losses since the last optimizer step (nan_policy); a list, not a tensor attribute: a step would
        # pay for two `nn.Module.__setattr__` calls
        self._unchecked_losses: list[Tensor] = []
        self._check_states: dict[torch.device, _CheckState] = {}  # the non-finite check's, per device

    # ------------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------------

    def batch_as_dict(self, batch: Any) -> dict[str, Any]:
        """The batch as a dict (see the module docstring for tuples and tensors)."""
        if isinstance(batch, Mapping):
            return dict(batch)
        if isinstance(batch, Tensor):
            return {self.batch_keys[0]: batch}
        if isinstance(batch, (tuple, list)):
            if len(batch) != len(self.batch_keys):
                raise ValueError(
                    f"a batch of {len(batch)} elements needs as many names, but `batch_keys` is "
                    f"{list(self.batch_keys)}; set `batch_keys` or yield dicts"
                )
            return dict(zip(self.batch_keys, batch, strict=True))
        raise TypeError(f"a batch must be a dict, tuple, list or tensor, got {type(batch).__name__}")

    def forward(self, batch: Any) -> dict[str, Any]:
        """Run the model on a batch; returns its outputs as a dict."""
        batch = self.batch_as_dict(batch)
        binding = self.model_binding
        source = batch
        if len(binding.required) == 1:  # a one-input model reads the batch's first key by default
            key = binding.source_key(binding.required[0])
            if key not in batch and self.batch_keys[0] in batch:
                source = {**batch, key: batch[self.batch_keys[0]]}
        args, kwargs = binding.bind([source], source_names=("batch",))
        out = self._modules["model"](*args, **kwargs)  # not `self.model`: see `_step`
        if isinstance(out, Tensor):
            return {self.output_key: out}
        if isinstance(out, Mapping):
            return dict(out)
        if isinstance(getattr(out, self.output_key, None), Tensor):  # e.g. an object with `.logits`
            return {self.output_key: getattr(out, self.output_key)}
        raise TypeError(
            f"{type(self.model).__name__} returned a {type(out).__name__}; a model must return a "
            f"tensor, a dict of outputs or an object with a tensor attribute `{self.output_key}` "
            "(`output_key`); wrap it to name a tuple's elements"
        )

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks (a new tensor on several ranks). Under ``torch.distributed``, one
        ``all_reduce`` on its default group, as ``strategy.reduce`` does, but without the ``barrier`` it
        calls first: on NCCL a barrier blocks the host until the device has run all queued work, a
        host-device sync each step."""
        if self._world_size() == 1:
            return tensor
        summed = tensor.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
            return summed
        return self.trainer.strategy.reduce(summed, reduce_op="sum")

    def global_valid_counts(
        self, batch: Mapping[str, Any], token_weights: Tensor | None = None, need_tokens: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(global_valid_toks, global_valid_seqs)`` of this step, summed over ranks in one all-reduce.

        Tokens are counted from ``token_weights`` (what the loss's ``valid_tokens`` says it averages
        over, e.g. its mask without ``ignore_index`` targets) or else ``batch[loss.token_mask_key]``,
        times the sample mask when there is one; sequences from ``batch[loss.sample_mask_key]`` or, without
        it, the batch size. Counts are int64 when every mask is bool/integer, float32 when one holds
        weights. With ``need_tokens=False`` the token count is 0 when there is nothing to count.
        """
        token_key, sample_key = self._mask_keys()
        token_mask = batch.get(token_key) if token_weights is None else token_weights
        sample_mask = batch.get(sample_key)
        if need_tokens and token_mask is None:
            raise ValueError(
                f"{type(self.loss).__name__} needs `global_valid_toks`, counted from the batch key "
                f"'{token_key}', but the batch has keys {sorted(batch)}; add the token mask or set "
                "`token_mask_key` on the loss"
            )
        device = self.device
        # counts made on the device (filled, not copied from the host: a copy would be a sync)
        if sample_mask is not None:
            seqs = sample_mask.sum(dtype=torch.float64)
        else:
            seqs = torch.full((), _batch_size(batch), dtype=torch.float64, device=device)
        if token_mask is not None:
            weights = token_mask
            if sample_mask is not None:
                weights = token_mask * sample_mask.reshape(-1, *([1] * (token_mask.ndim - 1)))
            toks = weights.sum(dtype=torch.float64)
        else:
            toks = torch.zeros((), dtype=torch.float64, device=device)
        counts = self._all_reduce_sum(torch.stack([toks.to(device), seqs.to(device)]))
        masks = [m for m in (token_mask, sample_mask) if m is not None]
        integral = not any(m.is_floating_point() for m in masks)
        counts = counts.round().long() if integral else counts.float()
        return counts[0], counts[1]

    def _mask_keys(self) -> tuple[str, str]:
        """Batch keys of the token and sample masks, renamed like the loss's own mask parameters."""
        token_key = getattr(self.loss, "token_mask_key", "token_mask")
        sample_key = getattr(self.loss, "sample_mask_key", "sample_mask")
        return self.loss_binding.source_key(token_key), self.loss_binding.source_key(sample_key)

    def _counts(self, batch: Mapping[str, Any], kwargs: Mapping[str, Any]) -> _Counts | None:
        """The global counts the loss asks for, from the batch and the loss's ``valid_tokens``.

        An optional ``global_valid_toks`` is left out when there is nothing to count it from (no token
        mask in the batch and no ``valid_tokens`` from the loss): the loss then averages over its own
        inputs.
        """
        wanted = set(self._wanted_counts)
        token_weights = None
        if "global_valid_toks" in wanted:
            valid_tokens = getattr(self.loss, "valid_tokens", None)
            token_weights = valid_tokens(kwargs) if callable(valid_tokens) else None
            optional = "global_valid_toks" not in self.loss_binding.required
            if optional and token_weights is None and self._mask_keys()[0] not in batch:
                wanted.discard("global_valid_toks")
        if not wanted:
            return None
        toks, seqs = self.global_valid_counts(batch, token_weights, "global_valid_toks" in wanted)
        counts = {"global_valid_toks": toks, "global_valid_seqs": seqs}
        # the count the loss divides by: sequences for a SEQUENCE_LEVEL loss given both
        sequence_level = getattr(self.loss, "loss_type", None) == LossType.SEQUENCE_LEVEL
        by_tokens = "global_valid_toks" in wanted and not (sequence_level and "global_valid_seqs" in wanted)
        return _Counts({name: counts[name] for name in wanted}, toks if by_tokens else seqs)

    def _batch_counts(self, batch: dict[str, Any]) -> _Counts | None:
        """The global counts of a whole loaded batch, before any model call (for micro-batches)."""
        wanted = self._wanted_counts
        if not wanted:
            return None
        _, kwargs = self.loss_binding.bind([batch], special=self._special_inputs(batch), missing_ok=True)
        try:
            return self._counts(batch, kwargs)
        except KeyError as error:
            raise ValueError(
                f"with `micro_batch_size`, the global counts of {type(self.loss).__name__} are taken from "
                f"the batch before the model runs, but its `valid_tokens` needs {error}, which the batch "
                f"(keys {sorted(batch)}) does not hold; add a token mask to the batch"
            ) from None

    def _loss_inputs(
        self, batch: dict[str, Any], outputs: dict[str, Any], counts: _Counts | None = None
    ) -> tuple[list, dict, Tensor | None]:
        """The loss's arguments, and the global count it was given (tokens over sequences), if any.

        ``counts``: the counts to pass (a micro-batch gets its loaded batch's); by default they are
        taken from this batch.
        """
        wanted = self._wanted_counts
        special = self._special_inputs(batch) if self._has_special_inputs else None
        args, kwargs = self.loss_binding.bind([outputs, batch], special=special)
        if self.upcast_inputs:  # the batch, the model and the counts are never half-precision tensors
            if args:  # (each comprehension is a call: skipped when there is nothing to cast)
                args = [v.float() if isinstance(v, Tensor) and v.dtype in _HALF else v for v in args]
            if kwargs:
                kwargs = {
                    k: v.float() if isinstance(v, Tensor) and v.dtype in _HALF else v
                    for k, v in kwargs.items()
                }
        if not wanted:
            return args, kwargs, None
        if counts is None:
            counts = self._counts(batch, kwargs)
        for name in wanted.difference(counts.given if counts is not None else ()):
            kwargs.pop(name, None)
        if counts is None:
            return args, kwargs, None
        return args, kwargs | counts.given, counts.divisor

    def _special_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loss parameters filled by ``LossModule`` rather than looked up: those the loss takes
        (the count values are placeholders until the counts are known)."""
        special: dict[str, Any] = dict.fromkeys(self._wanted_counts)
        if self._wants_data:
            special["data"] = batch
        if self._wants_model:
            special["model"] = self._modules["model"]  # not `self.model`: see `_step`
        return special

    # ------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------

    def _step(self, batch: Any, counts: _Counts | None = None, share: float = 1.0) -> _StepResult:
        """Forward and loss of one batch; ``counts`` / ``share`` when it is a micro-batch of a loaded one."""
        batch = self.batch_as_dict(batch)
        outputs = self(batch)
        args, kwargs, global_count = self._loss_inputs(batch, outputs, counts)
        # `_modules[...]`, not `self.loss`: in a training loop (cold caches) nn.Module.__getattr__ takes ~3 µs
        loss_fn = self._modules["loss"]
        if share == 1.0:
            loss, metrics = split_output(loss_fn(*args, **kwargs))
        else:
            with micro_batch_share(share):
                loss, metrics = split_output(loss_fn(*args, **kwargs))
        if loss.ndim != 0:
            raise ValueError(
                f"{type(self.loss).__name__} returned a loss of shape {tuple(loss.shape)}; "
                "it must be a scalar (use reduction='mean' or 'sum')"
            )
        partial = _NOTHING
        if global_count is not None:
            partial = frozenset({"loss", *getattr(self.loss, "partial_metrics", ())})
            scale = self._world_size()
            if scale != 1:
                loss = loss * scale
                metrics = {k: v * scale if k in partial else v for k, v in metrics.items()}
        elif share != 1.0:  # a local mean: this micro-batch's share of the loaded batch's
            loss = loss * share
        device = loss.device  # the model's; a metric a loss made as a Python number is on the CPU
        metrics = {k: v if v.device == device else v.to(device) for k, v in metrics.items()}
        # Epoch means are means over elements: a (rank-summed) globally normalized value weighs as
        # many as its global count, a local mean as many samples as the batch holds.
        batch_size = _batch_size(batch)
        weights = {k: global_count if k in partial else batch_size for k in metrics}
        return _StepResult(loss, metrics, outputs, batch, weights, partial)

    def _log_metrics(
        self,
        stage: Stage,
        metrics: Mapping[str, Tensor],
        weights: Mapping[str, Tensor | int],
        keep: Tensor | None = None,
    ) -> None:
        self._modules["loss_logger"].log_metrics(self, stage, metrics, weights, keep=keep)  # see `_step`

    def _update_task_metrics(
        self, stage: Stage, outputs: Mapping[str, Any], batch: Mapping[str, Any]
    ) -> None:
        if not self.has_task_metrics:
            return
        if self.preds_key not in outputs or self.target_key not in batch:
            raise ValueError(
                f"task metrics read outputs['{self.preds_key}'] and batch['{self.target_key}'], but the "
                f"outputs have keys {sorted(outputs)} and the batch has keys {sorted(batch)}; "
                "set `preds_key` / `target_key`"
            )
        collection: MetricCollection = getattr(self, f"{stage}_task_metrics")
        clash = {key.split("/", 1)[1] for key in collection} & set(self.loss_logger[stage].keys())
        if clash:
            raise ValueError(
                f"the task metrics {sorted(clash)} have the names of metrics the loss "
                f"{type(self.loss).__name__} logs; give them other names in `metrics`"
            )
        collection.update(outputs[self.preds_key].detach(), batch[self.target_key])
        self.log_dict(collection, on_step=False, on_epoch=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.micro_batch_size is not None:
            return self._micro_batch_training_step(batch)
        loss, metrics, outputs, batch, weights, _ = self._step(batch)
        self._track_nonfinite(loss)  # no host read here: `optimizer_step` decides after backward
        keep = None
        if self._skips_steps:  # a non-finite loss: logged as 0 with weight 0, out of the epoch means
            keep = torch.isfinite(loss.detach())
            self._log_skipped_steps()
        self._log_metrics("train", metrics, weights, keep)
        self._update_task_metrics("train", outputs, batch)
        return loss

    def _track_nonfinite(self, loss: Tensor) -> None:
        """Keep ``loss`` (every one of an accumulation window) for the check at the optimizer step."""
        if self.nan_policy != "ignore":
            self._unchecked_losses.append(loss.detach())

    def _gradients(self, optimizer: Any) -> list[Tensor]:
        """The gradients the optimizer would use; none under a ``16-mixed`` gradient scaler, which skips
        steps with inf/NaN gradients itself."""
        if getattr(self._trainer.precision_plugin, "scaler", None) is not None:
            return []
        # unwrapped: a LightningOptimizer forwards `param_groups` through its __getattr__ (~3.5 µs in a loop)
        groups = getattr(optimizer, "optimizer", optimizer).param_groups
        return [grad for group in groups for p in group["params"] if (grad := p.grad) is not None]

    def _nonfinite_ranks(self, losses: list[Tensor], optimizer: Any) -> Tensor:
        """``[ranks with a non-finite loss, ranks with a non-finite gradient]``: the diagnosis after a
        failed check (more reads and one all-reduce, which every rank reaches together)."""
        loss_flag = float(any(not bool(torch.isfinite(loss)) for loss in losses))
        grad_flag = float(any(not bool(torch.isfinite(g).all()) for g in self._gradients(optimizer)))
        return self._all_reduce_sum(torch.tensor([loss_flag, grad_flag], device=self.device))

    def _take_unchecked_losses(self) -> list[Tensor]:
        losses = self._unchecked_losses.copy()
        self._unchecked_losses.clear()
        return losses

    def _nonfinite_flag(self, losses: list[Tensor], optimizer: Any, reuse_flag: bool) -> Tensor | None:
        """Non-zero when a rank holds a non-finite element in ``losses`` or the optimizer's gradients: a
        float32 scalar on the device (summed over ranks); None when there is nothing to check.

        One fused ``torch._amp_foreach_non_finite_check_and_unscale_`` (a gradient scaler's check,
        element by element) with an inverse scale of 1, which writes every value back as it was, over
        the tensors of the dtypes it takes (``_FUSED_CHECK_DTYPES``); the others by their norms, which
        a value near its dtype's largest can overflow. (In a plain CPU loop the fused op takes half the
        time of the ``_foreach_norm`` + ``stack`` + ``tolist`` it replaced.)

        ``reuse_flag``: the finding goes into the device's ``_CheckState.flag`` (for a check that reads
        it at once; a failed check must zero it again with ``_clear_check_flags``), else into a new
        tensor."""
        tensors = [*self._gradients(optimizer), *losses]
        if not tensors:
            return None
        device = tensors[0].device  # not `self.device`: a property call costs ~3 µs in a training loop
        check = self._check_states.get(device) or self._new_check_state(device)
        flag = check.flag if reuse_flag else torch.zeros((), dtype=torch.float32, device=device)
        fused = [t for t in tensors if t.dtype in check.fused_dtypes]
        if fused:
            torch._amp_foreach_non_finite_check_and_unscale_(fused, flag, check.unit)
        if len(fused) < len(tensors):
            norms = torch._foreach_norm([t for t in tensors if t.dtype not in check.fused_dtypes])
            flag.add_(torch.stack(norms).sum().isfinite().logical_not_())
        return self._all_reduce_sum(flag)

    def _new_check_state(self, device: torch.device) -> _CheckState:
        flag, unit = (torch.full((), value, dtype=torch.float32, device=device) for value in (0, 1))
        fused_dtypes = _FUSED_CHECK_DTYPES.get(device.type, frozenset())
        state = self._check_states[device] = _CheckState(flag, unit, fused_dtypes)
        return state

    def _clear_check_flags(self) -> None:
        for state in self._check_states.values():
            state.flag.zero_()

    def _found_inf_on_device(self, optimizer: Any) -> Tensor | None:
        """``nan_policy="skip"`` with a fused ``Adam`` / ``AdamW`` (``fused=True``, no gradient scaler) on
        an accelerator: the optimizer's ``found_inf`` (1.0 when :meth:`_nonfinite_flag` is not 0, else
        0.0), made on the device, so the fused kernel decides the step's skip with no host read. None
        otherwise (the host check decides)."""
        if self.nan_policy != "skip":
            return None
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        if (
            type(inner) not in _SKIP_ON_DEVICE
            or not all(group.get("fused") for group in inner.param_groups)
            or getattr(self._trainer.precision_plugin, "scaler", None) is not None  # it sets found_inf
            or self.device.type in self._host_check_device_types
        ):
            return None
        # a new flag each step: the optimizer's kernel reads it after this returns
        flag = self._nonfinite_flag(self._take_unchecked_losses(), optimizer, reuse_flag=False)
        if flag is None:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return flag.clamp_max_(1.0)  # the kernel skips where found_inf is 1 (flags add up over ranks)

    def _step_is_finite(self, optimizer: Any) -> bool:
        """The one host read per optimizer step, of :meth:`_nonfinite_flag`; applies ``nan_policy``
        (raise, or zero the gradients)."""
        if self.nan_policy == "ignore":
            return True
        losses = self._take_unchecked_losses()
        flag = self._nonfinite_flag(losses, optimizer, reuse_flag=True)
        if flag is None or flag.item() == 0:  # the one host read per step, alike on every rank
            return True
        self._clear_check_flags()  # for the next step's check (before a raise: a caught error may train on)
        loss_ranks, grad_ranks = self._nonfinite_ranks(losses, optimizer).tolist()
        if loss_ranks == 0 and grad_ranks == 0:  # a norm of finite values overflowed (see the flag)
            return True
        self._report_non_finite(int(loss_ranks), int(grad_ranks), optimizer)
        self.skipped_steps.add_(1)  # in place: `skipped_steps_value` reads this tensor
        optimizer.zero_grad(set_to_none=True)
        return False

    def _micro_batch_training_step(self, batch: Any) -> Tensor:
        """One optimizer step over a loaded batch cut into micro-batches (see the module docstring)."""
        batch = self.batch_as_dict(batch)
        optimizer = self.optimizers()
        counts = self._batch_counts(batch)
        parts = split_batch(batch, self.micro_batch_size)
        total = torch.zeros((), device=self.device)
        metrics: dict[str, Tensor] = {}
        batch_size = _batch_size(batch)
        for index, part in enumerate(parts):
            share = _batch_size(part) / batch_size
            with optimizer.toggle_model(sync_grad=index == len(parts) - 1):  # DDP syncs on the last
                result = self._step(part, counts, share)
                self.manual_backward(result.loss)
            total = total + result.loss.detach()
            for key, value in result.metrics.items():  # shares of the global value add up; means mix
                value = value if key in result.partial else value * share
                metrics[key] = metrics[key] + value if key in metrics else value
            self._update_task_metrics("train", result.outputs, part)
        self._track_nonfinite(total)
        if self._step_is_finite(optimizer):  # the one host read per step, after every backward
            global_count = counts.divisor if counts is not None else batch_size
            self._log_metrics(
                "train", metrics, {k: global_count if k in result.partial else batch_size for k in metrics}
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._step_schedulers("step")
        if self._skips_steps:
            self._log_skipped_steps()
        return total

    def _log_skipped_steps(self) -> None:
        """``train/skipped_steps``: the count so far, at each epoch's end. A ``CounterValue`` of the
        in-place counter, logged once per epoch: logging the count each step cost a ``self.log`` call a
        step, a quarter of a small model's step (``"skip"`` took +33% to +38% over the hand-written
        module in ``benchmarks.module_overhead``, +6% to +8% now)."""
        value = self._modules["skipped_steps_value"]  # see `_step`
        if not value.claim_logging(self._trainer):
            return
        value.update(self.skipped_steps)
        self.log("train/skipped_steps", value, on_step=False, on_epoch=True)

    def _step_schedulers(self, interval: str) -> None:
        """Step the LR scheduler under manual optimization, as Lightning does in automatic mode."""
        if self.lr_scheduler_factory is None or self.lr_scheduler_interval != interval:
            return
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.trainer.callback_metrics.get(self.lr_scheduler_monitor)
            if value is None:
                raise ValueError(
                    f"ReduceLROnPlateau monitors `lr_scheduler_monitor` = {self.lr_scheduler_monitor!r}, "
                    f"which was not logged; logged: {sorted(self.trainer.callback_metrics)}"
                )
            scheduler.step(value)
        else:
            scheduler.step()

    def on_train_start(self) -> None:
        self._unchecked_losses.clear()  # a fit interrupted between a step and its optimizer step left one

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            self._step_schedulers("epoch")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # after the precision plugin unscaled 16-mixed gradients (Lightning issue #18089 is about
        # clipping in training_step, before that)
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def _report_non_finite(self, loss_ranks: int, grad_ranks: int, optimizer: Any) -> None:
        """Raise or warn (``nan_policy``) about the non-finite losses / gradients of this step."""
        world = self._world_size()
        if loss_ranks:
            what = f"non-finite training loss on {loss_ranks} of {world} rank(s)"
        else:  # gradients are read again only here, on the failure path
            names = {id(p): n for n, p in self.named_parameters()}
            bad = [
                names.get(id(p), "?")
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            shown = shown or "on another rank"
            what = f"non-finite gradient with a finite training loss (parameters: {shown})"
        message = f"{what} at global step {self.global_step}"
        if self.nan_policy == "raise":
            raise FloatingPointError(message + "; set nan_policy='skip' to skip such steps")
        if self.nan_policy == "warn":
            rank_zero_warn(message + "; skipping the optimizer step")

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        result = optimizer_closure()  # forward + backward of the last batch of the window
        found_inf = self._found_inf_on_device(optimizer)
        if found_inf is not None:  # the fused kernel skips the step when found_inf is 1: no host read
            inner = getattr(optimizer, "optimizer", optimizer)
            inner.found_inf = found_inf
            try:
                optimizer.step(closure=lambda: result)
            finally:
                del inner.found_inf
            self.skipped_steps.add_(found_inf.to(self.skipped_steps.dtype))
        elif self._step_is_finite(optimizer):  # the one host read per step
            optimizer.step(closure=lambda: result)  # the precision plugin unscales, clips, steps
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step("test", batch)

    def _eval_step(self, stage: Stage, batch: Any) -> Tensor:
        loss, metrics, outputs, batch, weights, _ = self._step(batch)
        self._log_metrics(stage, metrics, weights)
        self._update_task_metrics(stage, outputs, batch)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self(batch)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``LightningModule.load_from_checkpoint`` after ``callbacks.check_checkpoint``: a truncated or
        corrupted local file is one clear ``CheckpointError`` naming it."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            check_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # optimization
    # ------------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """The optimizer over every trainable parameter; the loss's own (learned task weights,
        temperatures) form a second group without weight decay, which would pull them towards 0."""
        in_loss = {id(p) for p in self.loss.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        loss_params = [p for p in trainable if id(p) in in_loss]
        if loss_params:
            others = [p for p in trainable if id(p) not in in_loss]
            optimizer = self.optimizer_factory(
                [{"params": others}, {"params": loss_params, "weight_decay": 0.0}]
            )
        else:
            optimizer = self.optimizer_factory(trainable)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if not self.automatic_optimization:  # stepped by `_step_schedulers`
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.lr_scheduler_interval,
                "monitor": self.lr_scheduler_monitor,
            },
        }


class _StepResult(NamedTuple):
    loss: Tensor
    metrics: dict[str, Tensor]
    outputs: dict[str, Any]
    batch: dict[str, Any]
    weights: dict[str, Tensor | int]
    partial: frozenset[str]  # metric keys that are shares of a globally normalized value


class _CheckState(NamedTuple):
    """What the non-finite check reuses on one device. A new tensor a step costs ~5 µs in a training loop."""

    flag: Tensor  # the host check's float32 flag, zero between steps: a failed check sets it and zeroes it
    unit: Tensor  # the fused check's inverse scale, 1
    fused_dtypes: frozenset[torch.dtype]  # the dtypes the fused check takes on this device


class _Counts(NamedTuple):
    given: dict[str, Tensor]  # what the loss receives: global_valid_toks and/or global_valid_seqs
    divisor: Tensor  # the count it divides by


def split_batch(batch: Mapping[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """Cut a batch dict into micro-batches of ``micro_batch_size`` rows.

    Every tensor whose first dimension is the batch size is sliced; other values go whole to each part.

    >>> parts = split_batch({"x": torch.arange(5), "scale": 2.0}, 2)
    >>> [part["x"].tolist() for part in parts], parts[-1]["scale"]
    ([[0, 1], [2, 3], [4]], 2.0)
    """
    size = _batch_size(batch)
    return [
        {
            key: value[start : start + micro_batch_size]
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == size
            else value
            for key, value in batch.items()
        }
        for start in range(0, size, micro_batch_size)
    ]


_NOTHING: frozenset[str] = frozenset()
_HALF = (torch.float16, torch.bfloat16)  # what `upcast_inputs` casts to float32


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim > 0:
            return value.shape[0]
    return 1
