r"""Fused LM head + loss for large vocabularies: the ``[N, V]`` logits never exist whole.

A language model's last layer maps hidden states ``[N, H]`` to logits ``[N, V]`` with the LM-head weight
``[V, H]``. At ``N = 8192`` tokens and ``V = 32768`` the fp32 logits alone are 1 GiB, and the unfused
``F.linear`` + ``F.cross_entropy`` keeps several tensors of that size alive through backward (the logits,
their log-softmax, the gradient of each). The functions here instead walk over the tokens in chunks of
``chunk_size`` rows. For each chunk they compute its logits ``[chunk, V]``, the loss of its rows and,
in the same pass, the gradient of the loss with respect to those logits, which they turn right away into
the chunk's rows of ``∂L/∂hidden`` and add into ``∂L/∂weight`` (and ``∂L/∂bias``). The backward pass then
only scales these stored gradients by the incoming gradient: nothing of size ``[N, V]`` is ever saved.
Peak memory above the inputs is the gradients (the size of the inputs) plus a few ``[chunk, V]`` buffers.
Time stays that of the unfused path: the same three matrix products (logits, ``∂hidden``, ``∂weight``),
in pieces. The idea is Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024), written here in pure
PyTorch (CPU and GPU); ``compile=True`` runs the per-chunk element-wise math through ``torch.compile``
(the compiled function does not work in the logits' buffer in place, so it holds about two more
``[chunk, V]`` buffers: choose a smaller ``chunk_size`` with it when memory is tight).

Limits of the trick: the gradients are computed in the forward pass, so the forward pass costs the backward's
time too (except under ``torch.no_grad()`` or when no input requires grad: then no gradient is computed), and
double backward (gradients of gradients) is refused. Results equal the unfused path's up to
floating-point summation order (fp32 ≈ 1e-6 relative).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.functional.cross_entropy import exp_floor, row_blocks, row_dot, valid_mask
from lightning_losses.functional.distillation import (
    Direction,
    DistillationTerms,
    check_distillation_options,
    finite_block_forms,
)
from lightning_losses.protocol import (
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
    compute_dtype,
)
from lightning_losses.reduction import divide_by_count

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_distillation",
]

DEFAULT_CHUNK_ELEMENTS = 2**25
"""Default budget of one chunk's logits, in elements (128 MiB in fp32): ``chunk_size = 2**25 // V`` rows,
1024 at ``V = 32768``. Larger chunks keep the matrix products efficient; smaller ones save memory."""


def default_chunk_size(vocab_size: int, num_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's ``[rows, vocab_size]`` logits hold at most ``num_elements``.

    >>> default_chunk_size(32768), default_chunk_size(151936), default_chunk_size(10**9)
    (1024, 220, 1)
    """
    return max(1, num_elements // max(1, vocab_size))


# ----------------------------------------------------------------------------------------------------
# per-chunk math: logits [c, V] (a scratch buffer, overwritten) -> (sums [k], ∂sums[0]/∂logits or None)
# ----------------------------------------------------------------------------------------------------


def _log_softmax_(x: Tensor) -> Tensor:
    """``x ← log_softmax(x)`` over the last dimension, in place; returns the rows' logsumexp ``[c]``."""
    top = x.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row of -inf stays -inf, not NaN
    x.sub_(top)
    rest = torch.exp(x).sum(1, keepdim=True).log_()
    x.sub_(rest)
    return (top + rest).squeeze(1)


def _cross_entropy_chunk(
    logits: Tensor, target: Tensor, weights: Tensor, label_smoothing: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    r"""Per row :math:`\ell = \operatorname{lse}(z) - (1-\varepsilon) z_y - \varepsilon\,\overline{z}`
    (``F.cross_entropy``'s, smoothing included); returns :math:`[\sum_i w_i \ell_i]` and, written over
    ``logits``, :math:`\partial/\partial z = w\,(\mathrm{softmax}(z) - (1-\varepsilon)\,\mathrm{onehot}(y)
    - \varepsilon/V)`. On a CPU the exponents are floored at :func:`exp_floor`: a class below
    :math:`e^{-86.3}` of the row's largest probability (``-inf`` included) gets that much, which no sum
    in fp32 notices."""
    vocab = logits.shape[1]
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    smooth = logits.mean(1) * label_smoothing if label_smoothing else None
    top = logits.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    probs = logits.sub_(top)
    if probs.device.type == "cpu":  # a subnormal exp is ~100x slower on a CPU (see exp_floor)
        probs.clamp_(min=exp_floor(probs.dtype))
    probs.exp_()  # unnormalized softmax, in the logits' buffer
    total = probs.sum(1, keepdim=True)
    per_row = (top + total.log()).squeeze(1) - (1.0 - label_smoothing) * picked
    if smooth is not None:
        per_row = per_row - smooth
    loss = torch.where(weights != 0, per_row * weights, torch.zeros_like(per_row)).sum().reshape(1)
    if not need_grad:
        return loss, None
    probs.mul_((weights.unsqueeze(1) / total).nan_to_num_(nan=0.0))  # w·softmax; 0/0 of a masked row is 0
    probs.scatter_add_(1, target.unsqueeze(1), (-(1.0 - label_smoothing) * weights).unsqueeze(1))
    if label_smoothing:
        probs.sub_((label_smoothing / vocab) * weights.unsqueeze(1))
    return loss, probs


def _distillation_chunk(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    weights: Tensor,
    temperature: float,
    direction: str,
    beta: float,
    alpha: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    r"""``[total, T²·Σ w D, Σ w CE]`` of the rows and ∂total/∂logits, in log space (see
    :func:`fused_linear_distillation`). ``logits`` and ``teacher_logits`` are overwritten; at most five
    ``[c, V]`` tensors are alive at once (JSD; forward KL four, reverse KL three)."""
    inv_t = 1.0 / temperature
    picked = lse_1 = None
    if target is not None:
        picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        lse_1 = torch.logsumexp(logits, 1) if temperature != 1.0 else None
    if temperature != 1.0:
        logits.mul_(inv_t)
        teacher_logits.mul_(inv_t)
    log_q = logits  # the student's log-probabilities, in place
    lse_u = _log_softmax_(log_q)
    _log_softmax_(teacher_logits)  # the teacher's log p, in place
    q = torch.exp(log_q)
    q_zero = q == 0
    if direction == "forward":  # Σ p (log p − log q);  ∂D/∂(z/T) = q − p
        p = torch.exp(teacher_logits)
        diff = teacher_logits.sub_(log_q).masked_fill_(p == 0, 0.0)  # 0·log 0 = 0 where p = 0
        per_row = row_dot(diff, p, overwrite=True)
        del diff
        grad = q.sub_(p) if need_grad else None
        del p
    elif direction == "reverse":  # Σ q (log q − log p);  ∂D/∂(z/T) = q ⊙ (log q − log p − D)
        diff = teacher_logits.neg_().add_(log_q).masked_fill_(q_zero, 0.0)
        per_row = row_dot(diff, q)
        grad = diff.sub_(per_row.unsqueeze(1)).mul_(q).masked_fill_(q_zero, 0.0) if need_grad else None
    else:  # β KL(P‖M) + (1−β) KL(Q‖M);  ∂D/∂(z/T) = (1−β) q ⊙ (g − Σ q g),  g = log q − log M
        p = torch.exp(teacher_logits)
        log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)
        shifted_p = teacher_logits.add_(log_beta)  # log(β p)
        log_m = torch.add(log_q, log_1m_beta)  # log((1 − β) q), then log M
        torch.logaddexp(shifted_p, log_m, out=log_m)
        # KL(P‖M) = Σ p (log βp − log M) − log β Σ p
        diff = shifted_p.sub_(log_m).masked_fill_(p == 0, 0.0)
        kl_pm = row_dot(diff, p, overwrite=True) - log_beta * p.sum(1)
        del diff, p
        g = log_m.neg_().add_(log_q).masked_fill_(q_zero, 0.0)  # log q − log M, in log M's buffer
        kl_qm = row_dot(g, q)
        per_row = beta * kl_pm + (1.0 - beta) * kl_qm
        grad = g.sub_(kl_qm.unsqueeze(1)).mul_(q).mul_(1.0 - beta) if need_grad else None
    del q, q_zero
    kd_scale = temperature**2 * ((1.0 - alpha) if target is not None else 1.0)
    ce_row = None
    if target is not None:
        log_z = temperature * lse_u if lse_1 is None else lse_1  # logsumexp of the unsoftened logits
        ce_row = log_z - picked
    sums = _distillation_sums(per_row, ce_row, weights, temperature, alpha)
    if grad is None:
        return sums, None
    grad.mul_((kd_scale * inv_t) * weights.unsqueeze(1))  # ∂(T²·D)/∂z = T·∂D/∂(z/T)
    if target is not None and alpha != 0.0:
        # ∂CE/∂z = softmax(z) − onehot(y); softmax(z) = exp(T·log q + T·lse_u − lse(z)), in log q's buffer
        if lse_1 is not None:
            log_q.mul_(temperature).add_((temperature * lse_u - lse_1).unsqueeze(1))
        probs = log_q.exp_()
        aw = alpha * weights
        grad.add_(probs.mul_(aw.unsqueeze(1)))
        grad.scatter_add_(1, target.unsqueeze(1), -aw.unsqueeze(1))
    return sums, grad


def _finite_distillation_chunk(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    weights: Tensor,
    temperature: float,
    direction: str,
    beta: float,
    alpha: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None] | None:
    r""":func:`_distillation_chunk` in the finite forms of
    :func:`~lightning_losses.functional.distillation.kl_divergence` on a CPU, a block of rows at a time
    (:func:`row_blocks`, in cache): logits centred on their row maximum, one exponential per side, no
    ``log_softmax`` and no NaN guards. Exact where every term is finite; returns None when a row's
    divergence is not (``-inf`` or NaN logits, an overflow), having consumed both buffers: the caller
    recomputes them for :func:`_distillation_chunk`. Three ``[c, V]`` tensors (the two logits and the
    gradient) and, with a target, a block of ``softmax(z)`` (its exponents floored at :func:`exp_floor`,
    as the divergence's are)."""
    rows, vocab = logits.shape
    inv_t = 1.0 / temperature
    with_ce = target is not None
    ce_grad = with_ce and alpha != 0.0 and need_grad
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1) if with_ce else None
    kd_coef = (temperature**2 * ((1.0 - alpha) if with_ce else 1.0) * inv_t) * weights  # of ∂D/∂(z/T)
    block_form = finite_block_forms(beta)[direction]
    grad = torch.empty_like(logits) if need_grad else None
    per_row = logits.new_empty(rows)
    lse_z = logits.new_empty(rows) if with_ce else None
    ce_buffer = None
    for block in row_blocks(rows, vocab, logits.device):
        s, u = logits[block], teacher_logits[block]
        if with_ce:  # from the unsoftened logits, before the divergence consumes them; floored as its
            top = s.amax(1, keepdim=True)  # exponents (a subnormal exp is ~100x slower, see exp_floor)
            if ce_buffer is None:
                ce_buffer = torch.empty_like(s)
            exp_z = torch.sub(s, top, out=ce_buffer[: s.shape[0]]).clamp_(min=exp_floor(s.dtype)).exp_()
            total = exp_z.sum(1, keepdim=True)
            lse_z[block] = top.add_(total.log()).squeeze(1)
            ce_probs = exp_z.div_(total)
        if temperature != 1.0:
            s.mul_(inv_t)
            u.mul_(inv_t)
        row = block_form(s, u, grad, block)
        if row is None:
            return None
        per_row[block] = row
        if grad is not None:
            grad[block].mul_(kd_coef[block, None])
            if ce_grad:
                grad[block].add_(ce_probs.mul_((alpha * weights[block]).unsqueeze(1)))
    sums = _distillation_sums(per_row, None if lse_z is None else lse_z - picked, weights, temperature, alpha)
    if ce_grad:
        grad.scatter_add_(1, target.unsqueeze(1), -(alpha * weights).unsqueeze(1))
    return sums, grad


def _distillation_sums(
    per_row: Tensor, ce_row: Tensor | None, weights: Tensor, temperature: float, alpha: float
) -> Tensor:
    """``[total, T²·Σ w D, Σ w CE]`` of a chunk's rows (rows of weight 0 left out, whatever their values)."""
    zero = per_row.new_zeros(())
    kd_sum = torch.where(weights != 0, per_row * weights, zero).sum() * temperature**2
    if ce_row is None:
        return torch.stack([kd_sum, kd_sum, zero])
    ce_sum = torch.where(weights != 0, ce_row * weights, zero).sum()
    return torch.stack([alpha * ce_sum + (1.0 - alpha) * kd_sum, kd_sum, ce_sum])


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn)


