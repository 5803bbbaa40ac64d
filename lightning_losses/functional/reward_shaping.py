r"""Actor-critic objective with potential-based reward shaping, and the rollout math it relies on.

The loss (:func:`reward_shaping_loss`) is

.. math::

    L = L_\pi + c_v L_V - c_H H + c_F L_F,

over transitions :math:`i` (actions :math:`a_i` taken by the rollout, never sampled in the loss):

- policy :math:`L_\pi = -\frac1N\sum_i A_i \log\pi(a_i|s_i)` (advantages :math:`A_i` are constants);
- value :math:`L_V = \frac1N\sum_i (V(s_i) - R_i)^2` against the rollout's returns :math:`R_i`;
- entropy :math:`H = -\frac1N\sum_i\sum_a \pi(a|s_i)\log\pi(a|s_i)` (from ``log_softmax``);
- shaping :math:`L_F = -\frac1N\sum_i F_i \log\pi(a_i|s_i)` with the potential-based shaping reward
  :math:`F_i = \gamma\,\Phi(s'_i)(1 - \text{terminated}_i) - \Phi(s_i)` (Ng, Harada & Russell, "Policy
  invariance under reward transformations", ICML 1999), the potential of an absorbing state being 0.

Why this shaping term: rewarding :math:`r + c_F F` changes every discounted return by
:math:`-c_F\Phi(s_0)` only (the sum of :math:`\gamma^t F_t` telescopes), so the optimal policy is
unchanged. By linearity, the policy gradient of the shaped reward is that of the environment reward
(:math:`L_\pi`) plus :math:`c_F` times the policy gradient of :math:`F` alone, which :math:`L_F` estimates
with the one-step advantage :math:`F_i` (λ = 0: dense, and biased towards actions that raise the
potential; under full Monte-Carlo returns its expectation would vanish). ``shaping_loss`` is therefore a
real, differentiable term of the actor, reported on its own; without potentials it is exactly 0.
Potentials are constants here (a critic used as :math:`\Phi` is detached): the term trains the actor only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.functional.cross_entropy import row_dot
from lightning_losses.functional.regression import mse
from lightning_losses.protocol import (
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
    check_positive,
    compute_dtype,
)
from lightning_losses.reduction import divide_by_count, masked_sum

__all__ = [
    "RewardShapingTerms",
    "discounted_returns",
    "generalized_advantage_estimate",
    "potential_shaping_reward",
    "reward_shaping_loss",
    "reward_shaping_terms",
]


class RewardShapingTerms(NamedTuple):
    """The unweighted terms of :func:`reward_shaping_loss` (each a masked mean, or sum / global count)."""

    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    shaping_loss: Tensor
    mean_advantage: Tensor


def potential_shaping_reward(
    potentials: Tensor, next_potentials: Tensor, terminated: Tensor | None = None, discount: float = 0.99
) -> Tensor:
    r"""The shaping reward :math:`F(s, s') = \gamma\,\Phi(s')\,(1 - \text{terminated}) - \Phi(s)`.

    Args:
        potentials: ``[...]`` :math:`\Phi(s)`.
        next_potentials: ``[...]`` :math:`\Phi(s')` of the true next state (the final observation when an
            episode ended; a truncated episode keeps it, a terminated one counts it as 0).
        terminated: optional ``[...]`` bool, the next state is absorbing.
        discount: :math:`\gamma`.

    >>> potential_shaping_reward(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]),
    ...                          torch.tensor([False, True]), discount=0.5)
    tensor([ 0., -1.])
    """
    if potentials.shape != next_potentials.shape:
        raise ValueError(
            f"`potentials` and `next_potentials` must have the same shape, got {tuple(potentials.shape)} "
            f"and {tuple(next_potentials.shape)}"
        )
    if terminated is not None:
        check_mask("terminated", terminated, potentials.shape)
        next_potentials = torch.where(terminated.bool(), torch.zeros_like(next_potentials), next_potentials)
    return discount * next_potentials - potentials


def generalized_advantage_estimate(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    discount: float = 0.99,
    gae_lambda: float = 0.95,
) -> tuple[Tensor, Tensor]:
    r"""GAE(γ, λ) over a rollout of ``[T, E]`` (time, environments); returns ``(advantages, returns)``.

    :math:`\delta_t = r_t + \gamma V(s'_t)(1 - \text{term}_t) - V(s_t)` and
    :math:`A_t = \delta_t + \gamma\lambda(1 - \text{done}_t) A_{t+1}` with
    :math:`\text{done} = \text{term} \lor \text{trunc}`, :math:`A_T = \delta_T` past the rollout's end
    (its last step bootstraps through :math:`V(s'_T)`); returns :math:`R_t = A_t + V(s_t)`.
    ``next_values`` are the values of the true next states (a truncated episode bootstraps from its final
    observation). λ = 1 gives discounted returns bootstrapped at the cut; λ = 0 the one-step TD error.
    Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation", 2016.

    >>> r = torch.ones(3, 1)
    >>> zeros = torch.zeros(3, 1)
    >>> adv, ret = generalized_advantage_estimate(r, zeros, zeros, torch.tensor([[0], [0], [1]]).bool(),
    ...                                           zeros.bool(), discount=0.5, gae_lambda=1.0)
    >>> ret.flatten()
    tensor([1.7500, 1.5000, 1.0000])
    """
    for name, tensor in (("values", values), ("next_values", next_values)):
        if tensor.shape != rewards.shape:
            raise ValueError(
                f"`{name}` must have the shape of `rewards` {tuple(rewards.shape)}, got {tuple(tensor.shape)}"
            )
    check_mask("terminated", terminated, rewards.shape)
    check_mask("truncated", truncated, rewards.shape)
    check_ndim("rewards", rewards, 2)
    dtype = compute_dtype(rewards, values, next_values)
    rewards, values, next_values = (t.detach().to(dtype) for t in (rewards, values, next_values))
    alive = 1.0 - terminated.to(dtype)
    carry = 1.0 - (terminated.bool() | truncated.bool()).to(dtype)
    deltas = rewards + discount * next_values * alive - values
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        running = deltas[t] + discount * gae_lambda * carry[t] * running
        advantages[t] = running
    return advantages, advantages + values


def discounted_returns(rewards: Tensor, dones: Tensor, discount: float = 0.99) -> Tensor:
    r"""Monte-Carlo discounted returns :math:`G_t = r_t + \gamma(1 - \text{done}_t) G_{t+1}` over ``[T, E]``.

    >>> discounted_returns(torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.bool), 0.5).flatten()
    tensor([1.7500, 1.5000, 1.0000])
    """
    check_ndim("rewards", rewards, 2)
    check_mask("dones", dones, rewards.shape)
    carry = 1.0 - dones.to(rewards.dtype)
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + discount * carry[t] * running
        out[t] = running
    return out


# Any log-probability at or below this has probability exactly 0 in float32 and float64 (exp underflows
# below about -104 and -745), so clamping there leaves every p log p as it is, makes a -inf (an action ruled
# out) a finite 0 · (-1e4), and keeps the gradient's g_H log p finite for any sane upstream gradient.
_LOG_PROB_FLOOR = -1e4


class _TakenLogProbAndEntropy(torch.autograd.Function):
    r"""Per row of ``logits [N, A]``: :math:`\log\pi(a_i)` and the entropy :math:`H_i = -\sum_a p \log p`,
    from one ``log_softmax``, with the gradient by hand:
    :math:`\partial/\partial x_{ia} = g^\pi_i(\delta_{a a_i} - p_{ia}) - g^H_i p_{ia}(\log p_{ia} + H_i)`.

    Autograd over the same formula keeps ``log p`` for three consumers (the gather, ``exp`` and the
    product) and sums their ``[N, A]`` gradients; with a ``-inf`` logit it also needs two ``where`` each
    way, and bool ops are slow on a CPU. Here: ``p`` and the clamped ``log p`` (``_LOG_PROB_FLOOR``),
    and one ``[N, A]`` tensor in the backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        log_p = torch.log_softmax(logits, dim=-1)
        taken = log_p.gather(-1, actions[:, None]).squeeze(-1)
        p = log_p.exp()
        log_p.clamp_min_(_LOG_PROB_FLOOR)
        entropy = row_dot(p, log_p).neg_()
        ctx.save_for_backward(p, log_p, entropy, actions)
        ctx.set_materialize_grads(False)
        return taken, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_taken: Tensor | None, grad_entropy: Tensor | None) -> tuple[Tensor, None]:
        p, log_p, entropy, actions = ctx.saved_tensors
        if grad_taken is None:
            grad_taken = torch.zeros_like(entropy)
        if grad_entropy is None:
            grad = p * -grad_taken[:, None]
        else:  # -p (g_H log p + g_pi + g_H H)
            grad = torch.addcmul(
                -(grad_taken + grad_entropy * entropy)[:, None], log_p, -grad_entropy[:, None]
            )
            grad.mul_(p)
        return grad.scatter_add_(-1, actions[:, None], grad_taken[:, None]), None


