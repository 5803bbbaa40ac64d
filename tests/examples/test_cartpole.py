import pytest
import torch

pytest.importorskip("gymnasium")

from lightning_losses.examples.cartpole import (
    ActorCritic,
    CartPoleDataModule,
    CartPoleEvaluation,
    RolloutCollector,
    evaluate_policy,
    upright_potential,
)
from lightning_losses.functional.reward_shaping import generalized_advantage_estimate
from lightning_losses.losses.reward_shaping import RewardShapingLoss


def test_collector_batch_and_seeding():
    torch.manual_seed(0)
    model = ActorCritic(hidden=(16,))
    first = RolloutCollector(num_envs=3, rollout_steps=40, seed=5, normalize_advantages=False).collect(model)
    second = RolloutCollector(num_envs=3, rollout_steps=40, seed=5, normalize_advantages=False).collect(model)
    assert set(first) == {
        "observations", "actions", "advantages", "returns", "terminated", "potentials", "next_potentials"
    }  # fmt: skip
    assert first["observations"].shape == (120, 4) and first["actions"].shape == (120,)
    for key in first:
        torch.testing.assert_close(first[key], second[key], msg=key)
    # returns are the GAE targets of the critic: advantages + values of the observations
    values = model(first["observations"])["values"]
    torch.testing.assert_close(first["returns"] - first["advantages"], values)
    torch.testing.assert_close(first["potentials"], upright_potential(first["observations"]))
    # a random policy ends episodes within 40 steps in some of the 3 environments
    assert first["terminated"].any()


def test_collector_advantages_follow_gae_of_the_environment_rewards():
    """CartPole pays 1 per step: with a zero critic and λ = 1, the returns are discounted step counts."""

    def zero_critic(observations):
        return {"policy_logits": torch.zeros(len(observations), 2), "values": torch.zeros(len(observations))}

    collector = RolloutCollector(
        num_envs=2, rollout_steps=30, discount=0.9, gae_lambda=1.0, normalize_advantages=False, seed=0
    )
    batch = collector.collect(zero_critic)
    terminated = batch["terminated"].reshape(30, 2)
    _, expected = generalized_advantage_estimate(
        torch.ones(30, 2),
        torch.zeros(30, 2),
        torch.zeros(30, 2),
        terminated,
        torch.zeros_like(terminated),
        0.9,
        1.0,
    )
    torch.testing.assert_close(batch["returns"], expected.reshape(-1))
    assert collector.env_steps == 60 and len(collector.episode_returns) == int(terminated.sum())


def test_normalized_advantages_and_loss_module_inputs():
    from lightning_losses import LossModule

    collector = RolloutCollector(num_envs=2, rollout_steps=16, seed=1)
    module = LossModule(ActorCritic(hidden=(8,)), RewardShapingLoss())
    batch = collector.collect(lambda obs: module({"observations": obs}))
    torch.testing.assert_close(batch["advantages"].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    _, kwargs, count = module._loss_inputs(batch, module(batch))
    assert int(count) == 32 and int(kwargs["global_valid_seqs"]) == 32
    assert {"policy_logits", "values", "actions", "potentials", "terminated"} <= set(kwargs)


def test_potential_options():
    model = ActorCritic(hidden=(8,))
    critic = RolloutCollector(num_envs=2, rollout_steps=8, potential="critic", seed=0).collect(model)
    torch.testing.assert_close(critic["potentials"], model(critic["observations"])["values"])
    plain = RolloutCollector(num_envs=2, rollout_steps=8, potential="none", seed=0).collect(model)
    assert "potentials" not in plain and "next_potentials" not in plain
    # without potentials the loss's shaping term is exactly 0
    assert RewardShapingLoss()(**model(plain["observations"]), **{
        k: plain[k] for k in ("actions", "advantages", "returns")
    }).metrics["shaping_loss"].item() == 0.0  # fmt: skip


def test_evaluate_policy_is_seeded():
    model = ActorCritic()
    assert evaluate_policy(model, episodes=3, seed=7) == evaluate_policy(model, episodes=3, seed=7)


def test_bad_options():
    with pytest.raises(ValueError, match="`potential`"):
        RolloutCollector(potential="height")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`batches_per_epoch`"):
        CartPoleDataModule(batches_per_epoch=0)


def test_short_training_beats_the_random_policy():
    """A few thousand env steps of the config's recipe lift the greedy return far above random (~22)."""
    import lightning.pytorch as pl

    from lightning_losses import LossModule

    pl.seed_everything(0)
    evaluation = CartPoleEvaluation(episodes=10, stop_at=100.0)
    module = LossModule(
        ActorCritic(),
        RewardShapingLoss(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0),
    )
    trainer = pl.Trainer(
        max_epochs=4,
        gradient_clip_val=0.5,
        callbacks=[evaluation],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = CartPoleDataModule(num_envs=8, rollout_steps=16, batches_per_epoch=25, seed=0)
    random_return = sum(evaluate_policy(module, episodes=10)) / 10
    threads = torch.get_num_threads()
    try:
        trainer.fit(module, data)  # the data module sets one torch thread
    finally:
        torch.set_num_threads(threads)
    best = max(mean for _, mean in evaluation.history)
    assert best >= 100.0, (random_return, evaluation.history)
    assert "train/policy_loss" in trainer.callback_metrics and "eval/mean_return" in trainer.callback_metrics
