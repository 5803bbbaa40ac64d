"""Knowledge distillation: temperature-softened KL / reverse KL / generalized JSD, plus the task term."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.functional.cross_entropy import (
    cross_entropy,
    exp_floor,
    fused_path,
    row_blocks,
    row_dot,
    valid_mask,
)
from lightning_losses.protocol import check_floating, check_mask, check_ndim, check_same_shape, compute_dtype
from lightning_losses.reduction import masked_mean

__all__ = ["DistillationTerms", "distillation_loss", "kl_divergence"]

Direction = Literal["forward", "reverse", "jsd"]
DIRECTIONS: tuple[str, ...] = ("forward", "reverse", "jsd")


class DistillationTerms(NamedTuple):
    """What :func:`distillation_loss` returns: ``loss, kl_loss, task_loss = distillation_loss(...)``.

    ``kl_loss`` is the divergence term already scaled by ``T²``; ``task_loss`` is None without targets.
    """

    loss: Tensor
    kl_loss: Tensor
    task_loss: Tensor | None


def check_distillation_options(
    temperature: float, direction: str, beta: float, alpha: float | None = None
) -> None:
    """Raise ``ValueError`` naming the option for a temperature ≤ 0, an unknown direction, β outside
    (0, 1) (for ``"jsd"``) or, when given, α outside [0, 1].

    The one check of these options, shared by the functionals and ``KLDivergenceLoss.__init__``.

    >>> check_distillation_options(2.0, "jsd", 0.5, alpha=0.7)  # fine: returns None
    >>> check_distillation_options(2.0, "jsd", 1.0)
    Traceback (most recent call last):
        ...
    ValueError: `beta` must be in (0, 1) for direction='jsd', got 1.0
    >>> check_distillation_options(2.0, "forward", 0.5, alpha=1.5)
    Traceback (most recent call last):
        ...
    ValueError: `alpha` must be in [0, 1], got 1.5
    """
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}")
    if direction not in DIRECTIONS:
        raise ValueError(f"`direction` must be one of {list(DIRECTIONS)}, got {direction!r}")
    if direction == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"`beta` must be in (0, 1) for direction='jsd', got {beta}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")


def _kl_per_row(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P ‖ Q) = Σ_c p_c (log p_c − log q_c)`` over the last dimension, from log-probabilities.

    - ``p_c = 0`` (``log_p = -inf``): the class contributes 0 (``0·log 0 = 0``), with a zero gradient
      into both arguments. ``F.kl_div`` gives ``0·(−inf) = NaN`` there, in its value and, even where
      the value is masked out, in its gradient (``exp(log p)·(log p − log q + 1)``): so the ``-inf``
      entries are replaced by 0 *before* any arithmetic, and the class's term selected away after.
    - ``p_c > 0`` and ``q_c = 0``: the class contributes ``+inf``, KL's value by definition (the
      row's divergence is ``+inf``). Its gradient into ``log_q`` is the exact, finite ``−p_c``; into
      ``log_p`` it would be ``+inf`` (NaN after ``log_softmax``), so ``log_p`` is treated as a constant
      in that class's term: the gradients stay NaN-free and a masked-out row stays exactly 0.
    """
    p_zero = torch.isneginf(log_p)
    q_only_zero = torch.isneginf(log_q) & ~p_zero
    zero = log_p.new_zeros(())
    safe_log_p = torch.where(p_zero, zero, log_p)
    safe_log_p = torch.where(q_only_zero, safe_log_p.detach(), safe_log_p)
    safe_log_q = torch.where(p_zero, zero, log_q)
    terms = torch.exp(safe_log_p) * (safe_log_p - safe_log_q)
    return torch.where(p_zero, zero, terms).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """``log(β·p + (1 − β)·q)`` by ``logaddexp``; ``-inf`` (with a zero gradient) where ``p = q = 0``,
    where ``logaddexp``'s own gradient is ``0/NaN = NaN``."""
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    zero = log_p.new_zeros(())
    mixture = torch.logaddexp(
        torch.where(both_zero, zero, log_p) + math.log(beta),
        torch.where(both_zero, zero, log_q) + math.log1p(-beta),
    )
    return torch.where(both_zero, log_p.new_full((), -math.inf), mixture)