def _check_inputs(
    policy_logits: Tensor,
    values: Tensor,
    actions: Tensor,
    advantages: Tensor,
    returns: Tensor,
    potentials: Tensor | None,
    next_potentials: Tensor | None,
    terminated: Tensor | None,
    mask: Tensor | None,
) -> None:
    check_floating("policy_logits", policy_logits)
    check_ndim("policy_logits", policy_logits, 2)
    batch = policy_logits.shape[:1]
    for name, tensor in (("values", values), ("advantages", advantages), ("returns", returns)):
        check_floating(name, tensor)
        if tensor.shape != batch:
            raise ValueError(
                f"`{name}` must have shape {tuple(batch)} (one per row of `policy_logits` of shape "
                f"{tuple(policy_logits.shape)}), got {tuple(tensor.shape)}"
            )
    if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
        raise TypeError(f"`actions` must hold integer action indices, got dtype {actions.dtype}")
    if actions.shape != batch:
        raise ValueError(
            f"`actions` must have shape {tuple(batch)} (one per row of `policy_logits` of shape "
            f"{tuple(policy_logits.shape)}), got {tuple(actions.shape)}"
        )
    if (potentials is None) != (next_potentials is None):
        raise ValueError("`potentials` and `next_potentials` must be given together (or neither)")
    if potentials is not None and next_potentials is not None:
        for name, tensor in (("potentials", potentials), ("next_potentials", next_potentials)):
            check_floating(name, tensor)
            if tensor.shape != batch:
                raise ValueError(f"`{name}` must have shape {tuple(batch)}, got {tuple(tensor.shape)}")
    if terminated is not None:
        check_mask("terminated", terminated, batch)
    if mask is not None:
        check_mask("mask", mask, batch)
    # in [0, A) where they count (a gather out of range is a device assert on CUDA); CPU tensors only
    check_class_targets("actions", actions, policy_logits.shape[-1], mask=mask)


