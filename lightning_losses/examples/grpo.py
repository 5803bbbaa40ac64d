"""GRPO on the addition task: rollouts of the policy being trained, scored by the checker, for ``clipped_pg``.

Each training batch takes ``P`` prompts of the training split and samples ``G`` completions of each from
the *current* policy (``TinyCausalLM.generate`` at temperature 1, no grad), so every optimizer step learns
from the policy's own samples (Shao et al. 2024, "DeepSeekMath", GRPO). Per completion :math:`i` of a
prompt's group, the reward is the verifier's :math:`r_i \\in \\{0, 1\\}` and the advantage

.. math::
    A_i = \\frac{r_i - \\operatorname{mean}_g(r)}{\\operatorname{std}_g(r) + \\epsilon}

(sample standard deviation, Bessel-corrected, as TRL's ``GRPOTrainer``; a group whose rewards are all
equal, or a group of one, gets :math:`A = 0` and contributes only through the KL term). The advantage is one
number per sequence (``[B]``), which ``clipped_pg`` broadcasts over the completion tokens.

Batch layout (``shift=True``: logits at ``t`` score ``input_ids[:, t + 1]``), ``B = P × G`` rows with the
``G`` samples of a prompt contiguous:

- ``input_ids [B, T]``: prompt + completion, cut after the first end marker and padded (id 0);
- ``token_mask [B, T]``: True on the completion tokens up to and including the end marker;
- ``prev_logprobs [B, T]``: the sampling policy's :math:`\\log\\pi_{old}` of each token (detached; one
  update per batch, so the ratio is 1 at that step);
- ``reference_logprobs [B, T]``: the frozen reference policy's (the warm start), for the KL penalty;
- ``advantages [B]``, ``rewards [B]``.

- :func:`group_advantages`, :func:`rollout_batch` (pure functions),
- :class:`AdditionGRPODataModule`: on-policy batches with the ``LossModule`` being trained; the reference
  is a frozen copy of the policy's weights taken in ``setup`` (before a ``ckpt_path`` resume restores
  the trained ones), i.e. :class:`~lightning_losses.examples.verifiable_task.WarmStartLM`'s checkpoint;
- :class:`RewardLogger`: logs ``train/reward`` (each step), ``train/reward_epoch`` and ``val/reward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_losses.examples.causal_lm import TinyCausalLM
from lightning_losses.examples.verifiable_task import (
    AdditionDataModule,
    AdditionTask,
    frozen_copy,
    token_logprobs,
    truncate_at_end,
)

__all__ = ["AdditionGRPODataModule", "RewardLogger", "RolloutDataset", "group_advantages", "rollout_batch"]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """``(r - mean_g) / (std_g + eps)`` per group of ``group_size`` consecutive rewards; ``[B]`` → ``[B]``.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3)  # mean 1/3, std 0.577
    tensor([ 1.1547, -0.5773, -0.5773,  0.0000,  0.0000,  0.0000])
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"`rewards` must be [B] with B a multiple of `group_size` ({group_size}), "
            f"got {tuple(rewards.shape)}"
        )
    if eps < 0:
        raise ValueError(f"`eps` must be ≥ 0, got {eps}")
    groups = rewards.reshape(-1, group_size).float()
    centred = groups - groups.mean(-1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=centred.dtype)
    std = groups.std(-1, keepdim=True)
    # an all-equal group has centred == 0 exactly: 0 / (0 + eps) = 0, and 0 for eps = 0 too (no NaN)
    advantages = torch.where(centred == 0, torch.zeros_like(centred), centred / (std + eps))
    return advantages.reshape(-1)


