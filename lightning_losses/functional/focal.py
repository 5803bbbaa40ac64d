r"""Focal loss (Lin et al., 2017): cross-entropy scaled down on well-classified elements.

Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017
(arXiv:1708.02002). Per element with true-class probability :math:`p_t`,

.. math:: \mathrm{FL}(p_t) = -\alpha_t\,(1-p_t)^\gamma \log p_t .

The modulating factor is computed in log space, :math:`(1-p_t)^\gamma = \exp(\gamma\log(1-p_t))`, with
:math:`\log(1-p_t)` taken exactly from the logits (never as ``log1p(-p_t)`` of a rounded probability), so
confident logits give finite values and gradients for every :math:`\gamma \ge 0`, also :math:`\gamma < 1`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.functional.cross_entropy import valid_mask
from lightning_losses.protocol import (
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
    check_same_leading_dims,
    check_same_shape,
    compute_dtype,
    value_checks_enabled,
)
from lightning_losses.reduction import masked_mean

__all__ = ["FOCAL_MODES", "FocalElements", "FocalMode", "check_focal_options", "focal_elements", "focal_loss"]

FocalMode = Literal["multiclass", "binary", "multilabel"]
FOCAL_MODES: tuple[str, ...] = ("multiclass", "binary", "multilabel")

_NEG_INF = float("-inf")


class FocalElements(NamedTuple):
    r"""Unreduced focal-loss terms, each of the shape of ``target``.

    ``loss``: the per-element focal loss :math:`\ell_i`, not yet weighted by ``valid``, 0 where ``valid``
    is 0. ``log_p_t``: :math:`\log p_t` (detach it before logging). ``valid``: the element weights
    (``mask`` times ``target != ignore_index``). ``focal_loss`` is ``masked_mean(loss, valid, count)``.
    """

    loss: Tensor
    log_p_t: Tensor
    valid: Tensor


def check_focal_options(mode: str, gamma: float) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of ``FOCAL_MODES`` and ``gamma`` a finite number >= 0.

    >>> check_focal_options("softmax", 2.0)
    Traceback (most recent call last):
    ...
    ValueError: `mode` must be one of ['multiclass', 'binary', 'multilabel'], got 'softmax'
    """
    if mode not in FOCAL_MODES:
        raise ValueError(f"`mode` must be one of {list(FOCAL_MODES)}, got {mode!r}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"`gamma` must be a finite number >= 0, got {gamma}")


def _check_inputs(
    logits: Tensor, target: Tensor, mask: Tensor | None, mode: str, ignore_index: int | None
) -> None:
    check_floating("logits", logits)
    if mode == "multiclass":
        check_ndim("logits", logits, (2, 3))
        check_ndim("target", target, logits.ndim - 1)
        check_same_leading_dims("logits", logits, "target", target, target.ndim)
        if logits.shape[-1] < 2:
            raise ValueError(
                f"multiclass mode needs at least 2 classes on the last dimension of `logits`, got shape "
                f"{tuple(logits.shape)}; use mode='binary' for a single logit"
            )
    else:
        check_ndim("logits", logits, (1, 2, 3) if mode == "binary" else (2, 3))
        check_same_shape("logits", logits, "target", target)
        if target.is_complex():
            raise TypeError(f"`target` must be real, got dtype {target.dtype}")
    if mask is not None:
        check_mask("mask", mask, target.shape)
    if mode == "multiclass":
        check_class_targets("target", target, logits.shape[-1], ignore_index, mask)
    else:
        _check_binary_targets(target, mask, ignore_index)


def _check_binary_targets(target: Tensor, mask: Tensor | None, ignore_index: int | None) -> None:
    """Targets of the elements that count lie in [0, 1]: integer ones are two classes
    (``check_class_targets``), floating ones (soft targets) are checked here. Only when value checks run."""
    if target.dtype == torch.bool:
        return
    if not target.is_floating_point():
        check_class_targets("target", target, 2, ignore_index, mask)
        return
    if target.numel() == 0 or not value_checks_enabled(target):
        return
    counted = target[valid_mask(target, mask, ignore_index) != 0]
    if counted.numel() > 0 and not bool(((counted >= 0) & (counted <= 1)).all()):  # NaN fails too
        ignored = "" if ignore_index is None else f" (other than ignore_index={ignore_index})"
        raise ValueError(
            f"`target` must lie in [0, 1]{ignored} in binary/multilabel mode, got values in "
            f"[{counted.min().item()}, {counted.max().item()}] for shape {tuple(target.shape)}"
        )


def _alpha_factor(
    alpha: float | Tensor | None, target: Tensor, logits: Tensor, mode: str, dtype: torch.dtype
) -> Tensor | None:
    r""":math:`\alpha_t` per element, or None for no weighting."""
    if alpha is None:
        return None
    alpha = torch.as_tensor(alpha, device=logits.device).to(dtype)
    if mode == "multiclass":
        if alpha.ndim == 0:
            return alpha  # a constant factor
        if tuple(alpha.shape) != (logits.shape[-1],):
            raise ValueError(
                f"`alpha` must be a number or have shape ({logits.shape[-1]},) (one per class), "
                f"got shape {tuple(alpha.shape)}"
            )
        return alpha[target]
    if alpha.ndim != 0 and (mode == "binary" or tuple(alpha.shape) != (logits.shape[-1],)):
        allowed = "a number" if mode == "binary" else f"a number or of shape ({logits.shape[-1]},)"
        raise ValueError(f"`alpha` must be {allowed} in {mode} mode, got shape {tuple(alpha.shape)}")
    # torchvision's alpha_t = alpha * t + (1 - alpha) * (1 - t); a [C] alpha broadcasts over the last dim
    return alpha * target + (1 - alpha) * (1 - target)


def _log1mexp(log_q: Tensor, fallback: Tensor) -> Tensor:
    """``log(1 - exp(log_q))``, accurate where ``log_q < -ln 2``; ``fallback`` (the same value) elsewhere.

    For a confident element, ``log p_t = log(1 - (1 - p_t))`` from the exact ``log(1 - p_t)`` keeps its
    digits where ``x_t - logsumexp(x)`` cancels to (nearly) 0. The inner ``where`` keeps the unused
    branch's gradient finite.
    """
    use = log_q < -math.log(2.0)
    safe = torch.where(use, log_q, torch.full_like(log_q, -1.0))
    return torch.where(use, torch.log1p(-torch.exp(safe)), fallback)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``logaddexp(a, b)`` whose gradient is 0, not NaN, where both are -inf (the value stays -inf)."""
    both = (a == _NEG_INF) & (b == _NEG_INF)
    return torch.where(both, _NEG_INF, torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)))


def _softmax_terms(
    logits: Tensor, safe_target: Tensor, keep: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(log p_t, log(1 - p_t))`` of a softmax over the last dimension, without a one-hot.

    ``log(1 - p_t)`` is the logsumexp over the *other* classes minus the one over all: exact also where
    ``p_t`` rounds to 1. The other classes are one copy of the logits (the upcast of a half-precision
    input is that copy) with the target's entry set to -inf in place. A row whose other classes are all
    -inf (``p_t = 1``) gets a finite stand-in for that logsumexp, whose gradient would be NaN, and -inf
    put back after; the elements that do not count (``keep`` False) get finite stand-ins too, so no inf
    or NaN reaches their (zero) gradient.
    """
    index = safe_target.unsqueeze(-1)
    x_t = logits.gather(-1, index).squeeze(-1).to(dtype)
    others = logits.to(dtype, copy=True).scatter_(-1, index, _NEG_INF)
    no_rest = others.detach().amax(-1, keepdim=True) == _NEG_INF
    others.scatter_(-1, index, torch.where(no_rest, 0.0, _NEG_INF).to(dtype))
    log_rest_mass = torch.where(no_rest.squeeze(-1), _NEG_INF, torch.logsumexp(others, dim=-1))
    x_t = torch.where(keep, x_t, 0.0)
    log_rest_mass = torch.where(keep, log_rest_mass, 0.0)
    log_normalizer = torch.logaddexp(x_t, log_rest_mass)
    log_rest = log_rest_mass - log_normalizer
    return _log1mexp(log_rest, x_t - log_normalizer), log_rest


def _sigmoid_terms(
    logits: Tensor, t: Tensor, keep: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p_t, log(1 - p_t), BCE with logits)`` per element, for targets ``t`` in [0, 1] (soft too).

    Infinite logits stay finite where the loss is: ``0 · log 0`` is 0, and ``logaddexp(-inf, -inf)`` has
    a zero gradient. The elements that do not count get logit 0 (``t`` is 0 there already).
    """
    x = torch.where(keep, logits.to(dtype), 0.0)
    log_p, log_not_p = F.logsigmoid(x), F.logsigmoid(-x)
    # p_t = p t + (1 - p)(1 - t) and 1 - p_t = p (1 - t) + (1 - p) t, in log space
    log_t, log_not_t = torch.log(t), torch.log1p(-t)
    log_p_t = _logaddexp(log_t + log_p, log_not_t + log_not_p)
    log_rest = _logaddexp(log_not_t + log_p, log_t + log_not_p)
    positive = torch.where(t != 0, t * log_p, 0.0)
    negative = torch.where(t != 1, (1 - t) * log_not_p, 0.0)
    return log_p_t, log_rest, -(positive + negative)


def focal_elements(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    mode: FocalMode = "multiclass",
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int | None = -100,
) -> FocalElements:
    r"""The unreduced terms of :func:`focal_loss` (same arguments, no reduction).

    >>> terms = focal_elements(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, -100]))
    >>> terms.loss, terms.valid
    (tensor([0.0018, 0.0000]), tensor([1., 0.]))
    """
    check_focal_options(mode, gamma)
    _check_inputs(logits, target, mask, mode, ignore_index)
    dtype = compute_dtype(logits)
    valid = valid_mask(target, mask, ignore_index, dtype)
    keep = valid != 0

    if mode == "multiclass":
        safe_target = torch.where(keep, target, torch.zeros_like(target))
        log_p_t, log_rest = _softmax_terms(logits, safe_target, keep, dtype)
        cross_entropy = -log_p_t
    else:
        safe_target = torch.where(keep, target.to(dtype), 0.0)
        log_p_t, log_rest, cross_entropy = _sigmoid_terms(logits, safe_target, keep, dtype)

    per_element = cross_entropy if gamma == 0 else torch.exp(gamma * log_rest) * cross_entropy
    alpha_t = _alpha_factor(alpha, safe_target, logits, mode, dtype)
    if alpha_t is not None:
        per_element = alpha_t * per_element
    return FocalElements(torch.where(keep, per_element, 0.0), log_p_t, valid)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    mode: FocalMode = "multiclass",
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int | None = -100,
) -> Tensor:
    r"""Focal loss :math:`-\alpha_t (1-p_t)^\gamma \log p_t`, averaged over the valid elements.

    **multiclass** (softmax over the **last** dimension): ``logits [N, C]`` or ``[B, T, C]``, ``target``
    integer class indices ``[N]`` / ``[B, T]``; :math:`p_t = \mathrm{softmax}(x)_{y}`. ``alpha``: None or
    a number is a constant factor :math:`\alpha_t = \alpha` (the guide's ``alpha: 1.0``); a ``[C]`` tensor
    weighs each element by its true class, :math:`\alpha_t = \alpha_{y}`. With ``gamma=0`` and no
    ``alpha`` this is ``F.cross_entropy``.

    **binary / multilabel** (a sigmoid per element): ``logits`` and ``target`` of the same shape (binary:
    ``[N]``, ``[N, K]`` or ``[B, T, K]``; multilabel: ``[N, C]`` or ``[B, T, C]``), targets in
    :math:`[0, 1]` (usually {0, 1}; any integer, bool or floating dtype). :math:`p = \sigma(x)`,
    :math:`p_t = p\,t + (1-p)(1-t)`, the log term is binary cross-entropy with logits, and a number
    ``alpha`` gives :math:`\alpha_t = \alpha t + (1-\alpha)(1-t)` (the paper's and torchvision's
    ``sigmoid_focal_loss``; the paper uses ``alpha=0.25, gamma=2``); a ``[C]`` ``alpha`` (multilabel) does
    so per class. ``alpha=None`` weighs nothing. Note ``alpha=1`` here gives negatives weight 0.

    Valid elements have ``target != ignore_index`` and a non-zero ``mask`` (the shape of ``target``; a
    float mask weighs them). Without ``global_valid_toks`` the result is
    :math:`\sum_i m_i \ell_i / \sum_i m_i` (class weights scale elements, they are not in the
    denominator: unlike a weighted ``F.cross_entropy``); with it (TOKEN_LEVEL),
    :math:`\sum_i m_i \ell_i / \text{global\_valid\_toks}`. No valid element gives 0 with zero gradient.
    Computed in float32 for half-precision inputs (float64 stays float64). Multiclass builds no one-hot:
    its one tensor of the logits' size is a float copy (for half-precision inputs, the upcast itself),
    which backward keeps, as softmax cross-entropy keeps its log-probabilities.

    Infinite logits (masked vocabulary entries: ``-inf``; sigmoid logits ``±inf``) give finite values and
    gradients wherever the loss is finite, e.g. a row whose other classes are all ``-inf``; the elements
    that do not count (masked or ``ignore_index``) always get a zero gradient.

    Args:
        logits: see above, any floating dtype.
        target: see above.
        mask: optional, the shape of ``target``; bool or float weights.
        global_valid_toks: optional 0-dim count of valid elements in the global batch.
        mode: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        gamma: focusing parameter :math:`\gamma \ge 0`.
        alpha: None, a number, or a ``[C]`` tensor (see above).
        ignore_index: target value to skip (None: skip nothing).

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> focal_loss(logits, torch.tensor([0, 1]), gamma=2.0)
    tensor(0.0018)
    >>> focal_loss(logits, torch.tensor([0, 1]), gamma=0.0)  # cross-entropy
    tensor(0.1269)
    >>> focal_loss(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0]), mode="binary", alpha=0.25)
    tensor(0.0877)
    """
    terms = focal_elements(
        logits, target, mask, mode=mode, gamma=gamma, alpha=alpha, ignore_index=ignore_index
    )
    return masked_mean(terms.loss, terms.valid, global_valid_toks)
