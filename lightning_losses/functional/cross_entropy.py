r"""Cross-entropy over the last dimension, with masks, ignore_index, label smoothing and class weights.

Eager calls on a CPU go through a fused autograd function that makes one ``[N, C]`` tensor: it walks over
blocks of rows, each small enough to stay in cache, writing each block's softmax straight into the
tensor that becomes the gradient :math:`g_i(a_i\,\mathrm{softmax}(x_i) - b_{i,c})` (the backward scales
its rows in place) and, for the module's accuracy, taking the block's largest other probability.
``F.cross_entropy`` allocates three (``log_softmax``'s
output, ``nll_loss``'s zero-filled gradient, ``log_softmax``'s gradient); on a CPU every fresh tensor of
that size costs page faults, which is most of the time at ``[4096, 32768]``. Under ``torch.compile`` the
plain ``F.cross_entropy`` path is traced instead (the compiler fuses it); logits below
:data:`FUSED_MIN_ELEMENTS` and logits on a GPU take it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.protocol import (
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
    compute_dtype,
)
from lightning_losses.reduction import divide_by_count

__all__ = [
    "FUSED_MIN_BYTES",
    "FUSED_MIN_ELEMENTS",
    "cross_entropy",
    "cross_entropy_with_metrics",
    "exact_where_underflow",
    "exp_floor",
    "fused_path",
    "per_row_cross_entropy",
    "row_argmax",
    "row_blocks",
    "row_dot",
    "target_is_argmax",
    "target_zeroed_softmax",
    "valid_mask",
]

BLOCK_ELEMENTS = 1 << 18
"""Elements per block of rows in the fused CPU paths (1 MiB of fp32: in L2 cache, and well below glibc's
mmap threshold, so a block's temporaries are neither page-faulted nor evicted)."""


FUSED_MIN_ELEMENTS = 1 << 18
""":func:`cross_entropy` takes the fused function for CPU logits of this many elements or more (1 MiB of
fp32), PyTorch's ``F.cross_entropy`` below, where the fused function's Python forward and backward
(~0.15 ms a call) weigh most: measured on the project's CPU, the plain ops take 20–45% less time from
[64, 10] to [256, 1000] (with the accuracy metric), the fused function half the time at [4096, 1000].
On a GPU the plain ops take every size: there the fused function bought no memory traffic and cost
host time (on an H100, 0.72 vs 1.52 ms at [4096, 1000], equal at [4096, 32768])."""


FUSED_MIN_BYTES = 32 << 20
"""Logits from this size up take the fused path in :func:`per_row_cross_entropy` (glibc's largest
mmap threshold: a fresh tensor that large is page-faulted in; a smaller one is recycled heap memory)."""


def fused_path() -> bool:
    """Whether the fused autograd functions may run: in eager mode. Under ``torch.compile`` the plain ops
    are traced instead (the compiler fuses them itself)."""
    return not torch.compiler.is_compiling()


def row_blocks(num_rows: int, num_columns: int, device: torch.device) -> list[slice]:
    """Slices of rows for the fused paths: blocks of about :data:`BLOCK_ELEMENTS` elements on a CPU, one
    block (all rows) elsewhere, where each kernel launch costs more than a full-size temporary.

    >>> row_blocks(5, 1 << 17, torch.device("cpu"))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    if device.type != "cpu":
        return [slice(0, num_rows)]
    step = max(1, BLOCK_ELEMENTS // max(1, num_columns))
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


BMM_MAX_COLUMNS = 256
""":func:`row_dot` takes a batched matrix product up to this many columns. On the project's CPU ``bmm``'s
per-row dot products took 0.6-0.8x the time of a product and a sum from 8 to 256 columns (at 1M
elements), but 4x at 512 and 1000 columns and 11x at [32, 32768]."""


def row_dot(a: Tensor, b: Tensor, *, overwrite: bool = False) -> Tensor:
    """``(a * b).sum(-1)`` of two ``[R, C]`` tensors with no temporary larger than a block of rows: by
    ``bmm`` up to :data:`BMM_MAX_COLUMNS` columns and off the CPU; else by the product and the sum,
    written into ``a`` when ``overwrite``, or a block of rows (:func:`row_blocks`) at a time. Under
    ``torch.compile``: the plain product and sum, which the compiler fuses.

    >>> row_dot(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    tensor([3., 8.])
    """
    if not fused_path():
        return (a * b).sum(-1)
    if a.shape[-1] <= BMM_MAX_COLUMNS or a.device.type != "cpu":
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    if overwrite:
        return a.mul_(b).sum(-1)
    blocks = row_blocks(*a.shape, a.device)
    if len(blocks) == 1:  # a temporary of at most one block's size
        return (a * b).sum(-1)
    out = a.new_empty(a.shape[0])
    for block in blocks:
        torch.sum(a[block] * b[block], -1, out=out[block])
    return out


def exp_floor(dtype: torch.dtype) -> float:
    """An exponent below which ``exp`` is subnormal or 0 in ``dtype``, plus 1: ``-86.3`` in float32.

    Flooring ``x - max x`` there before ``exp`` changes no sum that a row's largest term, 1, is in, and
    on a CPU ``torch.exp`` of an input whose result is subnormal or 0 takes ~100× as long.

    >>> round(exp_floor(torch.float32), 1), round(exp_floor(torch.float64), 1)
    (-86.3, -707.4)
    """
    return math.log(torch.finfo(dtype).tiny) + 1.0


def row_argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)``: the first index of each row's largest value. On a CPU by ``x.max(-1)``, which
    returns the same indices in a third of the time (121 against 340 µs at [256, 1000], 12 against 40 ms
    at [16384, 1024] on this project's CPU).

    >>> row_argmax(torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]))
    tensor([1, 0])
    """
    return x.max(-1).indices if x.device.type == "cpu" else x.argmax(-1)


def valid_mask(
    target: Tensor, mask: Tensor | None, ignore_index: int | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Weights of the valid elements as `dtype`: `mask` (bool or weights) where `target != ignore_index`."""
    if mask is None and ignore_index is not None:
        return (target != ignore_index).to(dtype)
    valid = torch.ones_like(target, dtype=dtype) if mask is None else mask.to(dtype)
    return valid if ignore_index is None else valid * (target != ignore_index)


class _CrossEntropy(torch.autograd.Function):
    r"""Per-row cross-entropy of ``x [R, C]`` (float32/float64) against ``target [R]`` (in range), with
    class weights ``w`` (ones if None) and smoothing :math:`\varepsilon`:
    :math:`\ell_i = (1-\varepsilon) w_{y_i} (L_i - x_{i y_i}) + \tfrac{\varepsilon}{C}(L_i \sum_c w_c -
    \sum_c w_c x_{ic})` with :math:`L_i = \operatorname{logsumexp}_c x_{ic}`, which is
    ``F.cross_entropy(reduction="none")``. Returns ``(loss [R], hits [R])``: ``hits`` whether the target
    is the row's ``argmax``, empty unless asked for; not differentiable. Gradient: :math:`\partial \ell_i
    / \partial x_{ic} = a_i p_{ic} - (1-\varepsilon) w_{y_i} [c = y_i] - \tfrac{\varepsilon}{C} w_c` with
    :math:`a_i = (1-\varepsilon) w_{y_i} + \tfrac{\varepsilon}{C}\sum_c w_c`.

    Each block's softmax is written in the forward pass straight into the one ``[R, C]`` tensor the
    gradient becomes (target entries zeroed), so a block's exponentials are taken once, while it is in
    cache: the backward scales the rows in place and sets the target entries (a second backward
    recomputes the probabilities). :math:`\log p_t` is ``log(p_t)`` where ``p_t`` is a normal number,
    else the row's log-softmax (those rows alone); :math:`L_i = x_{i y_i} - \log p_t`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        smoothing: float,
        need_hits: bool,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        rows, classes = x.shape
        grad = torch.empty_like(x) if need_grad else None
        p_t = torch.empty(rows, dtype=x.dtype, device=x.device)
        # softmax keeps the logits' order (ties aside): the largest other probability decides the
        # accuracy, for all rows at once after the blocks (at 8 rows a block, the few small ops of the
        # comparison would cost more than the block's amax)
        others_max = torch.empty_like(p_t) if need_hits else None
        x_dot_w = torch.empty_like(p_t) if smoothing > 0 else None  # Σ_c w_c x_ic
        for block in row_blocks(rows, classes, x.device):
            xb = x[block]
            p = target_zeroed_softmax(xb, target[block, None], p_t[block, None], grad, block)
            if others_max is not None:
                torch.amax(p, -1, out=others_max[block])
            if x_dot_w is not None:
                x_dot_w[block] = xb.sum(-1) if weight is None else xb @ weight
        hits = (
            target_is_argmax(x, target, p_t, others_max)
            if others_max is not None
            else torch.empty(0, dtype=torch.bool, device=x.device)
        )
        log_p_t = exact_where_underflow(torch.log(p_t), p_t, x, target)
        loss = -log_p_t if weight is None else weight[target] * -log_p_t
        if x_dot_w is not None:
            total_weight = classes if weight is None else weight.sum()
            x_t = x.gather(-1, target[:, None]).squeeze(-1)
            smooth = (x_t - log_p_t) * total_weight - x_dot_w  # L Σ_c w_c - Σ_c w_c x_c
            loss = (1 - smoothing) * loss + (smoothing / classes) * smooth
        ctx.save_for_backward(x, target, weight, p_t)
        ctx.smoothing, ctx.grad = smoothing, grad
        ctx.mark_non_differentiable(hits)
        ctx.set_materialize_grads(False)
        return loss, hits

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor | None, _: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        x, target, weight, p_t = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        smoothing, classes = ctx.smoothing, x.shape[1]
        w_t = 1.0 if weight is None else weight[target]
        hard = grad_loss * (1 - smoothing) * w_t  # the one-hot part, per row
        total_weight = classes if weight is None else weight.sum()
        soft = grad_loss * (smoothing / classes)  # the smoothing part, per row (times w_c)
        scale = hard + soft * total_weight  # a_i
        recompute = grad is None  # a second backward (retain_graph=True): the forward's was handed out
        if recompute:
            grad = torch.empty_like(x)
        for block in row_blocks(*x.shape, x.device):
            if recompute:
                target_zeroed_softmax(x[block], target[block, None], None, grad, block)
            gb = grad[block].mul_(scale[block, None])
            if smoothing > 0:
                if weight is None:
                    gb.sub_(soft[block, None])
                else:
                    gb.addr_(soft[block], weight, alpha=-1)
        # the target entries, zeroed in the forward: a_i p_t - (1-ε) w_t (the smoothing part is in)
        grad.scatter_add_(-1, target[:, None], (scale * p_t - hard)[:, None])
        return grad, None, None, None, None, None


def exact_where_underflow(log_p_t: Tensor, p_t: Tensor, x: Tensor, target: Tensor) -> Tensor:
    """``log_p_t`` (from the probabilities ``p_t [R]`` of the targets of ``x [R, C]``) with the rows
    where ``p_t`` is not a normal number set to their log-softmax at the target: those rows alone, found
    by a host read (CPU paths only; it costs nothing there). In place; returns ``log_p_t``."""
    rows = (p_t < torch.finfo(p_t.dtype).tiny).nonzero().squeeze(1)
    if len(rows):
        log_p = torch.log_softmax(x[rows].to(p_t.dtype), dim=-1)
        log_p_t[rows] = log_p.gather(-1, target[rows, None]).squeeze(-1)
    return log_p_t


def _needs_grad(x: Tensor) -> bool:
    """Whether a fused function called on ``x`` now will be differentiated (inside its ``forward`` grad
    mode is off, so the caller tells it)."""
    return torch.is_grad_enabled() and x.requires_grad


def target_zeroed_softmax(
    xb: Tensor, index: Tensor, p_t: Tensor | None, grad: Tensor | None, block: slice
) -> Tensor:
    """A block's softmax, written into ``grad[block]`` when there is one (of ``xb``'s dtype), its target
    entries (``index [rows, 1]``) stored in ``p_t`` (if given) and then zeroed: what the fused
    cross-entropy and focal blocks keep of each block."""
    p = torch.softmax(xb, dim=-1) if grad is None else torch.softmax(xb, dim=-1, out=grad[block])
    if p_t is not None:
        torch.gather(p, -1, index, out=p_t)
    return p.scatter_(-1, index, 0.0)


def per_row_cross_entropy(
    logits: Tensor, target: Tensor, need_hits: bool = False, *, min_fused_bytes: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(F.cross_entropy(logits, target, reduction="none"), logits.argmax(-1) == target or None)`` for
    ``[R, C]`` logits and in-range ``target [R]``: by the fused function for CPU logits of
    ``min_fused_bytes`` (default :data:`FUSED_MIN_BYTES`) or more in eager mode, else by plain ops (under
    compile, on a GPU, or small enough that a fresh ``[R, C]`` tensor costs no page faults and the plain
    kernels win).

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> per_row_cross_entropy(logits, torch.tensor([0, 0]), need_hits=True)
    (tensor([0.1269, 2.1269]), tensor([ True, False]))
    """
    threshold = FUSED_MIN_BYTES if min_fused_bytes is None else min_fused_bytes
    fused = logits.device.type == "cpu" and logits.numel() * logits.element_size() >= threshold
    if not (fused and fused_path()):
        hits = row_argmax(logits.detach()) == target if need_hits else None
        return F.cross_entropy(logits, target, reduction="none"), hits
    loss, hits = _CrossEntropy.apply(logits, target, None, 0.0, need_hits, _needs_grad(logits))
    return loss, hits if need_hits else None


def target_is_argmax(
    x: Tensor, target: Tensor | Callable[[Tensor], Tensor], x_t: Tensor, others_max: Tensor | None = None
) -> Tensor:
    """Whether ``argmax(x) == target`` per row of ``x [R, C]``, given each row's target value ``x_t`` and
    largest other value ``others_max`` (or those of an order-keeping map of ``x``, such as its softmax;
    found from ``x`` if None). On a CPU an ``amax`` costs a fraction of an ``argmax``,
    which decides only the tied rows (its first index wins); elsewhere ``argmax`` itself (no host read,
    no copy of ``x``). ``target`` may be a function from row indices to their targets, called only for
    the rows that need them (on a CPU with ``others_max`` given: the tied rows)."""
    if x.device.type != "cpu" or others_max is None:
        every_target = target(torch.arange(len(x), device=x.device)) if callable(target) else target
        if x.device.type != "cpu":
            return x.argmax(-1) == every_target
        others_max = x.scatter(-1, every_target[:, None], float("-inf")).amax(-1)
    hits = x_t > others_max
    tied = (x_t == others_max).nonzero().squeeze(1)
    if len(tied):
        hits[tied] = row_argmax(x[tied]) == (target(tied) if callable(target) else target[tied])
    return hits


def _check(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    weight: Tensor | None,
) -> bool:
    """The checks; returns whether every target was found in ``[0, C)`` (see ``check_class_targets``)."""
    check_floating("logits", logits)
    check_ndim("logits", logits, (2, 3))
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"`target` must have shape {tuple(logits.shape[:-1])} (that of `logits` without its class "
            f"dimension), got {tuple(target.shape)} with `logits` of shape {tuple(logits.shape)}"
        )
    num_classes = logits.shape[-1]
    if mask is not None:
        check_mask("mask", mask, target.shape)
    in_range = check_class_targets("target", target, num_classes, ignore_index, mask)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}")
    if weight is not None and tuple(weight.shape) != (num_classes,):
        raise ValueError(f"`weight` must have shape ({num_classes},), got {tuple(weight.shape)}")
    return in_range


def _cross_entropy(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None,
    global_valid_toks: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    weight: Tensor | None,
    need_accuracy: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(loss, accuracy)``; ``accuracy`` (whether each valid element's target is its logits' ``argmax``,
    averaged over the valid elements, a float mask weighing them) only if asked for.

    Ops are few on purpose: on a GPU, and on a CPU at small sizes, a call's time is mostly the host's few
    µs per ATen op and autograd node. So ``ignore_index`` is left to ``F.cross_entropy``, which skips those
    elements itself, and without a ``mask`` it also sums them (at [64, 10] on this project's CPU, fwd+bwd
    with the accuracy took 92 µs against 163 µs with masks made of ``ignore_index``).
    """
    in_range = _check(logits, target, mask, ignore_index, label_smoothing, weight)
    target = target if target.dtype == torch.int64 else target.long()  # F.cross_entropy takes int64 only
    num_classes = logits.shape[-1]
    dtype = compute_dtype(logits)
    flat_logits = (logits if logits.ndim == 2 else logits.reshape(-1, num_classes)).to(dtype)
    flat_target = target if target.ndim == 1 else target.reshape(-1)
    class_weight = None if weight is None else weight.to(device=logits.device, dtype=dtype)
    # every element counts, as the host knows (a CPU check read the targets' range, and `ignore_index`
    # is not a class): no masks, counts or selects to make
    all_count = mask is None and in_range and not 0 <= ignore_index < num_classes
    if all_count:
        valid = keep = None
    elif mask is None:  # the valid elements weigh 1: `keep` holds them
        valid, keep = None, flat_target != ignore_index
    else:
        valid = valid_mask(target, mask, ignore_index, dtype).reshape(-1)
        keep = valid != 0
    fused = flat_logits.device.type == "cpu" and flat_logits.numel() >= FUSED_MIN_ELEMENTS and fused_path()
    # in-range targets (class 0 for the elements that do not count), where an op indexes with them
    needs_safe = keep is not None and (fused or valid is not None or class_weight is not None)
    safe_target = torch.where(keep, flat_target, 0) if needs_safe else flat_target
    hits = None
    whole_mean = False
    if fused:
        smoothing, need_grad = float(label_smoothing), _needs_grad(flat_logits)
        per_element, hits = _CrossEntropy.apply(
            flat_logits, safe_target, class_weight, smoothing, need_accuracy, need_grad
        )
        if keep is None:
            total = per_element.sum()
        else:
            total = torch.where(keep, per_element if valid is None else per_element * valid, 0.0).sum()
    else:
        if valid is None:  # F.cross_entropy skips the ignored elements: they add 0, and 0 to the gradient
            # with every element counted F.cross_entropy's mean is the loss (its denominator: the count, or
            # the targets' total class weight, as below)
            whole_mean = keep is None and global_valid_toks is None and flat_target.numel() > 0
            total = F.cross_entropy(
                flat_logits,
                flat_target,
                weight=class_weight,
                ignore_index=ignore_index,
                reduction="mean" if whole_mean else "sum",
                label_smoothing=label_smoothing,
            )
        else:  # masked-out targets may be out of range: class 0 stands in for them
            per_element = F.cross_entropy(
                flat_logits,
                safe_target,
                weight=class_weight,
                reduction="none",
                label_smoothing=label_smoothing,
            )
            total = torch.where(keep, per_element * valid, 0.0).sum()
        if need_accuracy:
            hits = row_argmax(flat_logits.detach()) == flat_target
    # the valid elements (weighted by the mask)
    count = flat_target.numel() if keep is None else keep.sum() if valid is None else valid.sum()
    accuracy = None
    if need_accuracy:
        assert hits is not None
        with torch.no_grad():
            if valid is not None:
                correct = torch.where(hits, valid, 0.0).sum()
            elif keep is None or (not fused and not 0 <= ignore_index < num_classes):
                correct = hits.sum()  # argmax of the logits is a class: an ignored target never hits
            else:  # the fused path's hits are of class 0 where the target is ignored
                correct = (hits & keep).sum()
            accuracy = divide_by_count(correct, count)  # float32 from integer counts
            accuracy = accuracy if accuracy.dtype == dtype else accuracy.to(dtype)
    if global_valid_toks is not None:
        return divide_by_count(total, global_valid_toks), accuracy
    if whole_mean:
        return total, accuracy
    if class_weight is not None:  # the mean's denominator weighs each valid element by its class weight
        weights = class_weight[safe_target]
        if valid is not None:
            count = (valid * weights).sum()
        else:
            count = weights.sum() if keep is None else torch.where(keep, weights, 0.0).sum()
    return divide_by_count(total, count), accuracy


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Cross-entropy of ``logits`` (classes on the **last** dimension) against class indices.

    Per valid element :math:`i` with target :math:`y_i`, class weights :math:`w` (1 by default) and
    smoothing :math:`\varepsilon` over :math:`C` classes,
    :math:`\ell_i = -(1-\varepsilon)\,w_{y_i}\log p_{i,y_i} - \tfrac{\varepsilon}{C}\sum_c w_c \log p_{i,c}`.
    Valid elements have ``target != ignore_index`` and a non-zero ``mask`` (a float mask weighs them).

    - Without ``global_valid_toks``: :math:`\sum_i m_i \ell_i / \sum_i m_i w_{y_i}`, which is
      ``F.cross_entropy(..., reduction="mean")``.
    - With ``global_valid_toks`` (TOKEN_LEVEL): :math:`\sum_i m_i \ell_i / \text{global\_valid\_toks}`, this
      micro-batch's share of the global batch's mean; class weights then scale tokens.

    No valid element gives 0 (with zero gradient), not NaN. CPU logits of :data:`FUSED_MIN_ELEMENTS` or
    more go through a fused function (see the module docstring), which has first derivatives only (a
    double backward raises); smaller ones and GPU logits through ``F.cross_entropy``.

    Args:
        logits: ``[N, C]`` or ``[B, T, V]``, any floating dtype (computed in float32 or float64).
        target: ``[N]`` or ``[B, T]`` integer class indices.
        mask: optional, the shape of ``target``; bool or float weights.
        global_valid_toks: optional 0-dim count of valid elements in the global batch.
        ignore_index: target value to skip.
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        weight: optional ``[C]`` class weights.

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> cross_entropy(logits, torch.tensor([0, 1]))
    tensor(0.1269)
    >>> cross_entropy(logits, torch.tensor([0, -100]))  # the ignored element does not count
    tensor(0.1269)
    """
    return _cross_entropy(
        logits, target, mask, global_valid_toks, ignore_index, label_smoothing, weight, need_accuracy=False
    )[0]


def cross_entropy_with_metrics(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`cross_entropy` and its detached metric ``accuracy`` (argmax of the logits equals the target,
    over the valid elements of this batch; a float mask weighs them), the argmax found in the same pass
    over the logits as the loss.

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> loss, metrics = cross_entropy_with_metrics(logits, torch.tensor([0, 0]))
    >>> loss, metrics["accuracy"]
    (tensor(1.1269), tensor(0.5000))
    """
    loss, accuracy = _cross_entropy(
        logits, target, mask, global_valid_toks, ignore_index, label_smoothing, weight, need_accuracy=True
    )
    assert accuracy is not None
    return loss, {"accuracy": accuracy}
