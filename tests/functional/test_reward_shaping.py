import math

import pytest
import torch

from lightning_losses.functional.reward_shaping import (
    discounted_returns,
    generalized_advantage_estimate,
    potential_shaping_reward,
    reward_shaping_loss,
    reward_shaping_terms,
)
from lightning_losses.losses.reward_shaping import RewardShapingLoss
from lightning_losses.registry import build_loss
from tests.loss_tester import LossTester

WEIGHTS = ("value_weight", "entropy_weight", "shaping_weight", "discount")
DEFAULTS = {"value_weight": 0.5, "entropy_weight": 0.01, "shaping_weight": 0.1, "discount": 0.99}


def brute_force_loss(
    policy_logits, values, actions, advantages, returns, potentials=None, next_potentials=None,
    terminated=None, mask=None, global_valid_seqs=None, **options,
):  # fmt: skip
    """A Python loop over transitions and actions in float64."""
    o = DEFAULTS | options
    rows = policy_logits.tolist()
    n = len(rows)
    m = [1.0] * n if mask is None else [float(x) for x in mask.tolist()]
    count = float(global_valid_seqs) if global_valid_seqs is not None else sum(m)
    policy = value = entropy = shaping = 0.0
    for i in range(n):
        if m[i] == 0:
            continue
        log_z = math.log(sum(math.exp(x) for x in rows[i]))
        log_p = [x - log_z for x in rows[i]]
        taken = log_p[int(actions[i])]
        policy += m[i] * -float(advantages[i]) * taken
        value += m[i] * (float(values[i]) - float(returns[i])) ** 2
        entropy += m[i] * -sum(math.exp(lp) * lp for lp in log_p)
        if potentials is not None:
            nxt = 0.0 if terminated is not None and bool(terminated[i]) else float(next_potentials[i])
            f = o["discount"] * nxt - float(potentials[i])
            shaping += m[i] * -f * taken
    if count == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    total = policy + o["value_weight"] * value - o["entropy_weight"] * entropy + o["shaping_weight"] * shaping
    return torch.tensor(total / count, dtype=torch.float64)


def make_batch(dtype=torch.float32, seed=0, n=7, num_actions=3, shaping=True):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "policy_logits": (2 * torch.randn(n, num_actions, generator=g)).to(dtype),
        "values": torch.randn(n, generator=g).to(dtype),
        "actions": torch.randint(0, num_actions, (n,), generator=g),
        "advantages": torch.randn(n, generator=g).to(dtype),
        "returns": torch.randn(n, generator=g).to(dtype),
        "mask": torch.rand(n, generator=g) > 0.25,
    }
    if shaping:
        batch |= {
            "potentials": torch.rand(n, generator=g).to(dtype),
            "next_potentials": torch.rand(n, generator=g).to(dtype),
            "terminated": torch.rand(n, generator=g) > 0.6,
        }
    return batch


class TestRewardShaping(LossTester):
    functional = staticmethod(reward_shaping_loss)
    module_class = RewardShapingLoss
    option_sets = [
        {},
        {"value_weight": 1.0, "entropy_weight": 0.1, "shaping_weight": 0.5, "discount": 0.9},
        {"shaping_weight": 0.0, "entropy_weight": 0.0},
    ]
    grad_inputs = ("policy_logits", "values")
    mask_input = "mask"
    config = "cartpole_actor_critic.yaml"

    def make_inputs(self, dtype, seed):
        return make_batch(dtype, seed)

    def reference(self, **inputs_and_options):
        return brute_force_loss(**inputs_and_options)


