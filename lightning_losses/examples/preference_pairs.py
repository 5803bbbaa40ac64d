"""Preference pairs of the addition task for ``dpo``: a correct vs an incorrect completion per prompt.

For each prompt, *chosen* is the right answer (``"52."``) and *rejected* is a wrong one: the first of
``samples_per_prompt`` completions sampled from the reference policy (the warm-start model, temperature 1)
that fails the verifier, so DPO pushes down the model's own mistakes; when every sample is right, the right
answer with one digit changed (:func:`perturb_answer`). Pairs are built once, offline, from the frozen
reference, whose per-token log-probabilities are precomputed too (Rafailov et al. 2023).

Batch layout (``dpo``'s, NeMo RL's): ``2P`` rows with chosen at even and rejected at odd rows;
``input_ids``, ``token_mask`` (completion tokens, up to and including the end marker) and
``reference_logprobs`` (``shift=True`` layout), all ``[2P, T]``. The held-out split's pairs give
``val/accuracy``: the fraction of held-out pairs whose implicit reward margin
:math:`\\beta[(\\log\\pi - \\log\\pi_{ref})(c) - (\\log\\pi - \\log\\pi_{ref})(r)]` is positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_losses.examples.causal_lm import TinyCausalLM
from lightning_losses.examples.verifiable_task import (
    END,
    AdditionDataModule,
    AdditionTask,
    encode_examples,
    frozen_copy,
    token_logprobs,
    truncate_at_end,
)

__all__ = [
    "AdditionPreferenceDataModule",
    "PairDataset",
    "collate_pairs",
    "perturb_answer",
    "preference_pairs",
]


def perturb_answer(answer: str, generator: torch.Generator) -> str:
    """``answer`` (digits and the end marker) with one digit replaced by a different one, never giving
    a leading zero (so the result is a well-formed wrong answer).

    >>> g = torch.Generator().manual_seed(0)
    >>> wrong = [perturb_answer("52.", g) for _ in range(20)]
    >>> all(w != "52." and len(w) == 3 and w.endswith(".") and w[0] != "0" for w in wrong)
    True
    """
    digits = answer.removesuffix(END)
    if not digits.isdigit():
        raise ValueError(f"`answer` must be digits followed by {END!r}, got {answer!r}")
    position = int(torch.randint(len(digits), (1,), generator=generator))
    lowest = 1 if position == 0 and len(digits) > 1 else 0
    choices = [str(d) for d in range(lowest, 10) if str(d) != digits[position]]
    new = choices[int(torch.randint(len(choices), (1,), generator=generator))]
    return digits[:position] + new + digits[position + 1 :] + END


@torch.no_grad()
def preference_pairs(
    reference: TinyCausalLM,
    task: AdditionTask,
    pairs: Sequence[tuple[int, int]],
    samples_per_prompt: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Chosen/rejected rows for ``pairs`` (operands) under ``reference``; see the module docstring.

    Returns ``{"input_ids", "token_mask", "reference_logprobs"}`` ``[2N, T]`` (chosen at even rows) and
    ``"sampled_rejected"`` ``[N]`` bool: whether the rejected completion was the reference's own sample
    (else a perturbed answer).

    >>> task = AdditionTask(digits=1, val_size=10)
    >>> lm = TinyCausalLM(vocab_size=len(task.vocab), d_model=8, num_layers=1, num_heads=2, max_len=8)
    >>> out = preference_pairs(lm, task, [(3, 4)], generator=torch.Generator().manual_seed(0))
    >>> task.vocab.decode(out["input_ids"][0]), out["input_ids"].shape
    ('3+4=7.', torch.Size([2, 7]))
    """
    if samples_per_prompt < 0:
        raise ValueError(f"`samples_per_prompt` must be ≥ 0, got {samples_per_prompt}")
    if not pairs:
        raise ValueError("`pairs` must not be empty")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    prompts = [task.prompt(a, b) for a, b in pairs]
    answers = [task.answer(a, b) for a, b in pairs]
    device = next(reference.parameters()).device
    rejected: list[str | None] = [None] * len(prompts)
    if samples_per_prompt:
        prompt_ids = task.prompt_ids(prompts).repeat_interleave(samples_per_prompt, dim=0).to(device)
        sampler = generator
        if device.type != "cpu":
            sampler = torch.Generator(device).manual_seed(
                int(torch.randint(2**62, (1,), generator=generator))
            )
        ids = reference.generate(prompt_ids, task.max_new_tokens, generator=sampler).cpu()
        ids, _ = truncate_at_end(ids, task.prompt_length, task.end_id)
        completions = task.completions(ids)
        for row, completion in enumerate(completions):
            i = row // samples_per_prompt
            if rejected[i] is None and completion != answers[i]:
                rejected[i] = completion
    sampled = torch.tensor([r is not None for r in rejected])
    rejected_text = [
        r if r is not None else perturb_answer(a, generator) for r, a in zip(rejected, answers, strict=True)
    ]
    interleaved_prompts = [p for p in prompts for _ in range(2)]
    interleaved = [c for pair in zip(answers, rejected_text, strict=True) for c in pair]
    batch = encode_examples(task, interleaved_prompts, interleaved)
    reference_logprobs = token_logprobs(reference, batch["input_ids"].to(device)).cpu()
    return batch | {"reference_logprobs": reference_logprobs, "sampled_rejected": sampled}