def reward_shaping_terms(
    policy_logits: Tensor,
    values: Tensor,
    actions: Tensor,
    advantages: Tensor,
    returns: Tensor,
    potentials: Tensor | None = None,
    next_potentials: Tensor | None = None,
    terminated: Tensor | None = None,
    mask: Tensor | None = None,
    global_valid_seqs: Tensor | None = None,
    *,
    discount: float = 0.99,
) -> RewardShapingTerms:
    r"""The unweighted terms of :func:`reward_shaping_loss` (see the module docstring for the formulas).

    Each is a masked sum over transitions divided by the number of valid ones, or by
    ``global_valid_seqs`` when given (SEQUENCE_LEVEL: a transition is a sequence), so that the terms of
    micro-batches and ranks add up to those of the global batch. ``advantages``, ``returns`` and the
    potentials are treated as constants (detached).

    Shapes: ``policy_logits [N, A]``; ``values``, ``advantages``, ``returns``, ``potentials``,
    ``next_potentials [N]`` floating; ``actions [N]`` integer in ``[0, A)`` (checked on CPU tensors, where
    the mask counts); ``terminated``, ``mask [N]``. No valid transition (all masked, an empty batch)
    gives 0 with a zero gradient.

    Non-finite values: a ``-inf`` logit rules an action out (invalid-action masking): the terms stay
    finite, with finite gradients, unless that action was taken (then :math:`\log\pi(a) = -\infty`). A NaN
    in a transition that counts makes the loss NaN (no value is checked: ``LossModule``'s ``nan_policy``
    sees it); masked-out transitions never reach the loss nor, even when NaN or inf, its gradient.

    >>> terms = reward_shaping_terms(torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, 1]),
    ...                              torch.ones(2), torch.ones(2))
    >>> [round(t.item(), 4) for t in terms]
    [0.6931, 1.0, 0.6931, 0.0, 1.0]
    """
    _check_inputs(
        policy_logits, values, actions, advantages, returns, potentials, next_potentials, terminated, mask
    )
    dtype = compute_dtype(policy_logits, values)
    valid = None if mask is None else mask != 0 if mask.dtype == torch.bool else mask.to(dtype)
    keep = None if mask is None else mask != 0

    def clean(tensor: Tensor) -> Tensor:
        """``tensor`` in ``dtype``, 0 at masked-out transitions *before* any arithmetic, so that a NaN
        there reaches neither the loss nor a gradient (the tensors are ``[N]`` / ``[N, A]``: cheap)."""
        tensor = tensor.to(dtype)
        if keep is None:
            return tensor
        return torch.where(keep.reshape(-1, *([1] * (tensor.ndim - 1))), tensor, tensor.new_zeros(()))

    count = (
        global_valid_seqs
        if global_valid_seqs is not None
        else (actions.numel() if mask is None else mask.to(dtype).sum())
    )
    safe_actions = actions if keep is None else torch.where(keep, actions, torch.zeros_like(actions))
    taken, row_entropy = _TakenLogProbAndEntropy.apply(clean(policy_logits), safe_actions.long())
    adv = clean(advantages.detach())

    def mean(per_row: Tensor) -> Tensor:
        return divide_by_count(masked_sum(per_row, valid), count)

    policy_loss = mean(-adv * taken)
    # the masked, NaN-safe mean that `mse` is, over the count made above (a tensor with a mask or a global
    # count; without either mse counts on the host and is F.mse_loss itself)
    denominator = count if isinstance(count, Tensor) else None
    value_loss = mse(values.to(dtype), returns.detach().to(dtype), mask, denominator)
    entropy = mean(row_entropy)
    if potentials is not None and next_potentials is not None:
        shaping = potential_shaping_reward(
            clean(potentials.detach()), clean(next_potentials.detach()), terminated, discount
        )
        shaping_loss = mean(-shaping * taken)
    else:
        shaping_loss = taken.new_zeros(())  # a constant: no ops, and no 0 · (-inf) from a ruled-out action
    return RewardShapingTerms(policy_loss, value_loss, entropy, shaping_loss, mean(adv).detach())


