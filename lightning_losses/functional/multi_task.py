"""Multi-task weighting: static task weights and learned homoscedastic uncertainty (Kendall et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_losses.protocol import check_floating, check_mask, check_ndim, compute_dtype

__all__ = ["effective_task_weights", "multi_task_loss"]


def _check_task_vector(name: str, tensor: Tensor | None, num_tasks: int) -> None:
    if tensor is not None and tuple(tensor.shape) != (num_tasks,):
        raise ValueError(
            f"`{name}` must have shape ({num_tasks},), one entry per task of `task_losses`, "
            f"got {tuple(tensor.shape)}"
        )


def _constant_weights(
    task_weights: Tensor | None, regression: Tensor | None, like: Tensor, uncertainty: bool
) -> Tensor | None:
    """:math:`w_i c_i`: the static weights times ½ for the regression tasks (with uncertainty weighting
    only); None when every one is 1 (no op to make). The loss and :func:`effective_task_weights` both take
    them from here: the weights reported cannot drift from those applied."""
    weights = None if task_weights is None else task_weights.to(like)
    if not uncertainty or regression is None:
        return weights
    halves = torch.where(regression.to(device=like.device, dtype=torch.bool), 0.5, 1.0).to(like.dtype)
    return halves if weights is None else weights * halves


def effective_task_weights(
    log_variances: Tensor | None,
    task_weights: Tensor | None = None,
    regression: Tensor | None = None,
    num_tasks: int | None = None,
) -> Tensor:
    r"""The factor multiplying each task loss :math:`L_i` in :func:`multi_task_loss`.

    :math:`w_i\,c_i\,e^{-s_i}` with uncertainty weighting (``log_variances`` given), :math:`w_i` without.
    ``c_i`` is ½ for ``regression`` tasks, else 1; ``w_i`` is 1 when ``task_weights`` is None.

    Args:
        log_variances: ``[T]`` learned :math:`s_i = \log\sigma_i^2`, or None.
        task_weights: ``[T]`` static weights :math:`w_i`, or None.
        regression: ``[T]`` bool, tasks using the ½ (Gaussian) form, or None.
        num_tasks: ``T`` when both ``log_variances`` and ``task_weights`` are None.

    >>> effective_task_weights(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.5]))
    tensor([1.0000, 0.0677])
    """
    reference = log_variances if log_variances is not None else task_weights
    if reference is None:
        if num_tasks is None:
            raise ValueError("`num_tasks` is needed when `log_variances` and `task_weights` are both None")
        return torch.ones(num_tasks)
    like = reference.to(compute_dtype(reference))
    constant = _constant_weights(task_weights, regression, like, log_variances is not None)
    if log_variances is None:
        assert constant is not None  # task_weights
        return constant
    factors = torch.exp(-like)
    return factors if constant is None else factors * constant


def multi_task_loss(
    task_losses: Tensor,
    log_variances: Tensor | None = None,
    present: Tensor | None = None,
    *,
    task_weights: Tensor | None = None,
    regression: Tensor | None = None,
) -> Tensor:
    r"""Weighted sum of task losses, optionally with learned uncertainty weighting.

    With learned log-variances :math:`s_i = \log\sigma_i^2` (Kendall, Gal & Cipolla, "Multi-Task Learning
    Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018):

    .. math:: L = \sum_i p_i\, w_i\, c_i \left(e^{-s_i} L_i + s_i\right)

    where :math:`c_i = 1` (the common simplified form) or :math:`c_i = \tfrac12` for ``regression`` tasks:
    :math:`\tfrac{1}{2\sigma_i^2} L_i + \log\sigma_i`, the paper's Gaussian-likelihood term. For fixed
    :math:`L_i > 0` both are minimized at :math:`e^{s_i} = \sigma_i^2 = L_i`. Without ``log_variances``,
    :math:`L = \sum_i p_i w_i L_i`. The factor of :math:`L_i` is :func:`effective_task_weights`.

    ``present`` (:math:`p_i`, one flag per *task*, not a per-element mask) marks the tasks present (e.g.
    tasks with no sample in the batch are False): an absent task contributes exactly 0, and no gradient,
    even where its :math:`L_i` is NaN (the mean of no sample). All tasks absent gives 0.

    Args:
        task_losses: ``[T]`` one scalar loss per task, any floating dtype (computed in float32, or float64).
        log_variances: ``[T]`` :math:`s_i`, or None for static weighting.
        present: ``[T]`` bool or 0/1, the tasks that count; all by default.
        task_weights: ``[T]`` static weights :math:`w_i` (1 by default).
        regression: ``[T]`` bool, the tasks with :math:`c_i = \tfrac12`.

    >>> losses = torch.tensor([0.5, 4.0])
    >>> multi_task_loss(losses, task_weights=torch.tensor([1.0, 0.5]))
    tensor(2.5000)
    >>> multi_task_loss(losses, torch.log(losses))  # at the minimizer: sum of (1 + log L_i)
    tensor(2.6931)
    >>> multi_task_loss(torch.tensor([1.0, float("nan")]), torch.zeros(2), torch.tensor([True, False]))
    tensor(1.)
    """
    check_floating("task_losses", task_losses)
    check_ndim("task_losses", task_losses, 1)
    num_tasks = task_losses.shape[0]
    if log_variances is not None:
        check_floating("log_variances", log_variances)
    _check_task_vector("log_variances", log_variances, num_tasks)
    _check_task_vector("task_weights", task_weights, num_tasks)
    _check_task_vector("regression", regression, num_tasks)
    if present is not None:
        check_mask("present", present, (num_tasks,))

    dtype = compute_dtype(task_losses)
    losses = task_losses.to(dtype)
    flags = None if present is None else present if present.dtype == torch.bool else present != 0
    # zero absent losses *before* they meet exp(-s): a NaN there would give s a NaN gradient
    if flags is not None:
        losses = torch.where(flags, losses, 0.0)
    constant = _constant_weights(task_weights, regression, losses, log_variances is not None)  # w_i c_i
    if log_variances is None:
        terms = losses
    else:  # w_i c_i (e^{-s_i} L_i + s_i)
        s = log_variances.to(dtype)
        terms = torch.exp(-s) * losses + s
    if constant is not None:
        terms = constant * terms
    return (terms if flags is None else torch.where(flags, terms, 0.0)).sum()
