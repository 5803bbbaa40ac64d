"""``CustomSequenceLoss`` (``custom_sequence``)."""

from __future__ import annotations

from torch import Tensor

from lightning_losses.functional.sequence_policy import sequence_policy_loss
from lightning_losses.protocol import LossFunction, LossOutput, LossType, check_positive
from lightning_losses.registry import register_loss

__all__ = ["CustomSequenceLoss"]


@register_loss("custom_sequence")
class CustomSequenceLoss(LossFunction):
    r"""The guide's "custom sequence-level loss for RL", made a correct policy gradient.

    :math:`L = \alpha L_\pi + \beta L_V` with the sequence-level policy term
    :math:`L_\pi = -\sum_i A_i \sum_t m_{it}\log\pi(y_{it}) / N` over the *taken* tokens and the value
    term :math:`L_V = \sum_i (V_i - R_i)^2 / N` when the model returns ``values``; :math:`N` is
    ``global_valid_seqs`` (SEQUENCE_LEVEL, exact under micro-batching and DDP). See
    :func:`lightning_losses.functional.sequence_policy_loss` for the formula, masks and paper.

    What the guide's version got wrong: its policy term multiplied the mean log-probability over the
    *whole vocabulary* by the mean advantage (not a policy gradient: no taken token appears in it), and its
    value term ``mse(rewards.mean(), advantages.mean())`` has no gradient at all.

    Inputs are resolved by name under ``LossModule``: ``next_token_logits`` (model output ``[B, T, V]``),
    ``input_ids`` (the taken tokens ``[B, T]``), ``advantages`` ``[B]``, and optional ``token_mask``,
    ``sample_mask``, ``rewards`` ``[B]`` and ``values`` ``[B]`` (a model output); ``input_map`` renames
    them. The loss divides by no token count, so it takes no ``global_valid_toks``.

    Args:
        alpha: weight of the policy term (the guide's default 1.0).
        beta: weight of the value term (the guide's default 0.1).
        shift: ``next_token_logits[:, t]`` scores ``input_ids[:, t + 1]`` (NeMo RL's convention; default),
            or ``input_ids[:, t]`` with ``shift=False``.

    Metrics (the guide's keys, each a partial sum over the global batch like the loss): ``loss`` and
    ``custom_loss`` (the total), ``policy_loss``, ``value_loss``, ``mean_reward``, ``mean_advantage``.

    >>> import torch
    >>> loss_fn = CustomSequenceLoss(beta=0.5)
    >>> logits = torch.zeros(2, 3, 4)  # a uniform policy: log π = -log 4 for every token
    >>> ids = torch.tensor([[0, 1, 2], [3, 2, 1]])
    >>> loss, metrics = loss_fn(logits, ids, advantages=torch.tensor([1.0, 0.0]),
    ...                         rewards=torch.tensor([1.0, 0.0]), values=torch.tensor([0.0, 0.0]))
    >>> round(metrics["policy_loss"].item(), 4)  # -(1 · 2 · (-log 4)) / 2 = log 4
    1.3863
    >>> round(metrics["value_loss"].item(), 4), round(loss.item(), 4)  # (1² + 0²) / 2; 1.3863 + 0.5 · 0.5
    (0.5, 1.6363)
    """

    loss_type = LossType.SEQUENCE_LEVEL
    partial_metrics = ("custom_loss", "policy_loss", "value_loss", "mean_reward", "mean_advantage")

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, shift: bool = True) -> None:
        super().__init__()
        check_positive("alpha", alpha, allow_zero=True)
        check_positive("beta", beta, allow_zero=True)
        self.alpha = alpha
        self.beta = beta
        self.shift = shift

    def forward(
        self,
        next_token_logits: Tensor,
        input_ids: Tensor,
        advantages: Tensor,
        token_mask: Tensor | None = None,
        sample_mask: Tensor | None = None,
        rewards: Tensor | None = None,
        values: Tensor | None = None,
        global_valid_seqs: Tensor | None = None,
    ) -> LossOutput:
        terms = sequence_policy_loss(
            next_token_logits,
            input_ids,
            advantages,
            token_mask,
            sample_mask,
            rewards,
            values,
            global_valid_seqs,
            alpha=self.alpha,
            beta=self.beta,
            shift=self.shift,
        )
        loss = terms.loss
        metrics = {
            "loss": loss.detach(),
            "custom_loss": loss.detach(),
            "policy_loss": terms.policy_loss.detach(),
            "value_loss": terms.value_loss.detach(),
            "mean_reward": terms.mean_reward.detach(),
            "mean_advantage": terms.mean_advantage.detach(),
        }
        return LossOutput(loss, metrics)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, shift={self.shift}"
