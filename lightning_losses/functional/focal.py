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
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.functional.cross_entropy import (
    exact_where_underflow,
    fused_path,
    row_blocks,
    target_is_argmax,
    target_zeroed_softmax,
    valid_mask,
)
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
from lightning_losses.reduction import divide_by_count, masked_mean, masked_sum

__all__ = [
    "FOCAL_MODES",
    "FocalElements",
    "FocalMode",
    "check_focal_options",
    "focal_elements",
    "focal_loss",
    "focal_loss_with_metrics",
]

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
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None,
    mode: str,
    ignore_index: int | None,
    float_range: bool = True,
) -> bool:
    """The checks; returns whether every multiclass target was found in ``[0, C)`` (see
    ``check_class_targets``; False in the other modes)."""
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
        return check_class_targets("target", target, logits.shape[-1], ignore_index, mask)
    if float_range or not target.is_floating_point():  # else the fused path checks it block by block
        _check_binary_targets(target, mask, ignore_index)
    return False


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


def _alpha_tensor(
    alpha: float | Tensor | None, logits: Tensor, mode: str, dtype: torch.dtype
) -> Tensor | None:
    """``alpha`` as a 0-dim or ``[C]`` tensor of ``dtype`` on the logits' device (None stays None), its
    shape checked against ``mode``."""
    if alpha is None:
        return None
    if not isinstance(alpha, Tensor):  # filled on the device: a tensor of a number would be a copy (a sync)
        return torch.full((), float(alpha), dtype=dtype, device=logits.device)
    alpha = alpha.to(device=logits.device, dtype=dtype)
    if mode == "multiclass":
        if alpha.ndim != 0 and tuple(alpha.shape) != (logits.shape[-1],):
            raise ValueError(
                f"`alpha` must be a number or have shape ({logits.shape[-1]},) (one per class), "
                f"got shape {tuple(alpha.shape)}"
            )
    elif alpha.ndim != 0 and (mode == "binary" or tuple(alpha.shape) != (logits.shape[-1],)):
        allowed = "a number" if mode == "binary" else f"a number or of shape ({logits.shape[-1]},)"
        raise ValueError(f"`alpha` must be {allowed} in {mode} mode, got shape {tuple(alpha.shape)}")
    return alpha


def _alpha_factor(
    alpha: float | Tensor | None, target: Tensor, logits: Tensor, mode: str, dtype: torch.dtype
) -> Tensor | None:
    r""":math:`\alpha_t` per element, or None for no weighting."""
    alpha = _alpha_tensor(alpha, logits, mode, dtype)
    if alpha is None:
        return None
    if mode == "multiclass":
        return alpha if alpha.ndim == 0 else alpha[target]  # a number is a constant factor
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
    return _focal(logits, target, mask, global_valid_toks, mode, gamma, alpha, ignore_index, False)[0]


