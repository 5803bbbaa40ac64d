"""CartPole-v1 (gymnasium, no download) for ``RewardShapingLoss``: rollouts, an actor-critic, evaluation.

- :class:`RolloutCollector` steps ``num_envs`` seeded environments (a plain loop, each reset by hand, so the
  true final observation of every episode is kept) with the current policy and turns ``rollout_steps``
  steps into one batch: GAE(γ, λ) advantages and returns (truncation at 500 steps bootstraps from the
  critic's value of the final observation; termination does not), and the potentials of the shaping term.
- :class:`CartPoleDataModule`: an ``IterableDataset`` of such batches, sampled with the policy of the
  ``LossModule`` being trained (so one optimizer step per rollout: synchronous advantage actor-critic).
- :class:`ActorCritic`: separate actor and critic networks returning ``{"policy_logits", "values"}``.
- :class:`CartPoleEvaluation`: greedy episodes on held-out seeds, logs ``eval/mean_return``.

Potentials :math:`\\Phi` (``potential``): ``"none"``; ``"upright"``, :math:`1 - |\\theta| / \\theta_{max}`
(1 upright, 0 at the 12° failure angle); ``"critic"``, the critic's own value (detached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_losses.functional.reward_shaping import generalized_advantage_estimate

__all__ = [
    "ActorCritic",
    "CartPoleDataModule",
    "CartPoleEvaluation",
    "RolloutCollector",
    "evaluate_policy",
    "upright_potential",
]

Policy = Callable[[Tensor], Mapping[str, Tensor]]
ANGLE_LIMIT = 12 * 2 * np.pi / 360  # CartPole-v1 terminates beyond ±12°


def _make_env(env_id: str) -> Any:
    try:
        import gymnasium as gym
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("the CartPole example needs gymnasium: pip install gymnasium") from error
    return gym.make(env_id)


def upright_potential(observations: Tensor) -> Tensor:
    """:math:`\\Phi(s) = 1 - |\\theta| / 12°` of CartPole observations ``[..., 4]`` (pole angle at index 2).

    >>> upright_potential(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.10472, 0.0]])).round(decimals=3)
    tensor([1.0000, 0.5000])
    """
    return 1.0 - observations[..., 2].abs() / ANGLE_LIMIT


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (tanh).

    ``observations [N, obs]`` → ``{"policy_logits": [N, A], "values": [N]}``; the two share no parameter.

    >>> model = ActorCritic()
    >>> out = model(torch.zeros(3, 4))
    >>> out["policy_logits"].shape, out["values"].shape
    (torch.Size([3, 2]), torch.Size([3]))
    """

    def __init__(
        self, observation_size: int = 4, num_actions: int = 2, hidden: Sequence[int] = (64, 64)
    ) -> None:
        super().__init__()
        self.actor = self._mlp(observation_size, num_actions, hidden)
        self.critic = self._mlp(observation_size, 1, hidden)
        last_actor = self.actor[-1]
        assert isinstance(last_actor, nn.Linear)
        nn.init.normal_(last_actor.weight, std=0.01)  # a near-uniform initial policy
        nn.init.zeros_(last_actor.bias)

    @staticmethod
    def _mlp(width: int, out: int, hidden: Sequence[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        layers.append(nn.Linear(width, out))
        return nn.Sequential(*layers)

    def forward(self, observations: Tensor) -> dict[str, Tensor]:
        return {"policy_logits": self.actor(observations), "values": self.critic(observations).squeeze(-1)}


class RolloutCollector:
    """Steps ``num_envs`` seeded environments with a policy; ``collect(policy)`` gives one batch.

    The batch (``N = num_envs × rollout_steps`` transitions) holds ``observations [N, 4]``,
    ``actions [N]``, ``advantages [N]`` (GAE, standardized over the batch when
    ``normalize_advantages``), ``returns [N]`` (value targets, GAE advantages + values, never
    standardized), ``terminated [N]`` and, unless ``potential="none"``, ``potentials`` /
    ``next_potentials [N]`` (Φ of the state and of the true next state).

    Args:
        num_envs / rollout_steps: environments stepped together, steps per batch.
        discount / gae_lambda: γ and λ of GAE (λ = 1: discounted returns bootstrapped at the cut).
        potential: ``"none"``, ``"upright"`` or ``"critic"`` (see the module docstring).
        normalize_advantages: standardize advantages per batch.
        seed: seeds of the environments (``seed + i``) and of the action sampler.
        env_id: a gymnasium id with a discrete action space.

    >>> collector = RolloutCollector(num_envs=2, rollout_steps=5, seed=0)
    >>> batch = collector.collect(ActorCritic())
    >>> batch["observations"].shape, batch["actions"].shape, collector.env_steps
    (torch.Size([10, 4]), torch.Size([10]), 10)
    """

    def __init__(
        self,
        num_envs: int = 8,
        rollout_steps: int = 32,
        discount: float = 0.99,
        gae_lambda: float = 0.95,
        potential: Literal["none", "upright", "critic"] = "upright",
        normalize_advantages: bool = True,
        seed: int = 0,
        env_id: str = "CartPole-v1",
    ) -> None:
        if num_envs < 1 or rollout_steps < 1:
            raise ValueError(
                f"`num_envs` and `rollout_steps` must be positive, got {num_envs}, {rollout_steps}"
            )
        if potential not in ("none", "upright", "critic"):
            raise ValueError(f"`potential` must be 'none', 'upright' or 'critic', got {potential!r}")
        self.num_envs, self.rollout_steps = num_envs, rollout_steps
        self.discount, self.gae_lambda = discount, gae_lambda
        self.potential, self.normalize_advantages = potential, normalize_advantages
        self.envs = [_make_env(env_id) for _ in range(num_envs)]
        self.observations = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]).astype(
            np.float32
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.env_steps = 0
        self.episode_returns: list[float] = []
        self._running_returns = np.zeros(num_envs)

    def _potential(self, observations: Tensor, values: Tensor) -> Tensor | None:
        if self.potential == "upright":
            return upright_potential(observations)
        if self.potential == "critic":
            return values
        return None

    @torch.no_grad()
    def collect(self, policy: Policy) -> dict[str, Tensor]:
        """One rollout of ``rollout_steps`` steps in every environment, as a training batch."""
        steps, envs = self.rollout_steps, self.num_envs
        obs = torch.empty(steps, envs, 4)
        next_obs = torch.empty(steps, envs, 4)
        actions = torch.empty(steps, envs, dtype=torch.long)
        rewards = torch.empty(steps, envs)
        terminated = torch.zeros(steps, envs, dtype=torch.bool)
        truncated = torch.zeros(steps, envs, dtype=torch.bool)
        for t in range(steps):
            current = torch.from_numpy(self.observations)
            # sampled on the CPU with the CPU generator: the environments run there, the policy may not
            logits = policy(current)["policy_logits"].float().cpu()
            action = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator).squeeze(-1)
            obs[t], actions[t] = current, action
            following = np.empty_like(self.observations)
            for i, env in enumerate(self.envs):
                observation, reward, term, trunc, _ = env.step(int(action[i]))
                rewards[t, i] = float(reward)
                terminated[t, i], truncated[t, i] = bool(term), bool(trunc)
                next_obs[t, i] = torch.from_numpy(np.asarray(observation, dtype=np.float32))
                self._running_returns[i] += float(reward)
                if term or trunc:
                    self.episode_returns.append(float(self._running_returns[i]))
                    self._running_returns[i] = 0.0
                    observation, _ = env.reset()
                following[i] = observation
            self.observations = following
        self.env_steps += steps * envs
        flat_obs, flat_next = obs.reshape(-1, 4), next_obs.reshape(-1, 4)
        values = policy(flat_obs)["values"].float().cpu().reshape(steps, envs)  # a CPU batch, like the rest
        next_values = policy(flat_next)["values"].float().cpu().reshape(steps, envs)
        advantages, returns = generalized_advantage_estimate(
            rewards, values, next_values, terminated, truncated, self.discount, self.gae_lambda
        )
        advantages = advantages.reshape(-1)
        if self.normalize_advantages and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        batch = {
            "observations": flat_obs,
            "actions": actions.reshape(-1),
            "advantages": advantages,
            "returns": returns.reshape(-1),
            "terminated": terminated.reshape(-1),
        }
        potentials = self._potential(flat_obs, values.reshape(-1))
        if potentials is not None:
            next_potentials = self._potential(flat_next, next_values.reshape(-1))
            assert next_potentials is not None
            batch |= {"potentials": potentials, "next_potentials": next_potentials}
        return batch