# ----------------------------------------------------------------------------------------------------
# the autograd Function: loss sums in forward, with the gradients; backward scales them
# ----------------------------------------------------------------------------------------------------


class _FusedLinearLoss(torch.autograd.Function):
    """``sums = Σ_chunks chunk_fn(hidden[c] @ weight.T + bias, ...)``; only ``sums[0]`` is differentiable.

    A ``chunk_fn`` that returns None (a fast form that found a non-finite value) hands that chunk, with its
    logits computed again, and every later one to ``fallback_fn``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher: tuple[Tensor, Tensor, Tensor | None] | None,
        rows: tuple[Tensor | None, ...],
        chunk_fn: Callable[..., tuple[Tensor, Tensor | None] | None],
        fallback_fn: Callable[..., tuple[Tensor, Tensor | None]] | None,
        options: tuple[Any, ...],
        chunk_size: int,
        dtype: torch.dtype,
        needs: tuple[bool, bool, bool],
        num_sums: int,
    ) -> tuple[Tensor, Tensor]:
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = needs
        need_grad = need_h or need_w or need_b
        h_all, w_all = hidden.to(dtype), weight.to(dtype)
        b_all = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_w = torch.zeros_like(w_all) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=hidden.device) if need_b else None
        sums = torch.zeros(num_sums, dtype=dtype, device=hidden.device)
        rows_per_chunk = max(1, min(chunk_size, num_rows))
        buffer = torch.empty(rows_per_chunk, vocab, dtype=dtype, device=hidden.device)
        if teacher is not None:
            t_hidden, t_weight, t_bias = (None if t is None else t.to(dtype) for t in teacher)
            t_buffer = torch.empty_like(buffer)

        def chunk_args(start: int, stop: int) -> list[Any]:
            args = [_linear_into(buffer[: stop - start], h_all[start:stop], w_all, b_all)]
            if teacher is not None:
                args.append(_linear_into(t_buffer[: stop - start], t_hidden[start:stop], t_weight, t_bias))
            return args + [None if r is None else r[start:stop] for r in rows]

        for start in range(0, num_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_rows)
            h = h_all[start:stop]
            result = chunk_fn(*chunk_args(start, stop), *options, need_grad)
            if result is None:  # a fast form's value was not finite: the guarded form from here on
                chunk_fn = fallback_fn
                result = chunk_fn(*chunk_args(start, stop), *options, need_grad)
            chunk_sums, grad = result
            sums += chunk_sums
            if grad is None:
                continue
            if need_h:
                torch.mm(grad, w_all, out=grad_h[start:stop])
            if need_w:
                grad_w.addmm_(grad.t(), h)
            if need_b:
                grad_b += grad.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        total, extras = sums[0].clone(), sums[1:].clone()
        ctx.mark_non_differentiable(extras)  # metrics: only the total carries a gradient
        return total, extras

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor, grad_extras: Tensor) -> tuple[Tensor | None, ...]:
        # not in place: the stored gradients stay valid for another backward (retain_graph=True)
        grads = tuple(
            None if g is None else (g * grad_total).to(dt)
            for g, dt in zip(ctx.grads, ctx.dtypes, strict=True)
        )
        return (*grads, None, None, None, None, None, None, None, None, None)


def _linear_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


# ----------------------------------------------------------------------------------------------------
# checks and entry points
# ----------------------------------------------------------------------------------------------------


def _check_linear(
    hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor, bias_name: str, bias: Tensor | None
) -> None:
    check_floating(hidden_name, hidden)
    check_floating(weight_name, weight)
    check_ndim(hidden_name, hidden, (2, 3))
    check_ndim(weight_name, weight, 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`{weight_name}` must have shape [V, {hidden.shape[-1]}] (its second dimension the hidden "
            f"size of `{hidden_name}`), got {tuple(weight.shape)} with `{hidden_name}` of shape "
            f"{tuple(hidden.shape)}"
        )
    if bias is not None:
        check_floating(bias_name, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"`{bias_name}` must have shape ({weight.shape[0]},) (the vocabulary of `{weight_name}` "
                f"{tuple(weight.shape)}), got {tuple(bias.shape)}"
            )


def _check_rows(
    hidden: Tensor, target: Tensor | None, mask: Tensor | None, vocab: int, ignore_index: int, chunk_size: Any
) -> None:
    rows_shape = tuple(hidden.shape[:-1])
    if mask is not None:
        check_mask("mask", mask, rows_shape)
    if target is not None:
        if tuple(target.shape) != rows_shape:
            raise ValueError(
                f"`target` must have shape {rows_shape} (that of `hidden` without its hidden dimension), "
                f"got {tuple(target.shape)} with `hidden` of shape {tuple(hidden.shape)}"
            )
        check_class_targets("target", target, vocab, ignore_index, mask)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}")


def _run(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: tuple[Tensor, Tensor, Tensor | None] | None,
    rows: tuple[Tensor | None, ...],
    chunk_fn: Callable[..., tuple[Tensor, Tensor | None] | None],
    options: tuple[Any, ...],
    chunk_size: int | None,
    dtype: torch.dtype,
    num_sums: int,
    compile: bool,
    fallback_fn: Callable[..., tuple[Tensor, Tensor | None]] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(total, extras)``: the differentiable 0-dim sum and the other sums (metrics, no gradient).
    ``chunk_fn`` may be a fast form that returns None where ``fallback_fn`` must take over."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_rows = tuple(None if r is None else r.reshape(-1) for r in rows)
    if teacher is not None:
        t_hidden, t_weight, t_bias = teacher
        teacher = (
            t_hidden.detach().reshape(-1, t_hidden.shape[-1]),
            t_weight.detach(),
            None if t_bias is None else t_bias.detach(),
        )
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if compile:  # the guarded form only: a fast form's finiteness check is a host read, a graph break
        chunk_fn, fallback_fn = _compiled(fallback_fn or chunk_fn), None
    return _FusedLinearLoss.apply(
        flat_hidden, weight, bias, teacher, flat_rows, chunk_fn, fallback_fn, options, chunk, dtype, needs,
        num_sums,
    )  # fmt: skip


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    compile: bool = False,
) -> Tensor:
    r"""Cross-entropy of the logits :math:`z = h W^\top + b` without ever holding all of them.

    Equals :func:`~lightning_losses.functional.cross_entropy` of ``F.linear(hidden, weight, bias)`` (value and
    gradients, up to summation order): per valid row :math:`i`, :math:`\ell_i = \operatorname{logsumexp}(z_i)
    - (1-\varepsilon)\,z_{i,y_i} - \tfrac{\varepsilon}{V}\sum_c z_{i,c}`, and
    :math:`L = \sum_i m_i \ell_i / \sum_i m_i` or, given ``global_valid_toks`` (TOKEN_LEVEL),
    :math:`\sum_i m_i \ell_i / \text{global\_valid\_toks}`. Valid rows have a non-zero ``mask`` (a float mask
    weighs them) and ``target != ignore_index``; none gives exactly 0 with zero gradients.

    Memory: the logits of ``chunk_size`` rows at a time (see the module docstring); computed in float32
    (float64 for float64 inputs), gradients returned in each input's dtype.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` hidden states (the LM head's input).
        weight: ``[V, H]`` LM-head weight.
        target: ``[N]`` or ``[B, T]`` class indices.
        mask: optional, the shape of ``target``; bool or float weights.
        global_valid_toks: optional 0-dim count of valid rows of the global batch.
        bias: optional ``[V]`` LM-head bias.
        ignore_index: target value to skip.
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        chunk_size: rows per chunk; default :func:`default_chunk_size` (128 MiB of fp32 logits).
        compile: run the per-chunk softmax math through ``torch.compile``.

    >>> import torch.nn.functional as F
    >>> hidden, weight = torch.randn(10, 4), torch.randn(7, 4, requires_grad=True)
    >>> target = torch.randint(0, 7, (10,))
    >>> fused = fused_linear_cross_entropy(hidden, weight, target, chunk_size=3)
    >>> torch.allclose(fused, F.cross_entropy(F.linear(hidden, weight), target))
    True
    >>> fused.backward(); weight.grad.shape
    torch.Size([7, 4])
    """
    _check_linear("hidden", hidden, "weight", weight, "bias", bias)
    _check_rows(hidden, target, mask, weight.shape[0], ignore_index, chunk_size)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}")
    dtype = compute_dtype(hidden, weight, *(() if bias is None else (bias,)))
    valid = valid_mask(target, None if mask is None else mask.detach(), ignore_index, dtype)
    safe_target = torch.where(valid != 0, target, torch.zeros_like(target))
    total, _ = _run(
        hidden, weight, bias, None, (safe_target, valid), _cross_entropy_chunk, (float(label_smoothing),),
        chunk_size, dtype, 1, compile,
    )  # fmt: skip
    count = valid.sum() if global_valid_toks is None else global_valid_toks
    return divide_by_count(total, count)


def fused_linear_distillation(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    direction: Direction = "forward",
    beta: float = 0.5,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    compile: bool = False,
) -> DistillationTerms:
    r"""Knowledge distillation from LM heads, chunk by chunk: the student's and the teacher's ``[N, V]``
    logits never exist whole.

    With :math:`z^s = h^s W_s^\top + b_s` and :math:`z^t = h^t W_t^\top + b_t` (computed ``chunk_size`` rows
    at a time, the teacher's without gradient), this equals
    :func:`~lightning_losses.functional.distillation.distillation_loss` of those logits:
    :math:`L = \alpha\,\mathrm{CE}(z^s, y) + (1-\alpha)\,T^2 D(\mathrm{softmax}(z^t/T),
    \mathrm{softmax}(z^s/T))`, or :math:`T^2 D` without ``target``. :math:`D` is
    :func:`~lightning_losses.functional.kl_divergence`'s:
    ``"forward"`` :math:`\mathrm{KL}(p\|q)`, ``"reverse"`` :math:`\mathrm{KL}(q\|p)`, ``"jsd"``
    :math:`\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)`, :math:`m = \beta p + (1-\beta) q`
    (p the teacher, q the student), all in log space. Both terms average over the same valid rows (non-zero
    ``mask`` and, given ``target``, ``target != ignore_index``): divided by their weight or by
    ``global_valid_toks``. Classes ruled out by both (``-inf`` logits, e.g. a padded vocabulary) are exact;
    a class only the student rules out makes forward KL ``+inf`` (only the teacher: reverse KL), as in
    ``kl_divergence``, but its gradient is then not defined here (may be NaN).

    The gradients into the student's hidden states, weight and bias are computed in the forward pass
    (see the module docstring); teacher inputs get none (they are detached). On a CPU every direction
    takes ``kl_divergence``'s finite forms (one exponential per side, a block of rows at a time) until a
    chunk holds a non-finite value (e.g. ``-inf`` logits); that chunk and the rest take the guarded
    log-space form.

    Args:
        student_hidden: ``[N, H]`` or ``[B, T, H]``.
        student_weight: ``[V, H]``.
        teacher_hidden: ``[N, H_t]`` or ``[B, T, H_t]``: the teacher's hidden states of the same rows.
        teacher_weight: ``[V, H_t]``: the same vocabulary ``V``.
        target: optional class indices of the rows (the CE term's).
        mask: optional row weights, the shape of the rows; bool or float.
        global_valid_toks: optional 0-dim count of valid rows of the global batch.
        student_bias / teacher_bias: optional ``[V]``.
        temperature / alpha / direction / beta / ignore_index: as in ``distillation_loss``.
        chunk_size: rows per chunk; default :func:`default_chunk_size`.
        compile: run the per-chunk math through ``torch.compile``.

    Returns:
        ``DistillationTerms(loss, kl_loss, task_loss)``: ``kl_loss`` is :math:`T^2 D`, ``task_loss`` the CE
        term (None without ``target``); only ``loss`` carries a gradient.

    >>> from lightning_losses.functional import distillation_loss
    >>> hs, ws, ht, wt = torch.randn(6, 4), torch.randn(9, 4), torch.randn(6, 3), torch.randn(9, 3)
    >>> fused = fused_linear_distillation(hs, ws, ht, wt, temperature=2.0, direction="jsd", chunk_size=4)
    >>> unfused = distillation_loss(hs @ ws.T, ht @ wt.T, temperature=2.0, direction="jsd")
    >>> torch.allclose(fused.loss, unfused.loss), torch.allclose(fused.kl_loss, unfused.kl_loss)
    (True, True)
    """
    check_distillation_options(temperature, direction, beta, alpha)
    _check_linear(
        "student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias
    )
    _check_linear(
        "teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias
    )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            "`teacher_hidden` and `student_hidden` must hold the same rows (equal shapes but the hidden "
            f"size), got {tuple(teacher_hidden.shape)} and {tuple(student_hidden.shape)}"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            "`teacher_weight` and `student_weight` must have the same vocabulary (first dimension), got "
            f"{tuple(teacher_weight.shape)} and {tuple(student_weight.shape)}"
        )
    _check_rows(student_hidden, target, mask, student_weight.shape[0], ignore_index, chunk_size)
    extra = tuple(t for t in (student_bias, teacher_bias) if t is not None)
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, *extra)
    mask = None if mask is None else mask.detach()
    if target is None:
        valid = (
            torch.ones(student_hidden.shape[:-1], dtype=dtype, device=student_hidden.device)
            if mask is None
            else mask.to(dtype)
        )
        safe_target = None
    else:
        valid = valid_mask(target, mask, ignore_index, dtype)
        safe_target = torch.where(valid != 0, target, torch.zeros_like(target))
    finite_form = student_hidden.device.type == "cpu"  # the finite forms' check is a host read
    total, extras = _run(
        student_hidden, student_weight, student_bias, (teacher_hidden, teacher_weight, teacher_bias),
        (safe_target, valid), _finite_distillation_chunk if finite_form else _distillation_chunk,
        (float(temperature), direction, float(beta), float(alpha)), chunk_size, dtype, 3, compile,
        _distillation_chunk if finite_form else None,
    )  # fmt: skip
    count = valid.sum() if global_valid_toks is None else global_valid_toks
    loss = divide_by_count(total, count)
    kl_loss = divide_by_count(extras[0], count)
    if target is None:
        return DistillationTerms(loss, kl_loss, None)
    return DistillationTerms(loss, kl_loss, divide_by_count(extras[1], count))
