"""``MultiTaskLoss`` (``multi_task``): static task weights or learned uncertainty weighting."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.functional.multi_task import effective_task_weights, multi_task_loss
from lightning_losses.losses.combined import COUNT_NAMES, CompositeLoss, LossSpec, build_components
from lightning_losses.protocol import LossOutput, LossType, check_class_targets, check_ndim, compute_dtype
from lightning_losses.registry import register_loss

__all__ = ["MultiTaskLoss"]


def _take_rows(value: Any, rows: Tensor, batch_size: int) -> Any:
    """The ``rows`` of a per-sample tensor (first dimension ``batch_size``), also inside a dict."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value.index_select(0, rows)
    if isinstance(value, Mapping):
        return {key: _take_rows(item, rows, batch_size) for key, item in value.items()}
    return value


def _holds_no_element(args: list[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether a task's tensor inputs include an empty one (a batch of no sample): a shape, no sync."""
    values = [*args, *(v for k, v in kwargs.items() if k not in ("model", *COUNT_NAMES))]
    return any(isinstance(v, Tensor) and v.ndim > 0 and v.numel() == 0 for v in values)


def _restrict_mask(mask: Tensor | None, rows: Tensor, task: str, target: Any = None) -> Tensor:
    """``mask`` (``[B, ...]``, bool or weights) limited to the samples ``rows`` (``[B]`` bool).

    Without a mask, ``rows`` broadcast to the shape of the task's ``target`` when it has one (a
    token-level ``[B, T]`` or multilabel ``[B, C]`` target needs a mask of its shape), else ``rows``.
    """
    batch_size = rows.shape[0]
    if mask is None:
        if not isinstance(target, Tensor) or target.ndim <= 1:
            return rows
        if target.shape[0] != batch_size:
            raise ValueError(
                f"the `target` of task {task!r} must have the batch size {batch_size} of `task_ids` as its "
                f"first dimension, got shape {tuple(target.shape)}"
            )
        return rows.reshape(-1, *([1] * (target.ndim - 1))).expand(target.shape).contiguous()
    if mask.ndim == 0 or mask.shape[0] != batch_size:
        raise ValueError(
            f"the `mask` of task {task!r} must have the batch size {batch_size} of `task_ids` as its "
            f"first dimension, got shape {tuple(mask.shape)}"
        )
    rows = rows.reshape(-1, *([1] * (mask.ndim - 1)))
    return mask & rows if mask.dtype == torch.bool else mask * rows.to(mask.dtype)


@register_loss("multi_task")
class MultiTaskLoss(CompositeLoss):
    r"""Multi-task loss with static weights and optional learned uncertainty weighting.

    .. math:: L = \sum_i w_i \left(e^{-s_i} L_i + s_i\right)

    with one learned log-variance :math:`s_i = \log\sigma_i^2` per task (an ``nn.Parameter``, trained
    with the model and saved in checkpoints), from Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics" (CVPR 2018). For fixed :math:`L_i` the
    optimum is :math:`e^{s_i} = L_i`: a task with a large loss gets a small weight. ``regression_tasks``
    use the paper's Gaussian-likelihood term :math:`\tfrac12 e^{-s_i} L_i + \tfrac12 s_i`
    (:math:`\tfrac{1}{2\sigma^2}L + \log\sigma`, same optimum). Without ``uncertainty_weighting``,
    :math:`L = \sum_i w_i L_i`. See :func:`lightning_losses.functional.multi_task_loss`.

    Two ways to give the tasks their inputs, which may be combined:

    - **Per-task inputs** (e.g. a model returning ``{"digit_logits": ..., "ink_pred": ...}``): each task's
      loss gets the inputs named by its own ``forward`` parameters, renamed by ``input_maps``
      (``{task: {parameter: input name}}``) or an ``input_map`` in its spec dict.
    - **Per-sample task ids** (the guide's ``predictions, targets, task_ids``): ``task_ids [B]`` assigns
      sample ``b`` to task ``task_ids[b]``, the index of a task in ``tasks``. Task ``k``'s loss sees only
      its samples, as a ``mask`` (static shapes, no host sync): its own mask (``[B, ...]``) times
      ``task_ids == k``, or without one ``task_ids == k`` broadcast to the shape of its ``target``
      (``[B, T]`` tokens, ``[B, C]`` multilabel). So each task's loss must take a ``mask`` (the library's
      do: ``cross_entropy``, ``mse``, ``focal``, ...); a loss without one (``torch.nn.MSELoss``) is
      refused with a ``ValueError`` unless ``select_task_rows=True``, which gives it its rows of every
      input whose first dimension is ``B`` (a boolean selection: one host-device sync per such task per
      step on an accelerator). Task losses are then means over this batch's samples of the task: no
      global counts.

    A task is *absent* when it has no valid element (no sample in ``task_ids``, an all-zero ``mask``, an
    empty input tensor):
    it contributes exactly 0 (and 0 gradient), not NaN, and its :math:`s_i` is not pulled down by a
    loss of 0. Under DDP, presence is decided where the task loss is normalized, so that the
    :math:`s_i` term is weighed like :math:`e^{-s_i} L_i`: a task given a global count
    (``global_valid_toks``: a share of the global batch's mean) is present when that *global* count is
    positive, the same on every rank (each rank adds its share :math:`s_i / R`, so the gradient after
    DDP's average is the one-process gradient); a task averaged over this rank's own samples (``task_ids``
    mode, or a mask other than the counted one) is present when this rank has a valid element (each
    rank's Kendall term on its own mean, as DDP averages per-rank means). Global counts and DDP: see
    :class:`~lightning_losses.losses.combined.CompositeLoss`.

    Args:
        tasks: a mapping ``{task name: loss spec}`` (a registry name, a ``{name, params}`` or
            ``{class_path, init_args}`` dict, or a module) or a list (tasks named like
            :class:`~lightning_losses.losses.combined.CombinedLoss`'s components).
        task_weights: :math:`w_i \ge 0`, a mapping by task name (or, as in the guide, by task index) or a
            list in task order; 1 for a task left out.
        uncertainty_weighting: learn :math:`s_i`.
        init_log_variance: the initial :math:`s_i` (0: :math:`\sigma_i = 1`).
        regression_tasks: names of the tasks with the ½ (Gaussian) form.
        input_maps: per task, its loss's parameter name → input name.
        select_task_rows: in ``task_ids`` mode, give task losses without a ``mask`` parameter their rows
            (a host-device sync per step on an accelerator) instead of refusing them.

    Metrics: ``loss`` and ``total_loss``; per task ``<task>_loss`` (:math:`L_i`, unweighted; 0 when absent),
    ``<task>_weight`` (the effective weight :math:`w_i e^{-s_i}`, halved for regression tasks),
    ``<task>_sigma`` (:math:`\sigma_i = e^{s_i/2}`, with uncertainty weighting) and the task loss's other
    metrics as ``<task>_<key>``. Every key is returned every step (DDP syncs the same metrics on every
    rank), so a step where a task is absent logs ``<task>_loss = 0``, and ``LossModule``'s epoch mean
    weighs it like any other step (by its batch size, not by the task's samples): where tasks are absent
    from some steps (typical of ``task_ids`` mode) the epoch mean of ``<task>_loss`` is diluted by those
    zeros; it is not the mean over the task's own samples.

    >>> loss_fn = MultiTaskLoss(
    ...     {"digit": "cross_entropy", "ink": "mse"},
    ...     uncertainty_weighting=True,
    ...     input_maps={"digit": {"logits": "digit_logits"}, "ink": {"preds": "ink_pred", "target": "ink"}},
    ... )
    >>> loss, metrics = loss_fn(digit_logits=torch.tensor([[2.0, 0.0]]), target=torch.tensor([0]),
    ...                         ink_pred=torch.tensor([0.5]), ink=torch.tensor([0.0]))
    >>> round(loss.item(), 4), metrics["digit_sigma"].item(), metrics["ink_weight"].item()
    (0.3769, 1.0, 1.0)
    >>> loss_fn.log_variances
    Parameter containing:
    tensor([0., 0.], requires_grad=True)
    """

    def __init__(
        self,
        tasks: Mapping[str, LossSpec] | Sequence[LossSpec],
        task_weights: Mapping[str | int, float] | Sequence[float] | None = None,
        uncertainty_weighting: bool = False,
        init_log_variance: float = 0.0,
        regression_tasks: Sequence[str] = (),
        input_maps: Mapping[str, Mapping[str, str]] | None = None,
        select_task_rows: bool = False,
    ) -> None:
        components, maps = build_components(tasks, "tasks", input_maps)
        super().__init__(components, maps)
        names = list(self.components)
        self.task_names = names
        self.uncertainty_weighting = uncertainty_weighting
        self.select_task_rows = select_task_rows
        self.takes_mask = {
            name: any(p.name == "mask" and p.kind != p.POSITIONAL_ONLY for p in binding.parameters)
            for name, binding in self.bindings.items()
        }
        weights = self._resolve_task_weights(task_weights, names)
        self.register_buffer("task_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.weighted = any(w != 1 for w in weights)  # else the loss needs no multiply by them
        unknown = sorted(set(regression_tasks) - set(names))
        if unknown:
            raise ValueError(f"`regression_tasks` names {unknown}, which are not among the tasks {names}")
        if regression_tasks and not uncertainty_weighting:
            raise ValueError(
                "`regression_tasks` selects the ½ form of the uncertainty term; it needs "
                "`uncertainty_weighting=True`"
            )
        self.regression_tasks = list(regression_tasks)
        regression = torch.tensor([name in self.regression_tasks for name in names])
        self.register_buffer("regression", regression, persistent=False)
        if uncertainty_weighting:
            self.log_variances = nn.Parameter(torch.full((len(names),), float(init_log_variance)))
        else:
            self.register_parameter("log_variances", None)
        partial = ["total_loss"]
        for name in names:
            partial += self.component_partial_metrics(name)
        self.partial_metrics = tuple(partial)

    @staticmethod
    def _resolve_task_weights(
        task_weights: Mapping[str | int, float] | Sequence[float] | None, names: list[str]
    ) -> list[float]:
        if task_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(task_weights, Mapping):
            weights = [1.0] * len(names)
            for key, value in task_weights.items():
                if key in names:
                    index = names.index(key)
                elif isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
                    index = int(key)
                    if not 0 <= index < len(names):
                        raise ValueError(
                            f"`task_weights` has the task index {key}, but there are {len(names)} tasks"
                        )
                else:
                    raise ValueError(f"`task_weights` names {key!r}, which is not among the tasks {names}")
                weights[index] = float(value)
        else:
            if len(task_weights) != len(names):
                raise ValueError(
                    f"`task_weights` must have one weight per task ({len(names)}: {names}), "
                    f"got {len(task_weights)}: {list(task_weights)}"
                )
            weights = [float(w) for w in task_weights]
        if any(not w >= 0 or w == float("inf") for w in weights):
            raise ValueError(
                f"`task_weights` must be finite and >= 0, got {dict(zip(names, weights, strict=True))}"
            )
        return weights

    def extra_parameters(self) -> list[inspect.Parameter]:
        return [
            inspect.Parameter(
                "task_ids", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Tensor | None"
            )
        ]

    def _check_task_ids_mode(self) -> None:
        """Refuse, in ``task_ids`` mode, task losses that can only be restricted by selecting rows."""
        maskless = [name for name, takes in self.takes_mask.items() if not takes]
        if maskless and not self.select_task_rows:
            described = ", ".join(f"{n!r} ({type(self.components[n]).__name__})" for n in maskless)
            raise ValueError(
                f"`task_ids` gives each task its samples as a `mask`, but the task loss(es) {described} "
                "take no `mask` parameter; use a loss that does (the library's: 'mse' for "
                "torch.nn.MSELoss, 'cross_entropy', 'focal', ...) or set `select_task_rows=True` to give "
                "them their rows (a host-device sync per step on an accelerator)"
            )

    def _task_inputs(
        self, index: int, name: str, inputs: Mapping[str, Any], task_ids: Tensor
    ) -> tuple[list[Any], dict[str, Any], Tensor | None]:
        """Task ``index``'s arguments limited to its samples, and whether it has any (None: see its mask)."""
        args, kwargs, _ = self.component_inputs(name, inputs, with_counts=False)
        rows = task_ids == index
        if self.takes_mask[name]:
            kwargs["mask"] = _restrict_mask(kwargs.get("mask"), rows, name, kwargs.get("target"))
            return args, kwargs, None
        taken = rows.nonzero().squeeze(1)  # select_task_rows=True: a host sync on accelerators
        batch_size = task_ids.shape[0]
        args = [_take_rows(value, taken, batch_size) for value in args]
        kwargs = {k: v if k == "model" else _take_rows(v, taken, batch_size) for k, v in kwargs.items()}
        return args, kwargs, rows.any()

    def _globally_present(self, name: str, kwargs: Mapping[str, Any], like: Tensor) -> Tensor:
        """Whether the global count task ``name`` divides by is positive: the same answer on every rank."""
        binding = self.bindings[name]
        given = {c: kwargs[c] for c in COUNT_NAMES if c not in binding.rename and kwargs.get(c) is not None}
        sequence_level = getattr(self.components[name], "loss_type", None) == LossType.SEQUENCE_LEVEL
        preferred = "global_valid_seqs" if sequence_level else "global_valid_toks"
        count = given.get(preferred, next(iter(given.values())))
        if isinstance(count, Tensor):
            return count > 0
        return torch.full((), count > 0, device=like.device)

    def forward(self, **inputs: Any) -> LossOutput:
        self.check_inputs(inputs)
        task_ids = inputs.get("task_ids")
        if task_ids is not None:
            check_ndim("task_ids", task_ids, 1)
            check_class_targets("task_ids", task_ids, len(self.task_names))
            self._check_task_ids_mode()
        scale = self.counted_scale(inputs)
        losses, present, metrics = [], [], {}
        for index, name in enumerate(self.task_names):
            if task_ids is None:
                args, kwargs, counted = self.component_inputs(name, inputs)
                local = None
            else:
                args, kwargs, local = self._task_inputs(index, name, inputs, task_ids)
                counted = False
            mask = kwargs.get("mask")
            if isinstance(mask, Tensor):  # this rank's presence: a valid element here
                has_valid = (mask != 0).any()
                local = has_valid if local is None else local & has_valid
            loss, task_metrics = self.run_component(name, args, kwargs)
            if local is None and _holds_no_element(args, kwargs):  # an empty batch: read from shapes
                local = torch.zeros((), dtype=torch.bool, device=loss.device)
            # Presence where the loss is normalized (see the class docstring): globally for a share of
            # the global batch, so that every rank adds its s_i / R alike; else on this rank. None:
            # present, as the host knows (no op to make).
            if counted:
                is_present = self._globally_present(name, kwargs, loss)
                shown = is_present if local is None else is_present & local
            else:
                is_present = shown = local
                task_metrics = self.local_metrics(task_metrics, scale)
            if shown is not None:
                task_metrics = {
                    k: torch.where(shown, v, torch.zeros_like(v)) for k, v in task_metrics.items()
                }
            metrics |= task_metrics
            # The functional sums full-batch-equivalent losses; divided by `scale` below, a counted
            # (partial) loss stays a partial sum and the rest become this rank's share.
            losses.append(loss * scale if counted else loss)
            present.append(is_present)
        dtype = compute_dtype(*losses)
        task_losses = torch.stack([loss.to(dtype) for loss in losses])
        flags = None
        if any(p is not None for p in present):
            true = torch.ones((), dtype=torch.bool, device=task_losses.device)
            flags = torch.stack([true if p is None else p for p in present])
        total = multi_task_loss(
            task_losses,
            self.log_variances,
            flags,
            task_weights=self.task_weights if self.weighted else None,
            regression=self.regression if self.regression_tasks else None,
        )
        if scale != 1:
            total = total / scale
        with torch.no_grad():
            weights = effective_task_weights(
                self.log_variances,
                self.task_weights,
                self.regression if self.regression_tasks else None,
            )
            sigmas = None if self.log_variances is None else torch.exp(0.5 * self.log_variances)
            for index, name in enumerate(self.task_names):
                metrics[f"{name}_weight"] = weights[index]
                if sigmas is not None:
                    metrics[f"{name}_sigma"] = sigmas[index]
        metrics["loss"] = metrics["total_loss"] = total.detach()
        return LossOutput(total, metrics)