def test_hand_computed_case():
    """Two transitions, two actions; every term by hand."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # π = (1/2, 1/2) and (3/4, 1/4)
    out = RewardShapingLoss(value_weight=0.5, entropy_weight=0.1, shaping_weight=0.2, discount=0.5)(
        policy_logits=logits,
        values=torch.tensor([1.0, 0.0]),
        actions=torch.tensor([0, 1]),
        advantages=torch.tensor([2.0, -1.0]),
        returns=torch.tensor([0.0, 2.0]),
        potentials=torch.tensor([1.0, 0.0]),
        next_potentials=torch.tensor([4.0, 3.0]),
        terminated=torch.tensor([False, True]),
    )
    log_half, log_q = math.log(0.5), math.log(0.25)
    policy = (-2.0 * log_half + 1.0 * log_q) / 2
    value = (1.0 + 4.0) / 2
    entropy = (math.log(2.0) - (0.75 * math.log(0.75) + 0.25 * log_q)) / 2
    # F = γΦ(s')(1 - term) - Φ(s): 0.5·4 - 1 = 1, and 0 - 0 = 0 (the second next state is absorbing)
    shaping = (-1.0 * log_half) / 2
    expected = {
        "policy_loss": policy,
        "value_loss": value,
        "entropy": entropy,
        "entropy_loss": -0.1 * entropy,
        "shaping_loss": 0.2 * shaping,
        "total_loss": policy + 0.5 * value - 0.1 * entropy + 0.2 * shaping,
        "mean_advantage": 0.5,
    }
    for key, value_ in expected.items():
        torch.testing.assert_close(out.metrics[key], torch.tensor(value_), msg=key)
    torch.testing.assert_close(out.loss, torch.tensor(expected["total_loss"]))


def test_terms_add_up_to_total_and_are_reported():
    batch = make_batch()
    out = RewardShapingLoss()(**batch)
    m = out.metrics
    total = m["policy_loss"] + 0.5 * m["value_loss"] + m["entropy_loss"] + m["shaping_loss"]
    torch.testing.assert_close(total, out.loss.detach())
    torch.testing.assert_close(m["total_loss"], out.loss.detach())
    assert m["shaping_loss"] != 0
    no_shaping = RewardShapingLoss()(**{k: v for k, v in batch.items() if "potential" not in k})
    assert no_shaping.metrics["shaping_loss"].item() == 0.0


def test_actions_come_from_the_batch_deterministically():
    """The guide sampled actions inside the loss; here two calls give the same value."""
    batch = make_batch()
    assert RewardShapingLoss()(**batch).loss.item() == RewardShapingLoss()(**batch).loss.item()


def test_gradients_reach_only_their_network():
    """Separate networks: the value term moves only the critic; policy, entropy, shaping only the actor."""
    from lightning_losses.examples.cartpole import ActorCritic

    torch.manual_seed(0)
    model = ActorCritic(hidden=(8,))
    obs = torch.randn(6, 4)
    batch = make_batch(n=6, num_actions=2)
    batch.pop("mask")
    out = model(obs)
    terms = reward_shaping_terms(out["policy_logits"], out["values"], **{
        k: v for k, v in batch.items() if k not in ("policy_logits", "values")
    })  # fmt: skip
    actor, critic = list(model.actor.parameters()), list(model.critic.parameters())

    def grads(term, params):
        return torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)

    for name in ("policy_loss", "entropy", "shaping_loss"):
        term = getattr(terms, name)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads(term, critic)), name
        assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads(term, actor)), name
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads(terms.value_loss, actor))
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads(terms.value_loss, critic))


def test_targets_and_potentials_carry_no_gradient():
    batch = make_batch(dtype=torch.float64)
    leaves = [batch[k].requires_grad_() for k in ("advantages", "returns", "potentials", "next_potentials")]
    batch["policy_logits"].requires_grad_()
    batch["values"].requires_grad_()
    loss = reward_shaping_loss(**batch)
    assert all(g is None for g in torch.autograd.grad(loss, leaves, allow_unused=True))


def test_micro_batches_add_up_with_the_global_count():
    batch = make_batch(n=10)
    count = batch["mask"].sum()
    full = reward_shaping_loss(**batch)
    parts = [
        reward_shaping_loss(**{k: v[s] for k, v in batch.items()}, global_valid_seqs=count)
        for s in (slice(0, 3), slice(3, 10))
    ]
    torch.testing.assert_close(sum(parts), full)


def test_shaping_returns_telescope():
    """Σ_t γ^t F_t = -Φ(s_0) over an episode ending in an absorbing state (Ng et al. 1999)."""
    phi = torch.tensor([0.3, -1.2, 2.0, 0.7, 5.0], dtype=torch.float64)
    gamma = 0.9
    terminated = torch.tensor([False, False, False, True])
    f = potential_shaping_reward(phi[:-1], phi[1:], terminated, gamma)
    discounted = sum(gamma**t * f[t] for t in range(4))
    torch.testing.assert_close(discounted, -phi[0])


def brute_force_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    steps, envs = rewards.shape
    adv = torch.zeros(steps, envs, dtype=torch.float64)
    for e in range(envs):
        for t in range(steps):
            total, factor = 0.0, 1.0
            for k in range(t, steps):
                delta = (
                    rewards[k, e] + gamma * next_values[k, e] * (1 - float(terminated[k, e])) - values[k, e]
                )
                total += factor * float(delta)
                if terminated[k, e] or truncated[k, e]:
                    break
                factor *= gamma * lam
            adv[t, e] = total
    return adv


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_brute_force(lam):
    g = torch.Generator().manual_seed(1)
    shape = (9, 3)
    rewards, values, next_values = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    terminated = torch.rand(shape, generator=g) > 0.8
    truncated = (torch.rand(shape, generator=g) > 0.85) & ~terminated
    adv, ret = generalized_advantage_estimate(rewards, values, next_values, terminated, truncated, 0.9, lam)
    expected = brute_force_gae(rewards, values, next_values, terminated, truncated, 0.9, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    rewards = torch.ones(6, 2, dtype=torch.float64)
    dones = torch.tensor([[0, 0], [0, 1], [0, 0], [1, 0], [0, 0], [0, 1]]).bool()
    zeros = torch.zeros_like(rewards)
    _, ret = generalized_advantage_estimate(rewards, zeros, zeros, dones, torch.zeros_like(dones), 0.9, 1.0)
    torch.testing.assert_close(ret, discounted_returns(rewards, dones, 0.9))


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"policy_logits": torch.zeros(7)}, ValueError, "`policy_logits` must have 2 dimensions"),
        ({"values": torch.zeros(7, 1)}, ValueError, r"`values` must have shape \(7,\)"),
        ({"actions": torch.zeros(7)}, TypeError, "`actions` must hold integer"),
        ({"actions": torch.zeros(6, dtype=torch.long)}, ValueError, r"`actions` must have shape \(7,\)"),
        ({"returns": torch.zeros(5)}, ValueError, "`returns` must have shape"),
        ({"next_potentials": None}, ValueError, "`potentials` and `next_potentials`"),
        ({"mask": torch.ones(3)}, ValueError, "`mask` must have shape"),
        ({"terminated": torch.ones(3)}, ValueError, "`terminated` must have shape"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, pattern):
    with pytest.raises(error, match=pattern):
        reward_shaping_loss(**(make_batch() | change))


def test_registry_and_options():
    loss = build_loss({"name": "reward_shaping", "params": {"shaping_weight": 0.3}})
    assert isinstance(loss, RewardShapingLoss) and loss.shaping_weight == 0.3
    assert (loss.value_weight, loss.entropy_weight) == (0.5, 0.01)
    with pytest.raises(ValueError, match="`discount`"):
        RewardShapingLoss(discount=1.5)
    with pytest.raises(ValueError, match="`entropy_weight`"):
        RewardShapingLoss(entropy_weight=-1.0)


def test_actions_out_of_range_are_refused_where_they_count():
    batch = make_batch()
    batch["actions"] = batch["actions"].clone()
    batch["actions"][0] = 3  # 3 actions: indices 0..2
    with pytest.raises(ValueError, match=r"`actions` must lie in \[0, 3\), got values in \[\d, 3\]"):
        reward_shaping_loss(**batch)
    batch["mask"] = batch["mask"].clone()
    batch["mask"][0] = False  # a masked transition may hold anything (padding)
    torch.testing.assert_close(
        reward_shaping_loss(**batch), brute_force_loss(**cast(batch, torch.float64)).float()
    )


def test_ruled_out_actions_leave_every_term_unchanged():
    """A -inf logit (invalid-action masking) of an action never taken: the loss and its gradient are those
    of the same batch without that action (the entropy's 0·log 0 is 0, not NaN)."""
    batch = cast(make_batch(), torch.float64)
    with_column = batch | {
        "policy_logits": torch.cat([batch["policy_logits"], torch.full((7, 1), -math.inf)], dim=1)
    }
    logits = with_column["policy_logits"].requires_grad_()
    loss = reward_shaping_loss(**with_column)
    torch.testing.assert_close(loss, brute_force_loss(**batch))
    (grad,) = torch.autograd.grad(loss, logits)
    plain = batch["policy_logits"].clone().requires_grad_()
    (expected,) = torch.autograd.grad(reward_shaping_loss(**(batch | {"policy_logits": plain})), plain)
    torch.testing.assert_close(grad[:, :-1], expected)
    assert torch.count_nonzero(grad[:, -1]) == 0


def test_masked_transitions_never_reach_the_loss_or_a_gradient():
    batch = cast(make_batch(), torch.float64)
    dropped = ~batch["mask"]
    poisoned = dict(batch)
    for name in ("policy_logits", "values", "advantages", "returns", "potentials", "next_potentials"):
        poisoned[name] = batch[name].clone()
        poisoned[name][dropped] = math.nan
    logits, values = (poisoned[n].requires_grad_() for n in ("policy_logits", "values"))
    loss = reward_shaping_loss(**poisoned)
    torch.testing.assert_close(loss, brute_force_loss(**batch))
    grads = torch.autograd.grad(loss, (logits, values))
    assert all(torch.count_nonzero(g[dropped]) == 0 and torch.isfinite(g).all() for g in grads)


def cast(batch, dtype):
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in batch.items()
    }


@pytest.mark.parametrize("num_actions", [3, 300], ids=["bmm-entropy", "wide"])
@pytest.mark.parametrize("term", ["policy_loss", "entropy"])
def test_each_term_alone_has_the_gradient_of_its_formula(term, num_actions):
    """The policy and entropy terms share one function with a hand-written backward: each differentiated
    alone (the other output gets no gradient) against autograd over the plain formula; few actions (the
    entropy's row dot by bmm) and many."""
    batch = cast(make_batch(num_actions=num_actions), torch.float64)
    batch["mask"] = None
    logits = batch["policy_logits"].requires_grad_()
    terms = reward_shaping_terms(**batch)
    (grad,) = torch.autograd.grad(getattr(terms, term), logits)
    plain = logits.detach().clone().requires_grad_()
    log_p = torch.log_softmax(plain, dim=-1)
    if term == "entropy":
        expected = -(log_p.exp() * log_p).sum(-1).mean()
    else:
        expected = -(batch["advantages"] * log_p.gather(-1, batch["actions"][:, None]).squeeze(-1)).mean()
    torch.testing.assert_close(getattr(terms, term), expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, plain)[0])