def _divergence_per_row(log_teacher: Tensor, log_student: Tensor, direction: str, beta: float) -> Tensor:
    if direction == "forward":
        return _kl_per_row(log_teacher, log_student)
    if direction == "reverse":
        return _kl_per_row(log_student, log_teacher)
    # generalized JSD, P = teacher, Q = student: M > 0 wherever P or Q is, so it is always finite
    log_mixture = _log_mixture(log_teacher, log_student, beta)
    return beta * _kl_per_row(log_teacher, log_mixture) + (1.0 - beta) * _kl_per_row(log_student, log_mixture)


class _FusedDivergence(torch.autograd.Function):
    r"""Per-row divergence of ``x [R, C]`` (student logits) from ``teacher [R, C]`` (a constant), both
    divided by :math:`T` and computed in ``dtype``, a block of rows at a time; of ``[R, C]`` size only the
    gradient is made and kept (when ``need_grad``), written in the forward pass while each block is in
    cache, so the backward scales it in place by each row's incoming gradient (a second backward, with
    ``retain_graph``, recomputes it).

    Each block takes a finite form (one exponential per side, logits centred on their row maximum, no
    NaN guards, exact wherever every term is finite) until one's result is not finite (``-inf`` or NaN
    logits, an overflow); that block and the rest take the guarded form. Forward KL (any device; off
    the CPU only the guarded form, the finite form's check being a host read): :func:`_finite_block_kl`,
    then :func:`_guarded_block_kl`. Reverse KL and JSD (CPU): :func:`_finite_block_reverse_kl` /
    :func:`_finite_block_jsd`, then :func:`_plain_block_divergence` (:func:`_divergence_per_row`, its
    gradient by autograd), so a guarded block equals the plain path in value and gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        teacher: Tensor,
        temperature: float,
        dtype: torch.dtype,
        need_grad: bool,
        direction: str,
        beta: float,
    ) -> Tensor:
        # the gradient ∂D/∂(x/T) per block while it is in cache; the backward only scales it by grad / T
        grad = torch.empty_like(x) if need_grad else None
        kl = _divergence_blocks(x, teacher, temperature, dtype, direction, beta, grad)
        ctx.save_for_backward(x, teacher)
        ctx.options = (temperature, dtype, direction, beta)
        ctx.grad = grad
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        temperature, dtype, direction, beta = ctx.options
        scale = (grad_kl / temperature)[:, None]
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through the graph (retain_graph=True): recomputed
            x, teacher = ctx.saved_tensors
            grad = torch.empty_like(x)
            _divergence_blocks(x, teacher, temperature, dtype, direction, beta, grad)
        # the forward's is scaled in place: it is handed out once
        return grad.mul_(scale.to(grad.dtype)), None, None, None, None, None, None


def _divergence_blocks(
    x: Tensor,
    teacher: Tensor,
    temperature: float,
    dtype: torch.dtype,
    direction: str,
    beta: float,
    grad: Tensor | None,
) -> Tensor:
    """The per-row divergence of :class:`_FusedDivergence`, with ``∂D/∂(x/T)`` written into ``grad``."""
    rows, classes = x.shape
    kl = torch.empty(rows, dtype=dtype, device=x.device)
    finite_form = finite_block_forms(beta)[direction]
    guarded_form = (
        _guarded_block_kl
        if direction == "forward"
        else functools.partial(_plain_block_divergence, direction=direction, beta=beta)
    )
    guarded = x.device.type != "cpu"  # the finite form's check is a host read

    def scaled(block: slice) -> tuple[Tensor, Tensor]:
        return _scaled(x[block], temperature, dtype), _scaled(teacher[block], temperature, dtype)

    for block in row_blocks(rows, classes, x.device):
        row_kl = None if guarded else finite_form(*scaled(block), grad, block)
        if row_kl is None:
            guarded = True  # -inf or NaN logits: likely in the next blocks too
            row_kl = guarded_form(*scaled(block), grad, block)
        kl[block] = row_kl
    return kl


def _scaled(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return logits.to(dtype) / temperature


def _guarded_block_kl(s: Tensor, u: Tensor, grad: Tensor | None, block: slice) -> Tensor:
    r"""The KL of each row of a block of scaled student and teacher logits ``s, u``, NaN-safe, with
    ``q - p`` written into ``grad[block]``.

    :math:`\mathrm{KL}_i = \sum_c p_c (\log p_c - \log q_c)` from PyTorch's fused ``softmax`` and
    ``log_softmax``. A class with :math:`p_c = 0` contributes 0 (its NaN product ``0 · (-inf)`` is
    zeroed), one with :math:`p_c > 0 = q_c` makes the row ``+inf``; a row whose ``log_softmax`` is NaN on
    either side (a NaN logit, or every logit ``-inf``) gets KL NaN and gradient 0. The gradient
    :math:`q - p` is finite in every case, as :func:`_kl_per_row`'s."""
    log_q, log_p = torch.log_softmax(s, dim=-1), torch.log_softmax(u, dim=-1)
    p = torch.softmax(u, dim=-1)  # the fused kernel: faster than exp(log_p) on a CPU
    undefined = log_q[:, 0].isnan() | log_p[:, 0].isnan()  # the whole row is NaN then
    log_ratio = log_p.sub_(log_q)
    if grad is not None:
        _write_difference(grad, block, torch.softmax(s, dim=-1), p)
    cross = torch.nan_to_num_(p.mul_(log_ratio), nan=0.0, posinf=math.inf, neginf=-math.inf)
    return torch.where(undefined, math.nan, cross.sum(-1))