class RolloutDataset(IterableDataset):
    """``batches_per_epoch`` rollouts of ``collector``, each sampled with ``get_policy()`` at that moment."""

    def __init__(self, collector: RolloutCollector, get_policy: Callable[[], Policy], batches_per_epoch: int):
        super().__init__()
        self.collector, self.get_policy, self.batches_per_epoch = collector, get_policy, batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for _ in range(self.batches_per_epoch):
            yield self.collector.collect(self.get_policy())


class CartPoleDataModule(pl.LightningDataModule):
    """Rollout batches of CartPole-v1 from the policy being trained (see :class:`RolloutCollector`).

    The policy is the ``LossModule``'s forward (the model's outputs by name), called on
    ``{"observations": ...}``; one "epoch" is ``batches_per_epoch`` rollouts. ``num_workers`` is 0 by
    design: the rollout needs the current parameters. Under DDP each rank steps its own environments
    (seeds offset by ``global_rank × num_envs``) and ``global_valid_seqs`` counts all ranks' transitions.

    Args:
        batches_per_epoch: rollouts (optimizer steps) per epoch.
        torch_threads: ``torch.set_num_threads`` in ``setup`` (process-wide; ``None`` leaves it). The
            networks are tiny and every step waits for the environments: one intra-op thread avoids
            oversubscription, which on a busy 2-core machine made a run ~20× slower (3.6 s vs 82 s).
        **collector arguments: those of :class:`RolloutCollector`.
    """

    def __init__(
        self,
        num_envs: int = 8,
        rollout_steps: int = 32,
        batches_per_epoch: int = 20,
        discount: float = 0.99,
        gae_lambda: float = 0.95,
        potential: Literal["none", "upright", "critic"] = "upright",
        normalize_advantages: bool = True,
        seed: int = 0,
        env_id: str = "CartPole-v1",
        torch_threads: int | None = 1,
    ) -> None:
        super().__init__()
        if batches_per_epoch < 1:
            raise ValueError(f"`batches_per_epoch` must be positive, got {batches_per_epoch}")
        self.save_hyperparameters()
        self.batches_per_epoch = batches_per_epoch
        self.collector_kwargs = {
            "num_envs": num_envs,
            "rollout_steps": rollout_steps,
            "discount": discount,
            "gae_lambda": gae_lambda,
            "potential": potential,
            "normalize_advantages": normalize_advantages,
            "seed": seed,
            "env_id": env_id,
        }
        self.torch_threads = torch_threads
        self.collector: RolloutCollector | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        if self.collector is None:
            # under DDP every rank steps its own environments: offset the seeds so rollouts differ
            rank = self.trainer.global_rank if self.trainer is not None else 0
            kwargs = dict(self.collector_kwargs)
            kwargs["seed"] = int(kwargs["seed"]) + rank * int(kwargs["num_envs"])
            self.collector = RolloutCollector(**kwargs)

    def _policy(self) -> Policy:
        module = self.trainer.lightning_module  # type: ignore[union-attr]
        return lambda observations: module({"observations": observations.to(module.device)})

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.collector is not None
        return DataLoader(
            RolloutDataset(self.collector, self._policy, self.batches_per_epoch), batch_size=None
        )


