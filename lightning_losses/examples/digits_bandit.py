"""scikit-learn's digits as a contextual bandit for ``CustomSequenceLoss``: classification from rewards only.

Each image is a context, the 10 digits are the actions and a "sequence" is a single action (``T = 1``).
The policy is the softmax of the model's logits; the learner never sees the label, only the reward
:math:`r = 1` when the sampled action is the label and :math:`0` otherwise. The advantage is
:math:`A_i = r_i - \\bar r` with :math:`\\bar r` the batch's mean reward: a constant baseline, which leaves
the policy gradient unbiased (up to a :math:`1/B` factor, since :math:`\\bar r` includes :math:`r_i`) and
lowers its variance (REINFORCE with a baseline, Williams 1992). With ``shift=False``,
``CustomSequenceLoss`` then minimizes :math:`-\\frac1B\\sum_i A_i \\log\\pi(a_i \\mid x_i)`.

- :func:`bandit_batch`: actions, rewards and advantages of a batch of images under given logits.
- :class:`DigitsBanditDataModule`: the seeded, stratified split of :class:`DigitsDataModule`; training
  batches are sampled on-policy with the ``LossModule`` being trained (like ``CartPoleDataModule``),
  validation/test batches take the greedy action (so the loss runs there too) and keep ``target`` for
  the accuracy.
- :class:`PolicyMLP`: an MLP returning ``{"next_token_logits": [B, 1, 10], "logits": [B, 10]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_losses.examples.digits import DigitsDataModule

__all__ = ["BanditDataset", "DigitsBanditDataModule", "PolicyMLP", "bandit_batch"]

Policy = Callable[[Tensor], Tensor]  # inputs [B, ...] -> logits [B, num_actions]


def bandit_batch(
    inputs: Tensor,
    target: Tensor,
    logits: Tensor,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    baseline: bool = True,
) -> dict[str, Tensor]:
    """One bandit batch: an action per image from ``softmax(logits)``, its reward and advantage.

    Args:
        inputs: ``[B, ...]`` the images (passed through).
        target: ``[B]`` the labels; only the rewards use them (and the accuracy metric).
        logits: ``[B, A]`` the policy's logits (detached here).
        greedy: take the argmax instead of sampling.
        generator: the sampler's ``torch.Generator`` (on the logits' device).
        baseline: subtract the batch's mean reward from the rewards (else the advantages are the rewards).

    Returns:
        ``{"inputs", "target", "input_ids" [B, 1], "token_mask" [B, 1] (ones), "rewards" [B],
        "advantages" [B]}``.

    >>> logits = torch.log(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]))
    >>> batch = bandit_batch(torch.zeros(3, 4), torch.tensor([1, 1, 1]), logits, greedy=True)
    >>> batch["input_ids"].tolist(), batch["rewards"].tolist()
    ([[1], [0], [1]], [1.0, 0.0, 1.0])
    >>> batch["advantages"]  # rewards minus their mean 2/3
    tensor([ 0.3333, -0.6667,  0.3333])
    """
    if logits.ndim != 2 or logits.shape[0] != target.shape[0] or target.ndim != 1:
        raise ValueError(
            f"`logits` must be [B, A] and `target` [B] with the same B, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if inputs.shape[0] != target.shape[0]:
        raise ValueError(
            f"`inputs` and `target` must have the same batch size, got {tuple(inputs.shape)} and "
            f"{tuple(target.shape)}"
        )
    logits = logits.detach().float()
    if greedy:
        action = logits.argmax(-1)
    else:
        action = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
    target = target.to(action.device)
    rewards = (action == target).float()
    advantages = rewards - rewards.mean() if baseline else rewards.clone()
    return {
        "inputs": inputs,
        "target": target,
        "input_ids": action[:, None],
        "token_mask": torch.ones_like(action[:, None], dtype=torch.bool),
        "rewards": rewards,
        "advantages": advantages,
    }


class BanditDataset(IterableDataset):
    """Bandit batches of ``inputs`` / ``target``, each built with ``get_policy()`` at that moment.

    Args:
        inputs / target: the images and labels.
        get_policy: returns the current policy, a callable ``inputs -> logits``.
        batch_size: images per batch (the last batch may be smaller).
        greedy: argmax actions (evaluation) instead of sampled ones.
        shuffle: a new order every pass, drawn from ``generator``.
        generator: seeds the order and the action sampler.
        baseline: see :func:`bandit_batch`.

    >>> data = BanditDataset(torch.zeros(5, 64), torch.arange(5), lambda: lambda x: torch.zeros(len(x), 10),
    ...                      batch_size=2, greedy=True)
    >>> [batch["input_ids"].shape[0] for batch in data]
    [2, 2, 1]
    """

    def __init__(
        self,
        inputs: Tensor,
        target: Tensor,
        get_policy: Callable[[], Policy],
        batch_size: int,
        greedy: bool = False,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        baseline: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        if len(inputs) != len(target):
            raise ValueError(f"`inputs` and `target` must be as long, got {len(inputs)} and {len(target)}")
        self.inputs, self.target, self.get_policy = inputs, target, get_policy
        self.batch_size, self.greedy, self.shuffle = batch_size, greedy, shuffle
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.baseline = baseline

    def __len__(self) -> int:
        return -(-len(self.target) // self.batch_size)

    @torch.no_grad()
    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.target)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            inputs, target = self.inputs[index], self.target[index]
            logits = self.get_policy()(inputs).cpu()
            yield bandit_batch(inputs, target, logits, self.greedy, self.generator, self.baseline)


class DigitsBanditDataModule(DigitsDataModule):
    """The digits as a contextual bandit (see the module docstring); the split of :class:`DigitsDataModule`.

    Training batches sample one action per image from the policy of the ``LossModule`` being trained
    (its forward's ``"logits"``, no grad, a ``torch.Generator`` seeded with ``seed``), so each optimizer
    step learns from the current policy's own actions. Validation and test batches take the greedy action.
    ``num_workers`` is 0 by design: sampling needs the current parameters.

    Args:
        batch_size: images per batch (evaluation uses the same).
        val_fraction / test_fraction / seed / image_shape: as in :class:`DigitsDataModule`; ``seed`` also
            seeds the training order and the action sampler.
        baseline: advantages are rewards minus the batch mean reward (``True``) or the rewards themselves.
        torch_threads: ``torch.set_num_threads`` in ``setup`` (process-wide; ``None`` leaves it): the
            network is tiny, and one intra-op thread avoids oversubscription on small machines.

    >>> dm = DigitsBanditDataModule(batch_size=4, torch_threads=None)
    >>> dm.setup("fit")
    >>> loader = dm.loader("train", policy=lambda x: torch.zeros(len(x), 10))
    >>> sorted(next(iter(loader)))
    ['advantages', 'input_ids', 'inputs', 'rewards', 'target', 'token_mask']
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        image_shape: bool = False,
        baseline: bool = True,
        torch_threads: int | None = 1,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed, image_shape, num_workers=0)
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"`torch_threads` must be positive or None, got {torch_threads}")
        self.save_hyperparameters()
        self.baseline = baseline
        self.torch_threads = torch_threads
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, stage: str | None = None) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        super().setup(stage)

    def _module_policy(self) -> Policy:
        module = self.trainer.lightning_module  # type: ignore[union-attr]
        return lambda inputs: module({"inputs": inputs.to(module.device)})["logits"]

    def loader(self, split: str, policy: Policy | None = None) -> DataLoader:
        """Batches of ``split`` (``"train"``, ``"val"`` or ``"test"``) under ``policy`` (default: the
        trained ``LossModule``'s); training batches are sampled and shuffled, the others greedy."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"`split` must be 'train', 'val' or 'test', got {split!r}")
        self.setup()
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        train = split == "train"
        fixed = policy
        get_policy = (lambda: fixed) if fixed is not None else self._module_policy
        bandit = BanditDataset(
            dataset.tensors["inputs"],
            dataset.tensors["target"],
            get_policy,
            self.batch_size,
            greedy=not train,
            shuffle=train,
            generator=self.generator,
            baseline=self.baseline,
        )
        return DataLoader(bandit, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


class PolicyMLP(nn.Module):
    """A policy MLP over ``num_actions``: ``inputs [B, ...]`` → ``{"next_token_logits": [B, 1, A],
    "logits": [B, A]}`` (one-token "sequences" for ``CustomSequenceLoss``, logits for the accuracy).

    The last layer starts near zero, so the initial policy is near-uniform (it explores every action).

    >>> out = PolicyMLP(64, 10, hidden=(32,))(torch.zeros(5, 64))
    >>> out["next_token_logits"].shape, out["logits"].shape
    (torch.Size([5, 1, 10]), torch.Size([5, 10]))
    """

    def __init__(self, in_features: int = 64, num_actions: int = 10, hidden: Sequence[int] = (128,)) -> None:
        super().__init__()
        if in_features < 1 or num_actions < 1:
            raise ValueError(
                f"`in_features` and `num_actions` must be positive, got {in_features}, {num_actions}"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU()]
            width = size
        last = nn.Linear(width, num_actions)
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        logits = self.net(inputs)
        return {"next_token_logits": logits[:, None, :], "logits": logits}
