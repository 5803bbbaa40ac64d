"""``FusedLinearCrossEntropyLoss`` (``fused_linear_cross_entropy``) and ``FusedLinearDistillationLoss``
(``fused_linear_distillation``): next-token losses from hidden states and the LM-head weight, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_losses.functional.cross_entropy import valid_mask
from lightning_losses.functional.distillation import Direction, check_distillation_options
from lightning_losses.functional.fused_linear import (
    _check_linear,
    fused_linear_cross_entropy,
    fused_linear_distillation,
)
from lightning_losses.protocol import (
    LossFunction,
    LossOutput,
    LossType,
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
)
from lightning_losses.registry import register_loss

__all__ = ["FusedLinearCrossEntropyLoss", "FusedLinearDistillationLoss"]


def _check_options(shift: bool, chunk_size: int | None) -> None:
    if not isinstance(shift, bool):
        raise TypeError(f"`shift` must be a bool, got {type(shift).__name__}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}")


def _aligned_rows(name: str, hidden_states: Tensor, shift: bool) -> Tensor:
    """``hidden_states [B, T, H]`` → the rows that score a token: ``[:, :-1]`` with ``shift``."""
    check_floating(name, hidden_states)
    check_ndim(name, hidden_states, 3)
    return hidden_states[:, :-1] if shift else hidden_states


def _aligned_tokens(tensor: Tensor | None, shift: bool) -> Tensor | None:
    """``input_ids`` / ``token_mask`` ``[B, T]`` → the scored tokens: ``[:, 1:]`` with ``shift``."""
    if tensor is None or not shift:
        return tensor
    if tensor.ndim != 2:
        raise ValueError(f"token tensors must be [B, T], got shape {tuple(tensor.shape)}")
    return tensor[:, 1:]


def _check_tokens(hidden_states: Tensor, name: str, tensor: Tensor | None) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"`{name}` must have shape {tuple(hidden_states.shape[:2])} (that of `hidden_states` without its "
            f"hidden dimension), got {tuple(tensor.shape)} with `hidden_states` of shape "
            f"{tuple(hidden_states.shape)}"
        )


def _check_inputs(
    prefix: str,
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    input_ids: Tensor | None,
    token_mask: Tensor | None,
    ignore_index: int,
    shift: bool,
) -> None:
    """The functional's checks, run first under the names of this module's inputs (``hidden_states``,
    ``lm_head_weight``, ``input_ids``, ...; ``prefix`` ``"teacher_"`` for the teacher's), so that an error
    names the input the caller passed (the functional's names are ``hidden``, ``weight``, ``target``).
    The ids' range is checked where they are scored (``[:, 1:]`` with ``shift``) and counted."""
    _check_linear(
        f"{prefix}hidden_states",
        hidden_states,
        f"{prefix}lm_head_weight",
        lm_head_weight,
        f"{prefix}lm_head_bias",
        lm_head_bias,
    )
    check_ndim(f"{prefix}hidden_states", hidden_states, 3)
    _check_tokens(hidden_states, "input_ids", input_ids)
    if token_mask is not None:
        check_mask("token_mask", token_mask, hidden_states.shape[:2])
    if input_ids is not None:
        scored, mask = _aligned_tokens(input_ids, shift), _aligned_tokens(token_mask, shift)
        check_class_targets("input_ids", scored, lm_head_weight.shape[0], ignore_index, mask)


@register_loss("fused_linear_cross_entropy")
class FusedLinearCrossEntropyLoss(LossFunction):
    r"""Next-token cross-entropy (SFT) from hidden states and the LM head, without ``[B, T, V]`` logits.

    :math:`L = -\sum_{i,t} m_{it}\log\mathrm{softmax}(h_{it} W^\top + b)_{y_{it}} / N`, TOKEN_LEVEL: equal to
    :class:`~lightning_losses.losses.NLLLoss` on the materialized logits ``hidden_states @ lm_head_weight.T``
    (loss and gradients), at a fraction of the memory; see
    :func:`lightning_losses.functional.fused_linear.fused_linear_cross_entropy` for how.

    Inputs, resolved by name under ``LossModule``: ``hidden_states`` ``[B, T, H]`` and ``lm_head_weight``
    ``[V, H]`` (e.g. from ``TinyCausalLM(return_logits=False)``), ``input_ids`` and optional ``token_mask``
    ``[B, T]``, optional ``lm_head_bias`` ``[V]``.

    Args:
        shift: ``hidden_states[:, t]`` scores ``input_ids[:, t + 1]`` (NeMo RL's convention; default), or
            ``input_ids[:, t]`` with ``shift=False``.
        ignore_index: token id that is never scored (besides masked tokens).
        label_smoothing: ε in [0, 1].
        chunk_size: rows per chunk (default: about 128 MiB of fp32 logits per chunk).
        compile: run the per-chunk math through ``torch.compile``.

    :meth:`valid_tokens` counts the scored tokens (mask, shifted, without ``ignore_index`` ids), so
    ``global_valid_toks`` is exactly this loss's denominator. Metrics: ``loss`` and ``num_valid_tokens``
    (this micro-batch's).

    >>> hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    >>> ids, mask = torch.randint(0, 11, (2, 5)), torch.ones(2, 5)
    >>> fused = FusedLinearCrossEntropyLoss()(hidden, weight, ids, mask)
    >>> from lightning_losses.losses.nll import NLLLoss
    >>> unfused = NLLLoss()(hidden @ weight.T, ids, mask)
    >>> torch.allclose(fused.loss, unfused.loss), fused.metrics["num_valid_tokens"]
    (True, tensor(8.))
    """

    loss_type = LossType.TOKEN_LEVEL

    def __init__(
        self,
        shift: bool = True,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_options(shift, chunk_size)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}")
        self.shift = shift
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.compile = compile

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """The weights of the scored tokens: ``token_mask`` (ones without it), shifted, times
        ``input_ids != ignore_index``."""
        ids = _aligned_tokens(inputs["input_ids"], self.shift)
        return valid_mask(ids, _aligned_tokens(inputs.get("token_mask"), self.shift), self.ignore_index)

    def forward(
        self,
        hidden_states: Tensor,
        lm_head_weight: Tensor,
        input_ids: Tensor,
        token_mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
        lm_head_bias: Tensor | None = None,
    ) -> LossOutput:
        _check_inputs(
            "",
            hidden_states,
            lm_head_weight,
            lm_head_bias,
            input_ids,
            token_mask,
            self.ignore_index,
            self.shift,
        )
        hidden = _aligned_rows("hidden_states", hidden_states, self.shift)
        target = _aligned_tokens(input_ids, self.shift)
        mask = _aligned_tokens(token_mask, self.shift)
        loss = fused_linear_cross_entropy(
            hidden, lm_head_weight, target, mask, global_valid_toks, bias=lm_head_bias,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, chunk_size=self.chunk_size,
            compile=self.compile,
        )  # fmt: skip
        with torch.no_grad():
            count = valid_mask(target, mask, self.ignore_index, loss.dtype).sum()
        return LossOutput(loss, {"loss": loss.detach(), "num_valid_tokens": count})

    def extra_repr(self) -> str:
        return f"shift={self.shift}, ignore_index={self.ignore_index}, chunk_size={self.chunk_size}"


@register_loss("fused_linear_distillation")
class FusedLinearDistillationLoss(LossFunction):
    r"""Token-level knowledge distillation from the student's and the teacher's LM heads, chunk by chunk.

    :math:`L = \alpha\,\mathrm{CE}(z^s, y) + (1-\alpha)\,T^2 D(\mathrm{softmax}(z^t/T),
    \mathrm{softmax}(z^s/T))` with :math:`z = h W^\top (+ b)` of the student and the teacher, never
    materialized whole; ``D`` is forward KL, reverse KL or a generalized JSD (``direction``, ``beta``).
    Equal to :class:`~lightning_losses.losses.KLDivergenceLoss` on the materialized (shifted) logits; see
    :func:`lightning_losses.functional.fused_linear.fused_linear_distillation`. TOKEN_LEVEL.

    Inputs, resolved by name under ``LossModule``: ``hidden_states`` ``[B, T, H]`` and ``lm_head_weight``
    ``[V, H]`` (the student's: model outputs), ``teacher_hidden_states`` ``[B, T, H_t]`` and
    ``teacher_lm_head_weight`` ``[V, H_t]`` (from the batch or the outputs; no gradient reaches them),
    optional ``input_ids`` (the CE term's targets; without them :math:`L = T^2 D`), ``token_mask``,
    ``lm_head_bias`` and ``teacher_lm_head_bias``. With ``shift`` (default) position ``t`` is the row that
    predicts token ``t + 1``: rows ``[:, :-1]``, targets and mask ``[:, 1:]``.

    Args:
        temperature / alpha / direction / beta / ignore_index: as in ``KLDivergenceLoss``.
        shift: the next-token alignment above.
        chunk_size: rows per chunk (default: about 128 MiB of fp32 logits per chunk).
        compile: run the per-chunk math through ``torch.compile``.

    Metrics: ``loss``, ``kl_loss`` (:math:`T^2 D`), ``task_loss`` (the CE term; 0 without ``input_ids``),
    ``num_valid_tokens``.

    >>> hs, ws, ht, wt = torch.randn(2, 5, 8), torch.randn(11, 8), torch.randn(2, 5, 6), torch.randn(11, 6)
    >>> loss_fn = FusedLinearDistillationLoss(temperature=2.0, alpha=0.5)
    >>> out = loss_fn(hs, ws, ht, wt, input_ids=torch.randint(0, 11, (2, 5)))
    >>> sorted(out.metrics)
    ['kl_loss', 'loss', 'num_valid_tokens', 'task_loss']
    """

    loss_type = LossType.TOKEN_LEVEL
    partial_metrics = ("kl_loss", "task_loss")

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.7,
        direction: Direction = "forward",
        beta: float = 0.5,
        ignore_index: int = -100,
        shift: bool = True,
        chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_distillation_options(temperature, direction, beta, alpha)
        _check_options(shift, chunk_size)
        self.temperature = temperature
        self.alpha = alpha
        self.direction = direction
        self.beta = beta
        self.ignore_index = ignore_index
        self.shift = shift
        self.chunk_size = chunk_size
        self.compile = compile

    def _weights(self, rows_shape: torch.Size, input_ids: Tensor | None, token_mask: Tensor | None) -> Tensor:
        target = _aligned_tokens(input_ids, self.shift)
        mask = _aligned_tokens(token_mask, self.shift)
        if target is not None:
            return valid_mask(target, mask, self.ignore_index)
        if mask is not None:
            return mask.to(torch.float32)
        return torch.ones(rows_shape, dtype=torch.float32)

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """The rows both terms average over: the shifted ``token_mask`` (ones without it) times
        ``input_ids != ignore_index`` when ``input_ids`` are given."""
        hidden = inputs["hidden_states"]
        rows = hidden.shape[:2] if not self.shift else (hidden.shape[0], hidden.shape[1] - 1)
        return self._weights(torch.Size(rows), inputs.get("input_ids"), inputs.get("token_mask")).to(
            hidden.device
        )

    def forward(
        self,
        hidden_states: Tensor,
        lm_head_weight: Tensor,
        teacher_hidden_states: Tensor,
        teacher_lm_head_weight: Tensor,
        input_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
        lm_head_bias: Tensor | None = None,
        teacher_lm_head_bias: Tensor | None = None,
    ) -> LossOutput:
        _check_inputs(
            "",
            hidden_states,
            lm_head_weight,
            lm_head_bias,
            input_ids,
            token_mask,
            self.ignore_index,
            self.shift,
        )
        _check_inputs(
            "teacher_",
            teacher_hidden_states,
            teacher_lm_head_weight,
            teacher_lm_head_bias,
            None,
            None,
            0,
            False,
        )
        if teacher_hidden_states.shape[:2] != hidden_states.shape[:2]:
            raise ValueError(
                "`teacher_hidden_states` must hold the tokens of `hidden_states` (the same [B, T]), got "
                f"shapes {tuple(teacher_hidden_states.shape)} and {tuple(hidden_states.shape)}"
            )
        if teacher_lm_head_weight.shape[0] != lm_head_weight.shape[0]:
            raise ValueError(
                "`teacher_lm_head_weight` must have the vocabulary of `lm_head_weight` (first dimension), "
                f"got shapes {tuple(teacher_lm_head_weight.shape)} and {tuple(lm_head_weight.shape)}"
            )
        hidden = _aligned_rows("hidden_states", hidden_states, self.shift)
        teacher_hidden = _aligned_rows("teacher_hidden_states", teacher_hidden_states, self.shift)
        target, mask = _aligned_tokens(input_ids, self.shift), _aligned_tokens(token_mask, self.shift)
        terms = fused_linear_distillation(
            hidden, lm_head_weight, teacher_hidden, teacher_lm_head_weight, target, mask, global_valid_toks,
            student_bias=lm_head_bias, teacher_bias=teacher_lm_head_bias, temperature=self.temperature,
            alpha=self.alpha, direction=self.direction, beta=self.beta, ignore_index=self.ignore_index,
            chunk_size=self.chunk_size, compile=self.compile,
        )  # fmt: skip
        loss = terms.loss
        with torch.no_grad():
            count = self._weights(hidden.shape[:2], input_ids, token_mask).sum().to(loss)
        metrics = {
            "loss": loss.detach(),
            "kl_loss": terms.kl_loss.detach(),
            "task_loss": loss.new_zeros(()) if terms.task_loss is None else terms.task_loss.detach(),
            "num_valid_tokens": count,
        }
        return LossOutput(loss, metrics)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, direction={self.direction!r}"
            + (f", beta={self.beta}" if self.direction == "jsd" else "")
            + f", shift={self.shift}, chunk_size={self.chunk_size}"
        )
