"""``DPOLoss`` (``dpo``)."""

from __future__ import annotations

from torch import Tensor

from lightning_losses.functional.preference import dpo_loss
from lightning_losses.protocol import LossFunction, LossOutput, LossType, check_positive
from lightning_losses.registry import register_loss

__all__ = ["DPOLoss"]


@register_loss("dpo")
class DPOLoss(LossFunction):
    r"""Direct Preference Optimization (Rafailov et al. 2023), SEQUENCE_LEVEL over preference pairs.

    :math:`L = -\sum_p \log\sigma\big(\beta[(\ell_\pi(c_p) - \ell_{\text{ref}}(c_p)) -
    (\ell_\pi(r_p) - \ell_{\text{ref}}(r_p))]\big) / N + \lambda\,(-\sum_p \ell_\pi(c_p) / N)`, with
    :math:`\ell` a sequence's summed (or, with ``average_log_probs``, length-averaged) log-probability and
    :math:`N` the global number of valid pairs. See :func:`lightning_losses.functional.dpo_loss`.

    **Batch layout** (NeMo RL's): ``2P`` sequences with the pairs interleaved, chosen at even rows and
    rejected at odd rows; ``reference_logprobs`` ``[2P, T]`` holds the reference policy's log-probability of
    each token of ``input_ids`` (precomputed, or by a frozen reference model in the data pipeline).
    Inputs, resolved by name under ``LossModule``: ``next_token_logits`` ``[2P, T, V]``, ``input_ids``,
    ``reference_logprobs``, optional ``token_mask`` ``[2P, T]`` and ``sample_mask`` ``[2P]`` (both rows of a
    pair alike). ``LossModule`` counts ``global_valid_seqs`` in *sequences* from ``sample_mask``; the loss
    divides by ``global_valid_seqs / 2`` pairs, exact under micro-batching and DDP as long as no pair is split
    (micro-batches of an even number of rows).

    Args:
        beta: :math:`\beta > 0` (default 0.1, the paper's).
        average_log_probs: length-average the sequence log-probabilities.
        sft_weight: :math:`\lambda \ge 0`, weight of an NLL term on the chosen sequences (0: none).
        shift: ``next_token_logits[:, t]`` scores ``input_ids[:, t + 1]`` (default) or ``input_ids[:, t]``.

    Metrics (each a partial sum over the global batch's pairs, like the loss): ``loss``, ``dpo_loss``,
    ``sft_loss``, ``accuracy`` (pairs whose chosen reward is higher), ``chosen_reward`` and
    ``rejected_reward`` (means of :math:`\beta(\ell_\pi - \ell_{\text{ref}})`), ``margin`` (their difference).

    >>> import torch
    >>> logits = torch.log(torch.tensor([[[0.8, 0.2]], [[0.5, 0.5]]]))  # one pair, one token each
    >>> ids, ref = torch.tensor([[0], [1]]), torch.log(torch.tensor([[0.5], [0.5]]))
    >>> loss, metrics = DPOLoss(beta=1.0, shift=False)(logits, ids, ref)
    >>> round(loss.item(), 4), metrics["accuracy"].item()  # log(1 + 1/1.6)
    (0.4855, 1.0)
    """

    loss_type = LossType.SEQUENCE_LEVEL
    partial_metrics = ("dpo_loss", "sft_loss", "accuracy", "chosen_reward", "rejected_reward", "margin")

    def __init__(
        self, beta: float = 0.1, average_log_probs: bool = False, sft_weight: float = 0.0, shift: bool = True
    ) -> None:
        super().__init__()
        check_positive("beta", beta)
        check_positive("sft_weight", sft_weight, allow_zero=True)
        self.beta = beta
        self.average_log_probs = average_log_probs
        self.sft_weight = sft_weight
        self.shift = shift

    def forward(
        self,
        next_token_logits: Tensor,
        input_ids: Tensor,
        reference_logprobs: Tensor,
        token_mask: Tensor | None = None,
        sample_mask: Tensor | None = None,
        global_valid_seqs: Tensor | None = None,
    ) -> LossOutput:
        terms = dpo_loss(
            next_token_logits,
            input_ids,
            reference_logprobs,
            token_mask,
            sample_mask,
            None if global_valid_seqs is None else global_valid_seqs / 2,
            beta=self.beta,
            average_log_probs=self.average_log_probs,
            sft_weight=self.sft_weight,
            shift=self.shift,
        )
        metrics = {"loss": terms.loss.detach()}
        metrics |= {name: getattr(terms, name).detach() for name in self.partial_metrics}
        return LossOutput(terms.loss, metrics)

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, average_log_probs={self.average_log_probs}, sft_weight={self.sft_weight}, "
            f"shift={self.shift}"
        )
