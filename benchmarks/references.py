"""Reference implementations the benchmark compares the library's losses with: what a user would write
or pick instead. Plain torch, each a function of the same inputs returning the scalar loss.

>>> logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
>>> softmax_focal(logits, target, gamma=0.0).allclose(F.cross_entropy(logits, target))
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "actor_critic",
    "adversarial_training",
    "dpo",
    "hand_written_multi_task",
    "info_nce_cross_entropy",
    "jsd_composition",
    "kl_div_composition",
    "masked_mse",
    "pml_available",
    "pml_contrastive",
    "pml_ntxent",
    "pml_supcon",
    "ppo_clip",
    "reverse_kl_composition",
    "sft_cross_entropy",
    "sigmoid_focal",
    "softmax_focal",
    "taken_log_probs_gather_logsumexp",
    "taken_log_probs_log_softmax",
]


def sigmoid_focal(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    r"""torchvision's ``sigmoid_focal_loss`` (``reduction="mean"``) written out, as in
    ``torchvision/ops/focal_loss.py``: :math:`\alpha_t (1-p_t)^\gamma\,\mathrm{BCE}(x, t)`, mean over
    elements. ``logits``, ``target``: ``[N, C]``.

    >>> sigmoid_focal(torch.zeros(1, 1), torch.ones(1, 1), gamma=0.0, alpha=0.25)  # 0.25 · log 2
    tensor(0.1733)
    """
    p = torch.sigmoid(logits)
    ce_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * target + (1 - alpha) * (1 - target)
        loss = alpha_t * loss
    return loss.mean()


def softmax_focal(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    r"""The straightforward multiclass focal loss: :math:`-(1-p_t)^\gamma \log p_t`, mean over rows.
    ``logits [N, C]``, ``target [N]``."""
    log_p_t = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    return (-((1 - log_p_t.exp()) ** gamma) * log_p_t).mean()


def kl_div_composition(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T))`, mean over rows, by
    ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="batchmean")``."""
    return (
        F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def reverse_kl_composition(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\mathrm{softmax}(s/T)\,\|\,\mathrm{softmax}(t/T))`, mean over rows: the
    arguments of :func:`kl_div_composition` swapped (``F.kl_div(input, target)`` is KL(target ‖ input))."""
    return kl_div_composition(teacher_logits, logits, temperature)


def jsd_composition(logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    r""":math:`T^2` times the generalized JSD :math:`\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)`,
    :math:`M = \beta P + (1-\beta) Q` (P the teacher), mean over rows, in log space as GKD trainers write
    it: ``log M`` as the ``logsumexp`` of the two stacked, shifted ``log_softmax``, each KL by ``F.kl_div``.

    >>> zeros = torch.zeros(1, 3)
    >>> jsd_composition(zeros, zeros, 1.0, 0.5)  # equal distributions
    tensor(0.)
    """
    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
    kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
    return (beta * kl_p + (1 - beta) * kl_q) * temperature**2


def masked_mse(preds: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    r"""The usual masked mean of squared errors, :math:`\sum m (\hat y - y)^2 / \sum m`, by
    ``F.mse_loss(reduction="none") * mask`` (a NaN under the mask makes it NaN). ``mask`` has ``preds``'
    shape or its leading dimensions.

    >>> masked_mse(torch.tensor([1.0, 3.0]), torch.zeros(2), torch.tensor([True, False]))
    tensor(1.)
    """
    weights = mask.reshape(*mask.shape, *([1] * (preds.ndim - mask.ndim))).to(preds.dtype)
    per_entry = preds[0].numel() if mask.ndim < preds.ndim else 1
    return (F.mse_loss(preds, target, reduction="none") * weights).sum() / (weights.sum() * per_entry)


def info_nce_cross_entropy(embeddings: Tensor, positive_embeddings: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent as usually written: cosine similarities of both views ``[2N, 2N]``, the diagonal
    masked out, ``F.cross_entropy`` against the other view's index."""
    z = F.normalize(torch.cat([embeddings, positive_embeddings]), dim=-1)
    n = len(embeddings)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, labels)


def pml_available() -> bool:
    """Whether pytorch-metric-learning (a benchmark-only dependency) is installed."""
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def pml_contrastive(margin: float, *, squared: bool = False, positive_only: bool = False) -> torch.nn.Module:
    """pytorch-metric-learning's ``ContrastiveLoss`` on raw (unnormalized) Euclidean distances with a mean
    over all pairs: ``relu(d - 0) + relu(m - d)``, each term averaged over its pairs (PML's defaults
    instead normalize the embeddings and average over the non-zero terms only). ``squared`` uses
    :math:`d^2` for both terms; ``positive_only`` sets the negative margin to 0 (the negative term is then
    0), leaving :math:`\\mathrm{mean}_{\\mathcal P}\\, d^2` with ``squared``: the library's positive term.
    """
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import ContrastiveLoss
    from pytorch_metric_learning.reducers import MeanReducer

    distance = LpDistance(normalize_embeddings=False, p=2, power=2 if squared else 1)
    neg_margin = 0.0 if positive_only else margin
    return ContrastiveLoss(pos_margin=0.0, neg_margin=neg_margin, distance=distance, reducer=MeanReducer())


def pml_supcon(temperature: float) -> torch.nn.Module:
    """pytorch-metric-learning's ``SupConLoss`` (cosine similarity, mean over anchors with a non-zero
    loss)."""
    from pytorch_metric_learning.losses import SupConLoss

    return SupConLoss(temperature=temperature)


def pml_ntxent(temperature: float) -> torch.nn.Module:
    """pytorch-metric-learning's ``NTXentLoss``; call it on both views stacked, labels
    ``cat([arange(N), arange(N)])``."""
    from pytorch_metric_learning.losses import NTXentLoss

    return NTXentLoss(temperature=temperature)


def taken_log_probs_log_softmax(logits: Tensor, input_ids: Tensor) -> Tensor:
    """``log_softmax(logits[:, :-1]).gather(input_ids[:, 1:])``: the log-probabilities of the next tokens as
    RL and DPO code usually writes them (a whole ``[B, T-1, V]`` log-softmax). ``logits [B, T, V]``, ids
    ``[B, T]``; returns ``[B, T-1]``."""
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    return log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def taken_log_probs_gather_logsumexp(logits: Tensor, input_ids: Tensor) -> Tensor:
    """The same as ``gather(logits) - logsumexp(logits)`` (TRL's ``selective_log_softmax`` for float32: no
    ``[B, T-1, V]`` log-softmax in the forward pass)."""
    scored = logits[:, :-1]
    return scored.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(scored, dim=-1)


def sft_cross_entropy(logits: Tensor, input_ids: Tensor, token_mask: Tensor) -> Tensor:
    """Supervised fine-tuning as Hugging Face models compute it: ``F.cross_entropy`` of the shifted logits
    with the masked tokens' labels set to ``-100`` (``ignore_index``)."""
    labels = torch.where(token_mask[:, 1:] != 0, input_ids[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))


def ppo_clip(
    log_probs: Tensor, prev_logprobs: Tensor, advantages: Tensor, token_mask: Tensor, epsilon: float = 0.2
) -> Tensor:
    r"""PPO's clipped surrogate, token-level mean: :math:`\max(-A r, -A\,\mathrm{clip}(r, 1-\epsilon,
    1+\epsilon))` with :math:`r = e^{\log\pi - \log\pi_{old}}`, over the masked next tokens.
    ``log_probs [B, T-1]`` (one of the two ``taken_log_probs_*``), ``prev_logprobs``/``token_mask
    [B, T]``, ``advantages [B]``."""
    ratio = torch.exp(log_probs - prev_logprobs[:, 1:])
    advantages = advantages[:, None]
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - epsilon, 1 + epsilon))
    mask = token_mask[:, 1:]
    return (per_token * mask).sum() / mask.sum()


def dpo(log_probs: Tensor, reference_logprobs: Tensor, token_mask: Tensor, beta: float = 0.1) -> Tensor:
    r"""DPO (Rafailov et al. 2023) of interleaved pairs (chosen rows ``0, 2, ...``, rejected ``1, 3, ...``):
    :math:`-\log\sigma(\beta[(\ell_c - \ell^{ref}_c) - (\ell_r - \ell^{ref}_r)])`, mean over pairs,
    :math:`\ell` the masked sum of a sequence's next-token log-probs ``log_probs [2P, T-1]``."""
    mask = token_mask[:, 1:]
    policy = (log_probs * mask).sum(-1)
    reference = (reference_logprobs[:, 1:] * mask).sum(-1)
    rewards = beta * (policy - reference)
    return -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()


def actor_critic(
    policy_logits: Tensor,
    values: Tensor,
    actions: Tensor,
    advantages: Tensor,
    returns: Tensor,
    potentials: Tensor,
    next_potentials: Tensor,
    terminated: Tensor,
    *,
    categorical: bool,
    value_weight: float = 0.5,
    entropy_weight: float = 0.01,
    shaping_weight: float = 0.1,
    discount: float = 0.99,
) -> Tensor:
    r"""The A2C loss with a potential-based shaping term, as written by hand:
    :math:`-\overline{A\log\pi(a)} + c_v\,\mathrm{MSE}(V, R) - c_H \bar H - c_F\,\overline{F\log\pi(a)}`,
    :math:`F = \gamma\Phi(s')(1 - \text{terminated}) - \Phi(s)`. ``categorical``: log-probabilities and
    entropy from ``torch.distributions.Categorical`` (CleanRL's and Stable-Baselines3's A2C/PPO), else from
    ``log_softmax``.

    >>> logits, zeros = torch.zeros(2, 2), torch.zeros(2)
    >>> actor_critic(logits, zeros, torch.tensor([0, 1]), torch.ones(2), zeros, zeros, zeros,
    ...              torch.zeros(2, dtype=torch.bool), categorical=True, entropy_weight=0.0)
    tensor(0.6931)
    """
    if categorical:
        distribution = torch.distributions.Categorical(logits=policy_logits)
        log_prob, entropy = distribution.log_prob(actions), distribution.entropy()
    else:
        log_p = F.log_softmax(policy_logits, dim=-1)
        log_prob = log_p.gather(-1, actions[:, None]).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
    shaping = discount * next_potentials * (~terminated) - potentials
    return (
        -(advantages * log_prob).mean()
        + value_weight * F.mse_loss(values, returns)
        - entropy_weight * entropy.mean()
        - shaping_weight * (shaping * log_prob).mean()
    )


def hand_written_multi_task(
    logits: Tensor, target: Tensor, preds: Tensor, regression_target: Tensor, log_variances: Tensor
) -> Tensor:
    r"""Kendall et al.'s uncertainty weighting of a classification and a regression task, as written by
    hand: :math:`e^{-s_0}\,\mathrm{CE} + s_0 + \tfrac12(e^{-s_1}\,\mathrm{MSE} + s_1)`.

    >>> hand_written_multi_task(torch.zeros(1, 2), torch.tensor([0]), torch.ones(1), torch.zeros(1),
    ...                         torch.zeros(2))
    tensor(1.1931)
    """
    s = log_variances
    classification = torch.exp(-s[0]) * F.cross_entropy(logits, target) + s[0]
    return classification + 0.5 * (torch.exp(-s[1]) * F.mse_loss(preds, regression_target) + s[1])


def adversarial_training(
    model: torch.nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    epsilon: float,
    alpha: float,
    num_steps: int,
    step_size: float,
) -> Tensor:
    r"""Clean + α · adversarial cross-entropy with an L∞ PGD attack (FGSM at one step of ε) written by
    hand, as attack libraries do: ``num_steps`` signed-gradient steps in eval mode, each projected onto the
    ε-ball and clipped to [0, 1].

    >>> model = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.zero_(), model.bias.zero_()
    >>> adversarial_training(model, torch.zeros(1, 2), torch.tensor([0]), epsilon=0.1, alpha=1.0,
    ...                      num_steps=1, step_size=0.1)  # no gradient to follow: 2 log 2
    tensor(1.3863, grad_fn=<AddBackward0>)
    """
    training = model.training
    model.eval()
    adversarial = inputs.detach().clone()
    for _ in range(num_steps):
        adversarial.requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adversarial), target), adversarial)
        stepped = adversarial.detach() + step_size * grad.sign()
        adversarial = torch.min(torch.max(stepped, inputs - epsilon), inputs + epsilon).clamp(0.0, 1.0)
    model.train(training)
    return F.cross_entropy(model(inputs), target) + alpha * F.cross_entropy(model(adversarial), target)