def focal_loss_with_metrics(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    mode: FocalMode = "multiclass",
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int | None = -100,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`focal_loss` and its detached metrics over the valid elements of this batch (a float mask
    weighs them): ``p_t``, the mean probability of the true class (multiclass) or label (sigmoid), and
    ``accuracy`` (multiclass: argmax; sigmoid: ``logit > 0`` against ``target > 0.5``), both found in
    the loss's own pass over the logits.

    >>> loss, metrics = focal_loss_with_metrics(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    >>> metrics["accuracy"], metrics["p_t"]
    (tensor(0.5000), tensor(0.5000))
    """
    return _focal(logits, target, mask, global_valid_toks, mode, gamma, alpha, ignore_index, True)


# ----------------------------------------------------------------------------------------------------
# the fused paths (eager): no [N, C] intermediate kept, one [N, C] gradient written by backward
# ----------------------------------------------------------------------------------------------------


def _write_block(grad: Tensor, block: slice, values: Tensor) -> None:
    if values.data_ptr() != grad[block].data_ptr():
        grad[block].copy_(values)


class _SoftmaxFocal(torch.autograd.Function):
    r"""Multiclass focal terms of ``x [R, C]`` (any floating dtype, computed in ``dtype``) against
    in-range ``target [R]``; rows with ``keep`` False get 0 and a zero gradient (``keep`` None: all
    rows count).

    Returns ``(focal [R], log_p_t [R], hits [R] or empty)``; only ``focal`` is differentiable; ``hits``
    says whether the target is the row's ``argmax``. Each block of rows takes PyTorch's fused softmax
    kernel: :math:`r = 1 - p_t` is the sum of the other classes' probabilities (no cancellation where
    :math:`p_t` rounds to 1), :math:`\log p_t = \log(1 - r)` where :math:`r < 1/2`, else :math:`\log p_t`
    itself, or the row's log-softmax where :math:`p_t` underflows. With
    :math:`F = r^\gamma` and :math:`\ell = -F \log p_t`, the gradient is
    :math:`\partial\ell/\partial x_c = F\,(1 - \gamma\,p_t \log p_t / r)\,(p_c - [c = t])`, whose target
    entry is written as :math:`-(\ldots)\,r`, with :math:`p_t\log p_t/r \to -1` at :math:`r = 0` and
    :math:`\to 0` at :math:`p_t = 0`: finite for every :math:`\gamma \ge 0`. The probabilities (target
    entry zeroed) are written by the forward pass straight into the one ``[R, C]`` tensor the gradient
    becomes; the first backward scales each row in place, a second one recomputes them. On a CPU
    ``hits`` compares :math:`p_t` with the largest other probability (``amax``: a fraction of an
    ``argmax``'s cost; softmax keeps the order), ``argmax`` of the logits deciding only tied rows.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        target: Tensor,
        keep: Tensor | None,
        gamma: float,
        dtype: torch.dtype,
        need_hits: bool,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        rows = len(x)
        # per row: r = 1 - p_t, p_t and the largest other probability
        rest, p_t, others_max = (torch.empty(rows, dtype=dtype, device=x.device) for _ in range(3))
        dropped = None if keep is None else _dropped_rows(keep)
        grad = torch.empty_like(x) if need_grad else None
        in_grad = grad if grad is not None and grad.dtype == dtype else None  # the softmax written into it
        for block in row_blocks(*x.shape, x.device):
            xb = _kept_rows(x[block], dropped, block, dtype)
            p = target_zeroed_softmax(xb, target[block, None], p_t[block, None], in_grad, block)
            torch.sum(p, -1, out=rest[block])
            torch.amax(p, -1, out=others_max[block])
            if grad is not None and in_grad is None:
                _write_block(grad, block, p)
        log_p_t = _log_p_t(x, target, p_t, rest, others_max, x.device.type == "cpu")
        # softmax keeps the logits' order (ties aside): the largest other probability decides, for all
        # rows at once (per block, the few small ops would cost more than the block's work at 8 rows)
        hits = (
            target_is_argmax(x, target, p_t, others_max)
            if need_hits
            else torch.empty(0, dtype=torch.bool, device=x.device)
        )
        factor = _power(rest, gamma) if gamma != 0 else torch.ones_like(rest)
        # p_t log p_t / r: its limit -1 at r = 0; 0 where p_t underflows (log p_t is finite)
        p_log_p_over_r = torch.where(rest > 0, p_t * (log_p_t / rest), -1.0)
        focal, coefficient = factor * log_p_t.neg(), factor * (1 - gamma * p_log_p_over_r)
        if keep is not None and (dropped is None or len(dropped)):  # rows that do not count: 0
            focal, coefficient = torch.where(keep, focal, 0.0), torch.where(keep, coefficient, 0.0)
        ctx.save_for_backward(x, target, keep, coefficient, rest)
        ctx.dtype, ctx.dropped, ctx.grad = dtype, dropped, grad
        ctx.mark_non_differentiable(log_p_t, hits)
        return focal, log_p_t, hits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_focal: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        x, target, keep, coefficient, rest = ctx.saved_tensors
        scale = grad_focal * coefficient
        grad, ctx.grad = ctx.grad, None
        dropped = ctx.dropped
        if grad is None:  # a second backward through the graph (retain_graph=True), or no grad mode
            grad = torch.empty_like(x)
            in_grad = grad if grad.dtype == ctx.dtype else None
            for block in row_blocks(*x.shape, x.device):
                xb = _kept_rows(x[block], dropped, block, ctx.dtype)
                p = target_zeroed_softmax(xb, target[block, None], None, in_grad, block)
                _write_block(grad, block, p)  # a no-op where p is written in grad already
        grad.mul_(scale[:, None].to(grad.dtype))
        grad.scatter_(-1, target[:, None], (-scale * rest)[:, None].to(grad.dtype))
        if keep is not None and dropped is None:  # rows not zeroed (no host read): NaN · 0 cleared here
            grad.masked_fill_(~keep[:, None], 0.0)
        return (grad, *(None,) * 6)


def _log_p_t(
    x: Tensor, target: Tensor, p_t: Tensor, rest: Tensor, others_max: Tensor, host_reads: bool
) -> Tensor:
    """``log p_t`` per row: ``log1p(-r)`` where ``r < 1/2`` (no cancellation where ``p_t`` nears 1),
    ``log p_t`` where ``p_t`` is a normal number, and the log-softmax where it underflows: with
    ``host_reads`` (a CPU) of those rows alone, else ``x_t - max_c x_c + log max_c p_c`` for all (one
    pass, no host read; the row's largest probability is at least ``1/C``)."""
    log_p_t = torch.where(rest < 0.5, torch.log1p(-rest), torch.log(p_t))
    if host_reads:  # dropped rows (zeroed: uniform probabilities) never underflow
        return exact_where_underflow(log_p_t, p_t, x, target)
    x_t = x.gather(-1, target[:, None]).squeeze(-1).to(p_t.dtype)
    log_softmax_t = x_t - x.to(p_t.dtype).amax(-1) + torch.maximum(p_t, others_max).log()
    return torch.where(p_t < torch.finfo(p_t.dtype).tiny, log_softmax_t, log_p_t)


def _dropped_rows(keep: Tensor) -> Tensor | None:
    """The indices of the rows that do not count, on a CPU (a host read there costs nothing); None
    elsewhere, where those rows are cleared from the gradient at the end instead (no host read, and no
    zeroed copy of the logits)."""
    return (~keep).nonzero().squeeze(1) if keep.device.type == "cpu" else None


def _kept_rows(xb: Tensor, dropped: Tensor | None, block: slice, dtype: torch.dtype) -> Tensor:
    """A block of logits in ``dtype``, the ``dropped`` rows set to 0 (no inf or NaN reaches their zero
    gradient); unchanged when ``dropped`` is None."""
    xb = xb.to(dtype)
    if dropped is None or len(dropped) == 0:
        return xb
    local = dropped[(dropped >= block.start) & (dropped < block.stop)] - block.start
    return xb if len(local) == 0 else xb.index_fill(0, local, 0.0)


def _block_weights(
    t: Tensor, mask: Tensor | None, ignore_index: int | None, dtype: torch.dtype
) -> Tensor | None:
    """Weights of a block's elements (``mask`` where ``t != ignore_index``), or None where all count.

    On a CPU a block whose targets all lie in [0, 1] holds no ``ignore_index`` outside [0, 1] (one
    ``aminmax`` tells), so it skips the weights and the selects they need; elsewhere that would be a
    host read."""
    if mask is not None:
        weights = mask.to(dtype)
        return weights if ignore_index is None else weights * (t != ignore_index)
    if ignore_index is None:
        return None
    if t.device.type == "cpu" and ignore_index not in (0, 1) and t.numel() > 0:
        low, high = (bound.item() for bound in t.aminmax())  # Python comparisons: no more ops
        if low >= 0 and high <= 1:  # NaN fails both
            return None
    return (t != ignore_index).to(dtype)


def _power(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` for ``base >= 0``, by a product for the usual integer exponents."""
    if exponent == 1:
        return base
    if exponent == 2:
        return base * base
    return torch.pow(base, exponent)


def _sigmoid_focal_terms(
    x: Tensor, t: Tensor, alpha: Tensor | None, gamma: float, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""``(α_t ℓ, r, ∂(α_t ℓ)/∂x or None)`` per element, for finite or infinite logits ``x`` and targets
    ``t`` in [0, 1]; see :class:`_SigmoidFocal`.

    Nothing is a difference of rounded probabilities: :math:`p = \sigma(x)` and :math:`q = \sigma(-x)`
    each have full relative precision, :math:`r = p(1-t) + qt` and :math:`B = \log(1 + e^{-|x|}) +
    (1-t)\,\mathrm{relu}(x) + t\,\mathrm{relu}(-x)` (with :math:`e^{-|x|} = \min(p, q) / \max(p, q)`)
    are sums of non-negative parts, and :math:`p - t = p(1-t) - qt` is exactly :math:`-q` at
    :math:`t = 1`. No select (``torch.where``) is used: on a CPU each costs as much as twenty arithmetic
    ops.
    """
    p = torch.sigmoid(x)
    minus_x = torch.neg(x)
    q = torch.sigmoid(minus_x)
    not_t = 1 - t
    p_not_t, q_t = p * not_t, q * t
    r = p_not_t + q_t
    linear = torch.addcmul(torch.relu(x).mul_(not_t), torch.relu_(minus_x), t)
    # 0 · inf = NaN only at an infinite logit on the right side, where the term is 0; a NaN logit stays
    # NaN through the log term
    linear.nan_to_num_(nan=0.0, posinf=math.inf)
    bce = torch.div(torch.minimum(p, q), torch.maximum(p, q)).log1p_().add_(linear)
    focal = None if gamma == 0 else _power(r, gamma)
    loss = bce if focal is None else focal * bce
    class_weight = None if alpha is None else torch.addcmul(1 - alpha, 2 * alpha - 1, t)  # α t + (1-α)(1-t)
    if class_weight is not None:
        loss = loss * class_weight
    if not with_grad:
        return loss, r, None
    grad = p_not_t.sub_(q_t)  # ∂B/∂x = p - t, without rounding p near 1 first
    if focal is not None:
        # ∂r/∂x = pq(1 - 2t), so ∂F/∂x = γ r^(γ-1) pq (1 - 2t), with r^(γ-1) pq = F · pq/r: pq ≤ min(p, q)
        # ≤ r keeps pq/r in [0, 1], and its 0/0 at r = 0 is the limit 0 (every γ ≥ 0, also γ < 1)
        slope = p.mul_(q)
        if gamma == 2:
            slope.mul_(r)
        elif gamma != 1:
            slope.mul_(focal).div_(r).nan_to_num_(nan=0.0)
        grad.mul_(focal).addcmul_(slope.mul_(bce), not_t.sub_(t), value=gamma)
    return loss, r, grad if class_weight is None else grad.mul_(class_weight)


class _SigmoidFocal(torch.autograd.Function):
    r"""Sigmoid focal loss summed over ``x [R, K]`` with targets ``t`` (in [0, 1] where they count),
    optional ``mask`` weights, ``ignore_index`` and :math:`\alpha` (0-dim or ``[K]``), a block of rows
    at a time. Returns ``(Σ w α_t ℓ, Σ w, Σ w p_t, Σ w·correct)``; only the first is differentiable.

    With :math:`p = \sigma(x)`, :math:`q = 1 - p`, :math:`r = 1 - p_t = p(1-t) + qt` (full relative
    precision wherever :math:`r` is a normal float), :math:`F = r^\gamma` and :math:`B` the binary
    cross-entropy: :math:`\ell = F B` and :math:`\partial \ell/\partial x = F (p - t) + \gamma B (1 - 2t)
    \,p q\,r^{\gamma - 1}`, the last product taken as 0 at :math:`r = 0` (its limit), finite as
    :math:`r \to 0` for every :math:`\gamma \ge 0`. Elements with weight 0 get logit and target 0 first,
    so an infinite or NaN logit there reaches neither the loss nor the gradient. With ``with_grad`` the
    forward writes that gradient into the one ``[R, K]`` tensor it keeps, while each block's terms are in
    cache; the first backward scales it in place and hands it out, a second one recomputes it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        t: Tensor,
        mask: Tensor | None,
        ignore_index: int | None,
        alpha: Tensor | None,
        gamma: float,
        dtype: torch.dtype,
        check_range: bool,
        with_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sums: list[Tensor] = []  # per block: [Σ w α_t ℓ, Σ w, Σ w p_t, Σ w·correct]
        # with_grad: the gradient of the sum is written here while each block's terms are at hand
        # (backward then only scales it); without, nothing [R, K] is kept
        grad = torch.empty_like(x) if with_grad else None
        for block in row_blocks(*x.shape, x.device):
            weights, xb, tb = _sigmoid_block(x, t, mask, block, ignore_index, dtype)
            if check_range:
                low, high = (bound.item() for bound in tb.aminmax())
                if not (low >= 0 and high <= 1):  # NaN fails too
                    _check_binary_targets(t, mask, ignore_index)  # raises, naming the values seen
            loss, r, g = _sigmoid_focal_terms(xb, tb, alpha, gamma, grad is not None)
            # 1 where (x > 0) != (t > 0.5), else 0 (float ops: a bool tensor costs ~5x on a CPU)
            wrong = torch.sign(xb).clamp_(min=0).sub_(torch.sign(tb - 0.5).clamp_(min=0)).square_()
            if weights is None:
                count = loss.new_full((), xb.numel())  # a fill on the device, no host copy
                sums.append(torch.stack([loss.sum(), count, count - r.sum(), count - wrong.sum()]))
            else:
                count = weights.sum()
                w = weights.reshape(-1)
                sums.append(
                    torch.stack(
                        [
                            torch.dot(w, loss.reshape(-1)),
                            count,
                            count - torch.dot(w, r.reshape(-1)),
                            count - torch.dot(w, wrong.reshape(-1)),
                        ]
                    )
                )
            if grad is not None and g is not None:
                _write_block(grad, block, g if weights is None else g.mul_(weights))
        ctx.save_for_backward(x, t, mask, alpha)
        ctx.options = (ignore_index, gamma, dtype)
        ctx.grad = grad
        if len(sums) == 1:  # one block (small inputs): no stack and sum
            total = sums[0]
        else:  # several, or none (no rows)
            total = torch.stack(sums).sum(0) if sums else torch.zeros(4, dtype=dtype, device=x.device)
        loss_sum, weight_sum, p_t_sum, correct_sum = total.unbind()
        ctx.mark_non_differentiable(weight_sum, p_t_sum, correct_sum)
        return loss_sum, weight_sum, p_t_sum, correct_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_sum: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        grad, ctx.grad = ctx.grad, None
        if grad is not None:  # the forward's, scaled in place: it is handed out once
            return (grad.mul_(grad_sum), *(None,) * 8)
        # a second backward through the graph (retain_graph=True), or the forward ran without grad mode
        x, t, mask, alpha = ctx.saved_tensors
        ignore_index, gamma, dtype = ctx.options
        grad = torch.empty_like(x)
        for block in row_blocks(*x.shape, x.device):
            weights, xb, tb = _sigmoid_block(x, t, mask, block, ignore_index, dtype)
            g = cast(Tensor, _sigmoid_focal_terms(xb, tb, alpha, gamma, True)[2])
            _write_block(grad, block, g if weights is None else g.mul_(weights))
        return (grad.mul_(grad_sum), *(None,) * 8)


def _sigmoid_block(
    x: Tensor, t: Tensor, mask: Tensor | None, block: slice, ignore_index: int | None, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(weights or None, logits, targets)`` of a block in ``dtype``, logit and target 0 where the
    weight is 0."""
    xb, tb = x[block].to(dtype), t[block].to(dtype)
    weights = _block_weights(tb, None if mask is None else mask[block], ignore_index, dtype)
    if weights is None:
        return None, xb, tb
    keep = weights != 0
    return weights, torch.where(keep, xb, 0.0), torch.where(keep, tb, 0.0)


def _focal(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None,
    global_valid_toks: Tensor | None,
    mode: str,
    gamma: float,
    alpha: float | Tensor | None,
    ignore_index: int | None,
    with_metrics: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    check_focal_options(mode, gamma)
    if not fused_path():
        terms = focal_elements(
            logits, target, mask, mode=mode, gamma=gamma, alpha=alpha, ignore_index=ignore_index
        )
        loss = masked_mean(terms.loss, terms.valid, global_valid_toks)
        if not with_metrics:
            return loss, {}
        with torch.no_grad():
            p_t = masked_mean(terms.log_p_t.exp(), terms.valid)
            correct = logits.argmax(-1) == target if mode == "multiclass" else (logits > 0) == (target > 0.5)
            accuracy = masked_mean(correct.to(terms.valid.dtype), terms.valid)
        return loss, {"p_t": p_t, "accuracy": accuracy}

    in_range = _check_inputs(logits, target, mask, mode, ignore_index, float_range=False)
    dtype = compute_dtype(logits)
    alpha_value = _alpha_tensor(alpha, logits, mode, dtype)
    if mode == "multiclass":
        flat_target = (target if target.dtype == torch.int64 else target.long()).reshape(-1)  # gather's
        classes = logits.shape[-1]
        # every element counts, as the host knows (the CPU check saw the targets in range, and
        # `ignore_index` is no class): no mask, select or count to make
        if mask is None and in_range and (ignore_index is None or not 0 <= ignore_index < classes):
            weights = keep = None
        elif mask is None:  # the valid elements weigh 1: `keep` holds them
            weights = None
            keep = (
                torch.ones_like(flat_target, dtype=torch.bool)
                if ignore_index is None
                else flat_target != ignore_index
            )
        else:
            weights = valid_mask(flat_target, mask.reshape(-1), ignore_index, dtype)
            keep = weights != 0
        safe_target = flat_target if keep is None else torch.where(keep, flat_target, 0)
        focal, log_p_t, hits = _SoftmaxFocal.apply(
            logits.reshape(-1, classes), safe_target, keep, float(gamma), dtype,
            with_metrics, logits.requires_grad and torch.is_grad_enabled(),
        )  # fmt: skip
        if alpha_value is not None:
            focal = (alpha_value if alpha_value.ndim == 0 else alpha_value[safe_target]) * focal
        # the focal terms are 0 where `keep` is False: no select needed to sum them
        count = flat_target.numel() if keep is None else keep.sum() if weights is None else weights.sum()
        total = focal.sum() if weights is None else (focal * weights).sum()
        loss = divide_by_count(total, count if global_valid_toks is None else global_valid_toks)
        if not with_metrics:
            return loss, {}
        with torch.no_grad():
            if weights is not None:
                correct = torch.where(hits, weights, 0.0).sum()
            else:
                correct = hits.sum() if keep is None else (hits & keep).sum()
            accuracy = divide_by_count(correct, count)  # float32 from integer counts
            return loss, {
                "p_t": divide_by_count(
                    masked_sum(log_p_t.exp(), keep if weights is None else weights), count
                ),
                "accuracy": accuracy if accuracy.dtype == dtype else accuracy.to(dtype),
            }
    shape = (-1, 1) if logits.ndim == 1 else (-1, logits.shape[-1])
    check_range = target.is_floating_point() and target.numel() > 0 and value_checks_enabled(target)
    loss_sum, weight_sum, p_t_sum, correct_sum = _SigmoidFocal.apply(
        logits.reshape(shape),
        target.reshape(shape),
        None if mask is None else mask.reshape(shape),
        ignore_index,
        alpha_value,
        float(gamma),
        dtype,
        check_range,
        logits.requires_grad and torch.is_grad_enabled(),
    )
    loss = divide_by_count(loss_sum, weight_sum if global_valid_toks is None else global_valid_toks)
    if not with_metrics:
        return loss, {}
    count = torch.where(weight_sum > 0, weight_sum, 1.0)  # divide_by_count's count, made once for both
    return loss, {"p_t": p_t_sum / count, "accuracy": correct_sum / count}