@torch.no_grad()
def evaluate_policy(
    policy: Policy, episodes: int = 20, seed: int = 10_000, env_id: str = "CartPole-v1"
) -> list[float]:
    """Returns of ``episodes`` greedy (argmax) episodes on seeds ``seed, seed + 1, ...``, run side by side.

    >>> returns = evaluate_policy(ActorCritic(), episodes=2)
    >>> len(returns), all(r >= 1 for r in returns)
    (2, True)
    """
    envs = [_make_env(env_id) for _ in range(episodes)]
    observations = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns = [0.0] * episodes
    active = list(range(episodes))
    while active:
        batch = torch.from_numpy(np.stack([observations[i] for i in active]).astype(np.float32))
        actions = policy(batch)["policy_logits"].argmax(-1)
        still = []
        for i, action in zip(active, actions.tolist(), strict=True):
            observations[i], reward, term, trunc, _ = envs[i].step(action)
            returns[i] += float(reward)
            if not (term or trunc):
                still.append(i)
        active = still
    for env in envs:
        env.close()
    return returns


class CartPoleEvaluation(pl.Callback):
    """Every ``every_n_epochs`` training epochs, run ``episodes`` greedy episodes and log
    ``eval/mean_return``, ``eval/min_return``, ``train/env_steps`` and ``train/episode_return`` (mean of
    the training episodes finished since the last evaluation); stop training once the mean reaches
    ``stop_at`` (None: never).

    Args:
        episodes / seed: the evaluation episodes (seeds ``seed + i``, apart from the training seeds).
        every_n_epochs: evaluation period.
        stop_at: the mean return that ends training (CartPole-v1 counts 475 as solved).
        env_id: the environment.
    """

    def __init__(
        self,
        episodes: int = 20,
        seed: int = 10_000,
        every_n_epochs: int = 1,
        stop_at: float | None = 475.0,
        env_id: str = "CartPole-v1",
    ) -> None:
        self.episodes, self.seed, self.every_n_epochs = episodes, seed, every_n_epochs
        self.stop_at, self.env_id = stop_at, env_id
        self.history: list[tuple[int, float]] = []  # (env steps, mean return) of every evaluation
        self._seen_episodes = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        returns = evaluate_policy(
            lambda obs: pl_module({"observations": obs.to(pl_module.device)}),
            self.episodes,
            self.seed,
            self.env_id,
        )
        pl_module.train(was_training)
        mean_return = sum(returns) / len(returns)
        collector = getattr(trainer.datamodule, "collector", None)
        env_steps = collector.env_steps if collector is not None else 0
        self.history.append((env_steps, mean_return))
        pl_module.log("eval/mean_return", mean_return, prog_bar=True)
        pl_module.log("eval/min_return", min(returns))
        pl_module.log("train/env_steps", float(env_steps))
        if collector is not None and len(collector.episode_returns) > self._seen_episodes:
            recent = collector.episode_returns[self._seen_episodes :]
            self._seen_episodes = len(collector.episode_returns)
            pl_module.log("train/episode_return", sum(recent) / len(recent))
        if self.stop_at is not None and mean_return >= self.stop_at:
            trainer.should_stop = True