class PairDataset(Dataset):
    """Preference pairs as items: item ``i`` is rows ``2i`` (chosen) and ``2i + 1`` (rejected) of each
    ``[2N, ...]`` tensor, as ``[2, ...]``; :func:`collate_pairs` flattens a batch back to ``[2P, ...]``."""

    def __init__(self, **tensors: Tensor) -> None:
        rows = {name: t.shape[0] for name, t in tensors.items()}
        if not rows or len(set(rows.values())) != 1 or next(iter(rows.values())) % 2:
            raise ValueError(f"`tensors` must all have the same even number of rows, got {rows}")
        self.tensors = {name: t.reshape(-1, 2, *t.shape[1:]) for name, t in tensors.items()}

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


def collate_pairs(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack ``P`` pair items (``[2, ...]`` each) into ``[2P, ...]``, chosen at even rows.

    >>> items = [{"x": torch.tensor([0, 1])}, {"x": torch.tensor([2, 3])}]
    >>> collate_pairs(items)["x"].tolist()
    [0, 1, 2, 3]
    """
    return {name: torch.cat([item[name] for item in items]) for name in items[0]}


class AdditionPreferenceDataModule(AdditionDataModule):
    """DPO pairs of the addition task (see the module docstring).

    In ``setup`` the reference is a frozen copy of the ``LossModule``'s model (the warm start loaded by
    :class:`~lightning_losses.examples.verifiable_task.WarmStartLM`; taken before a ``ckpt_path`` resume
    restores trained weights), and the pairs of ``train_size`` training prompts and of every held-out
    prompt are built once from it.

    Args:
        digits / val_size / seed / torch_threads / split_seed: see
            :class:`~lightning_losses.examples.verifiable_task.AdditionDataModule`.
        train_size: training prompts (pairs).
        batch_size: pairs per batch (``2 × batch_size`` rows).
        samples_per_prompt: reference samples searched for a wrong completion before perturbing.

    >>> dm = AdditionPreferenceDataModule(train_size=8, batch_size=4, torch_threads=None)
    >>> lm = TinyCausalLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10)
    >>> dm.build(reference=lm)
    >>> batch = next(iter(dm.train_dataloader()))
    >>> batch["input_ids"].shape, batch["reference_logprobs"].shape
    (torch.Size([8, 10]), torch.Size([8, 10]))
    """

    def __init__(
        self,
        digits: int = 2,
        train_size: int = 2000,
        val_size: int = 500,
        batch_size: int = 32,
        samples_per_prompt: int = 4,
        seed: int = 0,
        torch_threads: int | None = 1,
        split_seed: int = 0,
    ) -> None:
        super().__init__(digits, val_size, batch_size, seed, torch_threads, split_seed)
        available = len(self.task.pairs["train"])
        if not 0 < train_size <= available:
            raise ValueError(f"`train_size` must be in [1, {available}], got {train_size}")
        if samples_per_prompt < 0:
            raise ValueError(f"`samples_per_prompt` must be ≥ 0, got {samples_per_prompt}")
        self.save_hyperparameters()
        self.train_size, self.samples_per_prompt = train_size, samples_per_prompt
        self.reference: nn.Module | None = None
        self.datasets: dict[str, PairDataset] = {}
        self.sampled_fraction: dict[str, float] = {}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        trainer = getattr(self, "trainer", None)
        if not self.datasets and trainer is not None and trainer.lightning_module is not None:
            self.build(frozen_copy(trainer.lightning_module.model))

    def build(self, reference: TinyCausalLM) -> None:
        """Build the train and val pairs with ``reference`` (each split from its own seeded generator)."""
        self.reference = reference
        for offset, split in enumerate(("val", "train")):
            pairs = self.task.pairs[split]
            pairs = pairs[: self.train_size] if split == "train" else pairs
            generator = torch.Generator().manual_seed(self.seed + offset)
            data = preference_pairs(reference, self.task, pairs, self.samples_per_prompt, generator)
            self.sampled_fraction[split] = int(data.pop("sampled_rejected").sum()) / len(pairs)
            self.datasets[split] = PairDataset(**data)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(
                f"{type(self).__name__} has no pairs yet: call setup() under a Trainer or build()"
            )
        generator = torch.Generator().manual_seed(self.seed + self._rank())
        return DataLoader(
            self.datasets[split],
            self.batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
            collate_fn=collate_pairs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