@torch.no_grad()
def rollout_batch(
    policy: TinyCausalLM,
    task: AdditionTask,
    prompts: Sequence[str],
    group_size: int,
    reference: nn.Module | None = None,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """Sample ``group_size`` completions per prompt from ``policy`` and build a ``clipped_pg`` batch.

    Args:
        policy: the current policy (sampled at temperature 1, or greedily).
        task: the task (prompt encoding, end marker, verifier).
        prompts: ``P`` prompts of ``task``.
        group_size: ``G`` samples per prompt (contiguous rows).
        reference: the frozen reference policy; None leaves out ``reference_logprobs``.
        generator: the sampler's ``torch.Generator`` (on the policy's device).
        greedy: argmax decoding (then the ``G`` samples are equal and the advantages 0).
        eps: see :func:`group_advantages`.

    Returns:
        ``{"input_ids", "token_mask", "prev_logprobs", ["reference_logprobs"], "advantages", "rewards"}``
        on CPU, laid out as in the module docstring.

    >>> task = AdditionTask(digits=1, val_size=10)
    >>> lm = TinyCausalLM(vocab_size=len(task.vocab), d_model=8, num_layers=1, num_heads=2, max_len=8)
    >>> batch = rollout_batch(lm, task, ["3+4=", "1+1="], group_size=3, reference=lm,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> batch["input_ids"].shape, batch["advantages"].shape
    (torch.Size([6, 7]), torch.Size([6]))
    >>> sorted(batch)
    ['advantages', 'input_ids', 'prev_logprobs', 'reference_logprobs', 'rewards', 'token_mask']
    """
    if group_size < 1:
        raise ValueError(f"`group_size` must be positive, got {group_size}")
    if not prompts:
        raise ValueError("`prompts` must not be empty")
    device = next(policy.parameters()).device
    prompt_ids = task.prompt_ids(prompts).repeat_interleave(group_size, dim=0).to(device)
    ids = policy.generate(prompt_ids, task.max_new_tokens, greedy=greedy, generator=generator)
    input_ids, token_mask = truncate_at_end(ids, task.prompt_length, task.end_id)
    repeated = [p for p in prompts for _ in range(group_size)]
    rewards = task.rewards(repeated, task.completions(input_ids.cpu()))
    batch = {
        "input_ids": input_ids,
        "token_mask": token_mask,
        "prev_logprobs": token_logprobs(policy, input_ids),
        "advantages": group_advantages(rewards, group_size, eps),
        "rewards": rewards,
    }
    if reference is not None:
        batch["reference_logprobs"] = token_logprobs(reference, input_ids)
    return {k: v.cpu() for k, v in batch.items()}


class RolloutDataset(IterableDataset):
    """Rollout batches of ``prompts``, each sampled with ``get_policy()`` at that moment.

    ``shuffle=True`` (training): ``batches`` batches of ``prompts_per_batch`` prompts drawn without
    replacement within a batch from ``generator``. ``shuffle=False`` (evaluation): every prompt once, in
    order, in chunks of ``prompts_per_batch``.
    """

    def __init__(
        self,
        task: AdditionTask,
        prompts: Sequence[str],
        get_policy: Callable[[], tuple[TinyCausalLM, nn.Module | None]],
        prompts_per_batch: int,
        group_size: int,
        batches: int | None = None,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> None:
        super().__init__()
        if prompts_per_batch < 1 or (shuffle and prompts_per_batch > len(prompts)):
            raise ValueError(
                f"`prompts_per_batch` must be in [1, {len(prompts)}] (the prompts), got {prompts_per_batch}"
            )
        if shuffle and (batches is None or batches < 1):
            raise ValueError(f"`batches` must be positive when sampling prompts, got {batches}")
        self.task, self.prompts, self.get_policy = task, list(prompts), get_policy
        self.prompts_per_batch, self.group_size, self.batches = prompts_per_batch, group_size, batches
        self.shuffle, self.greedy = shuffle, greedy
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        if self.shuffle:
            return int(self.batches)  # type: ignore[arg-type]
        return -(-len(self.prompts) // self.prompts_per_batch)

    def _chunks(self) -> Iterator[list[str]]:
        if self.shuffle:
            for _ in range(len(self)):
                index = torch.randperm(len(self.prompts), generator=self.generator)[: self.prompts_per_batch]
                yield [self.prompts[i] for i in index.tolist()]
        else:
            for start in range(0, len(self.prompts), self.prompts_per_batch):
                yield self.prompts[start : start + self.prompts_per_batch]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for chunk in self._chunks():
            policy, reference = self.get_policy()
            sampler = self.generator
            device = next(policy.parameters()).device
            if device.type != "cpu":  # multinomial needs a generator on the policy's device
                sampler = torch.Generator(device).manual_seed(
                    int(torch.randint(2**62, (1,), generator=self.generator))
                )
            yield rollout_batch(policy, self.task, chunk, self.group_size, reference, sampler, self.greedy)


class AdditionGRPODataModule(AdditionDataModule):
    """On-policy GRPO batches of the addition task (see the module docstring).

    Args:
        digits / val_size / seed / torch_threads / split_seed: see
            :class:`~lightning_losses.examples.verifiable_task.AdditionDataModule`; ``seed`` (plus the
            rank under DDP) also seeds prompt draws and sampling.
        batch_size: ``P``, prompts per batch (a batch holds ``P × G`` sequences).
        group_size: ``G``, samples per prompt.
        batches_per_epoch: rollout batches (optimizer steps) per training epoch.
        val_group_size: samples per held-out prompt in validation (``val/reward``, ``val/kl_penalty``).
        eps: the advantage's :math:`\\epsilon`.

    ``num_workers`` is 0 by design: sampling needs the current parameters.

    >>> dm = AdditionGRPODataModule(batch_size=2, group_size=4, batches_per_epoch=3, torch_threads=None)
    >>> dm.setup("fit")
    >>> lm = TinyCausalLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10)
    >>> batches = list(dm.loader("train", policy=lm, reference=lm))
    >>> len(batches), batches[0]["input_ids"].shape
    (3, torch.Size([8, 10]))
    """

    def __init__(
        self,
        digits: int = 2,
        val_size: int = 500,
        batch_size: int = 16,
        group_size: int = 8,
        batches_per_epoch: int = 50,
        val_group_size: int = 4,
        eps: float = 1e-6,
        seed: int = 0,
        torch_threads: int | None = 1,
        split_seed: int = 0,
    ) -> None:
        super().__init__(digits, val_size, batch_size, seed, torch_threads, split_seed)
        for name, value in (
            ("group_size", group_size),
            ("batches_per_epoch", batches_per_epoch),
            ("val_group_size", val_group_size),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be positive, got {value}")
        self.save_hyperparameters()
        self.group_size, self.batches_per_epoch = group_size, batches_per_epoch
        self.val_group_size, self.eps = val_group_size, eps
        self.reference: nn.Module | None = None
        self.generator: torch.Generator | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed + self._rank())
        trainer = getattr(self, "trainer", None)
        if self.reference is None and trainer is not None and trainer.lightning_module is not None:
            # the policy's weights now, before a resume restores trained ones: the warm start
            self.reference = frozen_copy(trainer.lightning_module.model)

    def _policy_and_reference(self) -> tuple[TinyCausalLM, nn.Module | None]:
        policy = self._trained_model()
        device = next(policy.parameters()).device
        if self.reference is not None and next(self.reference.parameters()).device != device:
            self.reference = self.reference.to(device)
        return policy, self.reference  # type: ignore[return-value]

    def loader(
        self, split: str, policy: TinyCausalLM | None = None, reference: nn.Module | None = None
    ) -> DataLoader:
        """Rollouts of ``split`` (``"train"``: sampled prompts; ``"val"``: every held-out prompt) from
        ``policy`` and ``reference`` (default: the trained ``LossModule``'s model and the frozen copy)."""
        if split not in ("train", "val"):
            raise ValueError(f"`split` must be 'train' or 'val', got {split!r}")
        self.setup()
        train = split == "train"
        if policy is not None:
            fixed = (policy, reference)
            get_policy: Callable[[], tuple[TinyCausalLM, nn.Module | None]] = lambda: fixed  # noqa: E731
        else:
            get_policy = self._policy_and_reference
        # evaluation draws from its own generator, so validation never shifts the training samples
        generator = (
            self.generator if train else torch.Generator().manual_seed(self.seed + 10_000 + self._rank())
        )
        dataset = RolloutDataset(
            self.task,
            self.task.prompts(split),
            get_policy,
            self.batch_size,
            self.group_size if train else self.val_group_size,
            batches=self.batches_per_epoch if train else None,
            shuffle=train,
            generator=generator,
        )
        return DataLoader(dataset, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")


class RewardLogger(pl.Callback):
    """Logs the mean of ``batch["rewards"]``: ``train/reward`` each step, ``train/reward_epoch`` and
    ``val/reward`` as epoch means over sequences (rewards sampled at temperature 1)."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: dict, batch_idx: int
    ) -> None:
        rewards = batch["rewards"].float()
        mean = rewards.mean()
        pl_module.log("train/reward", mean, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log("train/reward_epoch", mean, on_step=False, on_epoch=True, batch_size=len(rewards))

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        rewards = batch["rewards"].float()
        pl_module.log("val/reward", rewards.mean(), on_epoch=True, batch_size=len(rewards))