def reward_shaping_loss(
    policy_logits: Tensor,
    values: Tensor,
    actions: Tensor,
    advantages: Tensor,
    returns: Tensor,
    potentials: Tensor | None = None,
    next_potentials: Tensor | None = None,
    terminated: Tensor | None = None,
    mask: Tensor | None = None,
    global_valid_seqs: Tensor | None = None,
    *,
    value_weight: float = 0.5,
    entropy_weight: float = 0.01,
    shaping_weight: float = 0.1,
    discount: float = 0.99,
) -> Tensor:
    r"""Actor-critic loss :math:`L_\pi + c_v L_V - c_H H + c_F L_F` with potential-based shaping.

    See the module docstring for each term, and :func:`reward_shaping_terms` for shapes and reduction.
    Defaults are the guide's (``value_weight=0.5``, ``entropy_weight=0.01``, ``shaping_weight=0.1``).

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> reward_shaping_loss(logits, torch.zeros(2), torch.tensor([0, 0]), torch.tensor([1.0, -1.0]),
    ...                     torch.zeros(2), entropy_weight=0.0)
    tensor(-1.)
    """
    check_positive("discount", discount, allow_zero=True)
    terms = reward_shaping_terms(
        policy_logits,
        values,
        actions,
        advantages,
        returns,
        potentials,
        next_potentials,
        terminated,
        mask,
        global_valid_seqs,
        discount=discount,
    )
    return (
        terms.policy_loss
        + value_weight * terms.value_loss
        - entropy_weight * terms.entropy
        + shaping_weight * terms.shaping_loss
    )