def _centred_exp_(x: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""``x ← x - max x`` over the last dimension, in place; returns ``(e, Z)``, ``e = exp(x - max x)``
    (written into ``out`` when given) and its row sums ``Z [R, 1]``, so that ``softmax(x) = e / Z`` and
    :math:`\log\mathrm{softmax}(x) = (x - \max x) - \log Z` exactly where the logits are finite. A row
    holding ``-inf`` everywhere, ``+inf`` or NaN turns NaN.

    The exponents are floored at :func:`exp_floor` (a probability below :math:`e^{-86}` relative to the
    row's largest, 1, is taken as that: invisible in :math:`Z` and in every sum it weighs). On a CPU
    ``torch.exp`` of an input whose result is subnormal or 0 takes ~100× as long (2.7 ms against 27 µs
    at [256, 1000] with logits of standard deviation 30), so confident logits would be slow otherwise.
    ``x`` keeps its exact centred values for the log terms.

    >>> x = torch.tensor([[1.0, 3.0]])
    >>> e, z = _centred_exp_(x)
    >>> x, torch.allclose(x - z.log(), (e / z).log())
    (tensor([[-2.,  0.]]), True)
    """
    centred = x.sub_(x.amax(-1, keepdim=True))
    floor = exp_floor(x.dtype)
    exp = (centred.clamp(min=floor) if out is None else torch.clamp(centred, min=floor, out=out)).exp_()
    return exp, exp.sum(-1, keepdim=True)


def _finite_block_kl(s: Tensor, u: Tensor, grad: Tensor | None, block: slice) -> Tensor | None:
    r"""The KL of each row of a block of scaled student and teacher logits ``s, u`` (both consumed),
    with ``q - p`` written into ``grad[block]``; None (``grad[block]`` written all the same) when the
    result is not finite.

    With the logits centred on their row maximum (:func:`_centred_exp_`), :math:`\log p_c = \bar u_c -
    \log Z_p` and :math:`\mathrm{KL} = \sum_c e^{\bar u_c} (\bar u_c - \bar s_c) / Z_p + \log Z_q -
    \log Z_p`: one exponential per side in place of two ``log_softmax`` and the NaN guards. The logits
    are centred before they are subtracted, so a student whose logits are the teacher's plus a constant
    comes out as exactly as by ``log_softmax``. Exact wherever every term is finite; a ruled-out class
    (``0 · (-inf)``), a NaN or an overflow makes its row NaN or inf instead."""
    q_in_grad = grad is not None and grad.dtype == s.dtype
    exp_q, z_q = _centred_exp_(s, grad[block] if q_in_grad else None)
    exp_p, z_p = _centred_exp_(u)
    row_kl = row_dot(u.sub_(s), exp_p, overwrite=True).div_(z_p.squeeze(-1))
    row_kl.add_(z_q.div(z_p).log_().squeeze(-1))
    if grad is not None:  # q - p = exp_q / Z_q - exp_p / Z_p
        difference = exp_q.div_(z_q).addcmul_(exp_p, z_p.reciprocal(), value=-1.0)
        if not q_in_grad:
            grad[block] = difference
    return row_kl if math.isfinite(float(row_kl.sum())) else None


def _write_difference(grad: Tensor, block: slice, q: Tensor, p: Tensor) -> None:
    """``grad[block] = q - p``, 0 in the rows where either is NaN (see :func:`_guarded_block_kl`)."""
    if q.dtype == grad.dtype:
        torch.sub(q, p, out=grad[block]).nan_to_num_(nan=0.0)
    else:
        grad[block] = q.sub_(p).nan_to_num_(nan=0.0)


def _write_block(grad: Tensor, block: slice, values: Tensor) -> None:
    """``grad[block] = values``, cast to ``grad``'s dtype."""
    if values.dtype == grad.dtype:
        grad[block].copy_(values)
    else:
        grad[block] = values


def _finite_block_reverse_kl(s: Tensor, u: Tensor, grad: Tensor | None, block: slice) -> Tensor | None:
    r"""Reverse KL of each row of a block of scaled student and teacher logits ``s, u`` (both consumed),
    with its gradient :math:`q \odot (d - \sum_c q_c d_c)` written into ``grad[block]``; None when the
    result is not finite.

    With the centred logits of :func:`_centred_exp_` and :math:`d = \bar s - \bar u`,
    :math:`\log q - \log p = d - \log Z_q + \log Z_p`, so
    :math:`\mathrm{KL}(q\|p) = \sum_c q_c d_c + \log Z_p - \log Z_q`."""
    exp_q, z_q = _centred_exp_(s)
    q = exp_q.div_(z_q)
    _, z_p = _centred_exp_(u)
    shifted_log_ratio = s.sub_(u)
    expected = row_dot(q, shifted_log_ratio)
    row_kl = expected + z_p.div_(z_q).log_().squeeze(-1)
    if not math.isfinite(float(row_kl.sum())):
        return None
    if grad is not None:
        _write_block(grad, block, q.mul_(shifted_log_ratio.sub_(expected[:, None])))
    return row_kl


def _finite_block_jsd(
    s: Tensor, u: Tensor, grad: Tensor | None, block: slice, *, beta: float
) -> Tensor | None:
    r"""The generalized JSD of each row of a block (``s, u`` consumed), its gradient
    :math:`(1-\beta)\,q \odot (g - \sum_c q_c g_c)`, :math:`g = \log q - \log M`, written into
    ``grad[block]``; None when the result is not finite. With the exact :math:`\log q = \bar s -
    \log Z_q` (and :math:`\log p` alike, :func:`_centred_exp_`) and
    :math:`\log M = \operatorname{logaddexp}(\log\beta + \log p, \log(1-\beta) + \log q)`:
    :math:`D = \beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)`."""
    exp_q, z_q = _centred_exp_(s)
    q = exp_q.div_(z_q)
    exp_p, z_p = _centred_exp_(u)
    log_q, log_p = s.sub_(z_q.log()), u.sub_(z_p.log())
    log_m = torch.add(log_p, math.log(beta))
    torch.logaddexp(log_m, log_q + math.log1p(-beta), out=log_m)
    kl_pm = row_dot(log_p.sub_(log_m), exp_p, overwrite=True).div_(z_p.squeeze(-1))
    g = log_q.sub_(log_m)
    kl_qm = row_dot(g, q)
    row_jsd = kl_pm.mul_(beta).add_(kl_qm, alpha=1.0 - beta)
    if not math.isfinite(float(row_jsd.sum())):
        return None
    if grad is not None:
        _write_block(grad, block, q.mul_(g.sub_(kl_qm[:, None])).mul_(1.0 - beta))
    return row_jsd


BlockForm = Callable[[Tensor, Tensor, Tensor | None, slice], Tensor | None]


def finite_block_forms(beta: float) -> dict[str, BlockForm]:
    """The finite block form of each direction: ``form(s, u, grad, block)`` takes a block of scaled
    student and teacher logits (both consumed), writes ``∂D/∂s`` into ``grad[block]`` (when ``grad`` is
    given) and returns the rows' divergence, or None when it is not finite."""
    return {
        "forward": _finite_block_kl,
        "reverse": _finite_block_reverse_kl,
        "jsd": functools.partial(_finite_block_jsd, beta=beta),
    }


def _plain_block_divergence(
    s: Tensor, u: Tensor, grad: Tensor | None, block: slice, *, direction: str, beta: float
) -> Tensor:
    """The guarded form of reverse KL and JSD for a block: :func:`_divergence_per_row` on
    ``log_softmax``, each row's ``∂D/∂s`` (rows are independent) by autograd into ``grad[block]``, 0 in
    a row where it is NaN (a NaN logit, or every logit ``-inf``: the row's value is NaN then)."""
    with torch.enable_grad():
        student = s.requires_grad_(grad is not None)
        per_row = _divergence_per_row(
            torch.log_softmax(u, dim=-1), torch.log_softmax(student, dim=-1), direction, beta
        )
        if grad is not None:
            (row_grads,) = torch.autograd.grad(per_row.sum(), student)
            _write_block(grad, block, row_grads.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))
    return per_row.detach()


def _check_logits(logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> None:
    check_floating("logits", logits)
    check_floating("teacher_logits", teacher_logits)
    check_ndim("logits", logits, (2, 3))
    check_same_shape("logits", logits, "teacher_logits", teacher_logits)
    if mask is not None:
        check_mask("mask", mask, logits.shape[:-1])


def kl_divergence(
    logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    temperature: float = 1.0,
    direction: Direction = "forward",
    beta: float = 0.5,
) -> Tensor:
    r"""Divergence between the teacher's and the student's temperature-softened distributions.

    With :math:`p = \mathrm{softmax}(z^{t}/T)` (teacher, ``teacher_logits``) and
    :math:`q = \mathrm{softmax}(z^{s}/T)` (student, ``logits``), per row (sample or token) :math:`i`:

    - ``"forward"``: :math:`D_i = \mathrm{KL}(p\,\|\,q) = \sum_c p_c(\log p_c - \log q_c)` (Hinton et al.);
    - ``"reverse"``: :math:`D_i = \mathrm{KL}(q\,\|\,p)` (mode-seeking);
    - ``"jsd"``: the generalized Jensen–Shannon divergence with :math:`P` = teacher, :math:`Q` = student,
      :math:`D_i = \beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)`, :math:`M = \beta P + (1-\beta)Q`,
      :math:`\beta \in (0, 1)` (Agarwal et al., 2024, "On-Policy Distillation of Language Models").
      :math:`\beta = 0.5` is the symmetric Jensen–Shannon divergence, bounded by :math:`\log 2`;
      swapping teacher and student is the same as replacing :math:`\beta` by :math:`1 - \beta`.

    Everything is computed in log space, from ``log_softmax`` (``log M`` by ``logaddexp``, a two-term
    logsumexp) or, for finite logits of a constant teacher on a CPU, from logits centred on their row
    maximum (``log p`` up to a constant per row), a block of rows at a time with the gradient made in
    the forward pass, so confident logits give exact, finite values. ``-inf`` logits (classes
    ruled out, e.g. a padded vocabulary) are exact too, with NaN-free gradients even in masked-out rows:

    - a class with zero probability under the first argument of a KL contributes ``0·log 0 = 0``;
    - a class with mass under the first argument but none under the second makes the KL ``+inf``, its
      value by definition: forward KL where the *student* rules out a class the teacher allows, reverse
      KL where the *teacher* rules out a class the student allows. The gradients stay finite (the
      second argument's is exact; the first's treats that class's :math:`p_c` as a constant), and
      ``LossModule``'s ``nan_policy`` sees the non-finite loss;
    - ``"jsd"`` is always finite: :math:`M > 0` wherever :math:`P` or :math:`Q` is.

    No factor :math:`T^2` here (see :func:`distillation_loss`).

    Reduction, over valid rows (non-zero ``mask``; a float mask weighs them):

    - without ``global_valid_toks``: :math:`\sum_i m_i D_i / \sum_i m_i`, the mean over valid rows, also
      for ``[B, T, V]`` (not ``F.kl_div``'s ``batchmean``, which divides by ``B`` only);
    - with ``global_valid_toks`` (TOKEN_LEVEL): :math:`\sum_i m_i D_i / \text{global\_valid\_toks}`.

    No valid row gives exactly 0 with a zero gradient.

    Args:
        logits: the student's ``[N, C]`` or ``[B, T, V]`` logits, any floating dtype (computed in
            float32, or float64 when an input is float64).
        teacher_logits: the teacher's, same shape. Gradients flow into it too (detach it to freeze).
        mask: optional, ``logits.shape[:-1]``; bool or float weights.
        global_valid_toks: optional 0-dim count of valid rows of the global batch.
        temperature: :math:`T > 0`.
        direction: ``"forward"``, ``"reverse"`` or ``"jsd"``.
        beta: :math:`\beta \in (0, 1)` of ``"jsd"`` (ignored otherwise).

    >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    >>> kl_divergence(student, teacher)  # (σ(2) − σ(−2))·(log σ(2) − log σ(−2)) = 2·tanh(1)
    tensor(1.5232)
    >>> kl_divergence(student, teacher, direction="jsd")  # β = 0.5: symmetric, below log 2
    tensor(0.3278)
    """
    _check_logits(logits, teacher_logits, mask)
    check_distillation_options(temperature, direction, beta)
    dtype = compute_dtype(logits, teacher_logits)
    fused = (
        (direction == "forward" or logits.device.type == "cpu")  # off a CPU reverse/JSD: the plain path
        and fused_path()
        and not (teacher_logits.requires_grad and torch.is_grad_enabled())  # student gradient only
    )
    if fused:
        classes = logits.shape[-1]
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        per_row = _FusedDivergence.apply(
            logits.reshape(-1, classes),
            teacher_logits.reshape(-1, classes),
            float(temperature),
            dtype,
            need_grad,
            direction,
            float(beta),
        ).reshape(logits.shape[:-1])
        return masked_mean(per_row, mask, global_valid_toks)
    log_student = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_row = _divergence_per_row(log_teacher, log_student, direction, beta)
    return masked_mean(per_row, mask, global_valid_toks)


def distillation_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
    direction: Direction = "forward",
    beta: float = 0.5,
    ignore_index: int = -100,
) -> DistillationTerms:
    r"""Hinton et al.'s distillation objective (2015, "Distilling the Knowledge in a Neural Network").

    .. math::
        L = \alpha\,\mathrm{CE}(z^{s}, y) + (1 - \alpha)\,T^2\,D\big(\mathrm{softmax}(z^{t}/T),
        \mathrm{softmax}(z^{s}/T)\big)

    with :math:`D` the :func:`kl_divergence` of ``direction`` (forward KL by default) and CE the library's
    :func:`~lightning_losses.functional.cross_entropy` on the student's unsoftened logits. :math:`T^2`
    keeps the soft term's gradients at the scale of the hard term's as :math:`T` changes. Without
    ``target``, :math:`L = T^2 D` (``alpha`` is not used).

    Both terms average over the same valid rows: a non-zero ``mask`` (a float mask weighs them) and,
    given ``target``, ``target != ignore_index`` (a row marked as padding only by its target counts in
    neither term). Each is a mean over those rows, or their sum divided by ``global_valid_toks``
    (TOKEN_LEVEL; ``KLDivergenceLoss.valid_tokens`` counts the same rows).

    Args:
        logits: the student's ``[N, C]`` or ``[B, T, V]`` logits.
        teacher_logits: the teacher's, same shape.
        target: optional ``[N]`` / ``[B, T]`` class indices.
        mask: optional, ``logits.shape[:-1]``; bool or float weights.
        global_valid_toks: optional 0-dim count of valid rows of the global batch.
        temperature: :math:`T > 0`.
        alpha: weight :math:`\alpha \in [0, 1]` of the task (cross-entropy) term.
        direction: ``"forward"``, ``"reverse"`` or ``"jsd"`` (see :func:`kl_divergence`).
        beta: :math:`\beta \in (0, 1)` of ``"jsd"``.
        ignore_index: target value whose rows both terms skip.

    Returns:
        ``DistillationTerms(loss, kl_loss, task_loss)``: ``kl_loss`` is :math:`T^2 D`; ``task_loss`` is
        None without ``target``.

    >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    >>> terms = distillation_loss(student, teacher, torch.tensor([0]), temperature=2.0, alpha=0.5)
    >>> terms.kl_loss  # T²·KL of logits/T = [1, 0] vs [0, 1]: 4·tanh(0.5)
    tensor(1.8485)
    >>> terms.task_loss  # log(1 + e⁻²)
    tensor(0.1269)
    >>> terms.loss  # 0.5·task_loss + 0.5·kl_loss
    tensor(0.9877)
    """
    check_distillation_options(temperature, direction, beta, alpha)
    _check_logits(logits, teacher_logits, mask)
    task_loss = None
    if target is not None:  # checks `target` (shape, dtype, range) before it is used as a mask
        task_loss = cross_entropy(logits, target, mask, global_valid_toks, ignore_index=ignore_index)
        mask = valid_mask(target, mask, ignore_index, compute_dtype(logits))  # rows the task term averages
    kl_loss = temperature**2 * kl_divergence(
        logits,
        teacher_logits,
        mask,
        global_valid_toks,
        temperature=temperature,
        direction=direction,
        beta=beta,
    )
    if task_loss is None:
        return DistillationTerms(kl_loss, kl_loss, None)
    return DistillationTerms(alpha * task_loss + (1.0 - alpha) * kl_loss, kl_loss, task_loss)
