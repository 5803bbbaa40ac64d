"""A verifiable task for LLM post-training on 2 CPU cores: character-level addition checked by a program.

A prompt is ``"a+b="`` with both operands zero-padded to ``digits`` digits (``"07+45="``, so every prompt
has the same length and ``TinyCausalLM.generate`` can batch them); the answer is the plain decimal sum
followed by the end marker ``"."`` (``"52."``). :func:`check_addition` is the verifier: reward 1 for
exactly the right answer and its end marker, 0 otherwise. The pipeline, as in real post-training:

1. task SFT (``configs/lm_task_sft.yaml``): NLL on a small labelled set, short enough to leave the model
   partly right (:class:`AdditionSFTDataModule`);
2. GRPO (``configs/lm_grpo.yaml``, :mod:`lightning_losses.examples.grpo`): rollouts of the current policy
   scored by the checker, no labels;
3. DPO (``configs/lm_dpo.yaml``, :mod:`lightning_losses.examples.preference_pairs`): a correct vs an
   incorrect completion per prompt.

Steps 2 and 3 start from the SFT checkpoint (:class:`WarmStartLM`'s ``init_checkpoint``) and use a
frozen copy of those weights as the reference policy.

- :func:`check_addition`: the verifier. :class:`AdditionTask`: vocabulary, seeded split of all
  ``10^digits × 10^digits`` problems, encoding of prompts and completions.
- :func:`truncate_at_end`: the completion mask of generated sequences (stop at the end marker, pad after).
- :func:`token_logprobs`: a model's per-token log-probabilities of ``input_ids`` (the ``shift=True``
  layout of ``clipped_pg`` and ``dpo``). :func:`greedy_accuracy` and the :class:`GreedyAccuracy` callback.
- :class:`WarmStartLM`: ``TinyCausalLM`` that loads the ``model.`` weights of a ``LossModule`` checkpoint.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_losses.examples.causal_lm import CharVocab, TinyCausalLM
from lightning_losses.examples.digits import DictDataset

__all__ = [
    "END",
    "AdditionDataModule",
    "AdditionSFTDataModule",
    "AdditionTask",
    "GreedyAccuracy",
    "WarmStartLM",
    "check_addition",
    "encode_examples",
    "frozen_copy",
    "greedy_accuracy",
    "load_model_weights",
    "token_logprobs",
    "truncate_at_end",
]

END = "."
_PROMPT = re.compile(r"(\d+)\+(\d+)=")


def check_addition(prompt: str, completion: str) -> float:
    """The verifier: 1.0 when ``completion`` is the sum of the prompt's operands followed by ``"."``.

    Anything else scores 0.0: a wrong number, leading zeros, a missing end marker, text after it.

    >>> check_addition("07+45=", "52."), check_addition("07+45=", "52"), check_addition("07+45=", "052.")
    (1.0, 0.0, 0.0)
    >>> check_addition("99+99=", "198."), check_addition("00+00=", "0."), check_addition("00+00=", "0..")
    (1.0, 1.0, 0.0)
    """
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"`prompt` must look like 'a+b=' with decimal operands, got {prompt!r}")
    return float(completion == f"{int(match[1]) + int(match[2])}{END}")


class AdditionTask:
    """``digits``-digit addition: the vocabulary, a seeded split of every problem, prompt encoding.

    All ``10^digits × 10^digits`` pairs ``(a, b)`` are shuffled with ``seed``; the first ``val_size`` are
    the held-out split ``"val"``, the rest ``"train"``. ``max_new_tokens`` (``digits + 2``: the longest
    sum and the end marker) is the generation budget.

    >>> task = AdditionTask(digits=2, val_size=100)
    >>> len(task.pairs["train"]), len(task.pairs["val"]), task.prompt_length, task.max_new_tokens
    (9900, 100, 6, 4)
    >>> task.prompt(7, 45), task.answer(7, 45), task.vocab.decode(task.prompt_ids(["07+45="])[0])
    ('07+45=', '52.', '07+45=')
    """

    def __init__(self, digits: int = 2, val_size: int = 500, seed: int = 0) -> None:
        if digits < 1:
            raise ValueError(f"`digits` must be positive, got {digits}")
        total = 10 ** (2 * digits)
        if not 0 < val_size < total:
            raise ValueError(f"`val_size` must be in [1, {total - 1}] for digits={digits}, got {val_size}")
        self.digits = digits
        self.vocab = CharVocab("0123456789+=" + END)
        self.end_id = self.vocab.index[END]
        self.prompt_length = 2 * digits + 2
        self.max_new_tokens = digits + 2
        self.sequence_length = self.prompt_length + self.max_new_tokens
        pairs = [(a, b) for a in range(10**digits) for b in range(10**digits)]
        random.Random(seed).shuffle(pairs)
        self.pairs = {"val": pairs[:val_size], "train": pairs[val_size:]}

    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    @staticmethod
    def answer(a: int, b: int) -> str:
        return f"{a + b}{END}"

    def prompts(self, split: str) -> list[str]:
        if split not in self.pairs:
            raise ValueError(f"`split` must be one of {sorted(self.pairs)}, got {split!r}")
        return [self.prompt(a, b) for a, b in self.pairs[split]]

    def prompt_ids(self, prompts: Sequence[str]) -> Tensor:
        """``[N, prompt_length]`` token ids of ``prompts``."""
        bad = [p for p in prompts if len(p) != self.prompt_length]
        if bad:
            raise ValueError(f"`prompts` must all have {self.prompt_length} characters, got {bad[:3]!r}")
        return torch.tensor([self.vocab.encode(p) for p in prompts], dtype=torch.long).reshape(
            len(prompts), -1
        )

    def completions(self, ids: Tensor) -> list[str]:
        """The text after the prompt of each row of ``ids`` ``[N, T]`` (padding dropped)."""
        return [self.vocab.decode(row) for row in ids[:, self.prompt_length :].tolist()]

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        """``[N]`` float rewards of :func:`check_addition`."""
        return torch.tensor([check_addition(p, c) for p, c in zip(prompts, completions, strict=True)])


def encode_examples(
    task: AdditionTask, prompts: Sequence[str], completions: Sequence[str]
) -> dict[str, Tensor]:
    """Prompt + completion rows padded to ``task.sequence_length``, the mask on the completion tokens.

    Returns ``{"input_ids": [N, T], "token_mask": [N, T] bool}``; ``token_mask[i, t]`` is True where
    ``input_ids[i, t]`` is a completion token (the ``shift=True`` losses read it at ``[:, 1:]``).

    >>> task = AdditionTask(digits=1, val_size=10)
    >>> batch = encode_examples(task, ["3+4="], ["7."])
    >>> task.vocab.decode(batch["input_ids"][0]), batch["token_mask"][0].int().tolist()
    ('3+4=7.', [0, 0, 0, 0, 1, 1, 0])
    """
    if len(prompts) != len(completions):
        raise ValueError(
            f"`prompts` and `completions` must be as long, got {len(prompts)} and {len(completions)}"
        )
    rows = len(prompts)
    input_ids = torch.zeros(rows, task.sequence_length, dtype=torch.long)
    token_mask = torch.zeros(rows, task.sequence_length, dtype=torch.bool)
    start = task.prompt_length
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if len(prompt) != start or len(completion) > task.max_new_tokens:
            raise ValueError(
                f"`prompts` must have {start} characters and `completions` at most {task.max_new_tokens}, "
                f"got {prompt!r} and {completion!r}"
            )
        ids = task.vocab.encode(prompt + completion)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        token_mask[i, start : len(ids)] = True
    return {"input_ids": input_ids, "token_mask": token_mask}


def truncate_at_end(ids: Tensor, prompt_length: int, end_id: int, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Cut generated rows after their first end marker: ``(input_ids, token_mask)``, both ``[B, T]``.

    ``token_mask`` is True on the completion tokens up to and including the first ``end_id`` after the
    prompt (all generated tokens when there is none); later tokens become ``pad_id`` and are masked.

    >>> ids = torch.tensor([[1, 2, 5, 9, 7], [1, 2, 5, 5, 5]])
    >>> out, mask = truncate_at_end(ids, prompt_length=2, end_id=9)
    >>> out.tolist(), mask.int().tolist()
    ([[1, 2, 5, 9, 0], [1, 2, 5, 5, 5]], [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    """
    if ids.ndim != 2 or not 0 <= prompt_length <= ids.shape[1]:
        raise ValueError(
            f"`ids` must be [B, T] with T ≥ `prompt_length` ({prompt_length}), got {tuple(ids.shape)}"
        )
    completion = ids[:, prompt_length:]
    is_end = completion == end_id
    after_end = (is_end.long().cumsum(-1) - is_end.long()) > 0  # strictly after the first end marker
    out = ids.clone()
    out[:, prompt_length:] = torch.where(after_end, torch.full_like(completion, pad_id), completion)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt_length:] = ~after_end
    return out, mask


@torch.no_grad()
def token_logprobs(model: nn.Module, input_ids: Tensor) -> Tensor:
    r"""``[B, T]``: :math:`\log\pi(\text{input\_ids}[:, t] \mid \text{input\_ids}[:, <t])` under ``model``.

    Column 0 (no context) is 0. This is the layout ``clipped_pg``'s ``prev_logprobs`` /
    ``reference_logprobs`` and ``dpo``'s ``reference_logprobs`` read with ``shift=True``. Float32, no grad.

    >>> lm = TinyCausalLM(vocab_size=5, d_model=8, num_layers=1, num_heads=2, max_len=8)
    >>> lp = token_logprobs(lm, torch.tensor([[1, 2, 3]]))
    >>> lp.shape, lp[0, 0].item(), bool((lp[:, 1:] < 0).all())
    (torch.Size([1, 3]), 0.0, True)
    """
    logits = model(input_ids)["next_token_logits"][:, :-1].float()
    taken = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(taken[:, :1]), taken], dim=1)


@torch.no_grad()
def greedy_accuracy(
    model: TinyCausalLM, task: AdditionTask, prompts: Sequence[str], batch_size: int = 500
) -> float:
    """The fraction of ``prompts`` whose greedy completion passes :func:`check_addition`.

    >>> lm = TinyCausalLM(vocab_size=14, d_model=8, num_layers=1, num_heads=2, max_len=10)
    >>> 0.0 <= greedy_accuracy(lm, AdditionTask(digits=2, val_size=10), ["01+02="]) <= 1.0
    True
    """
    if not prompts:
        raise ValueError("`prompts` must not be empty")
    device = next(model.parameters()).device
    correct = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        ids = model.generate(task.prompt_ids(chunk).to(device), task.max_new_tokens, greedy=True).cpu()
        ids, _ = truncate_at_end(ids, task.prompt_length, task.end_id)
        correct += float(task.rewards(chunk, task.completions(ids)).sum())
    return correct / len(prompts)


def load_model_weights(model: nn.Module, checkpoint: str, prefix: str = "model.") -> nn.Module:
    """Load the ``prefix`` weights of a ``LossModule`` checkpoint (``state_dict["model.…"]``) into ``model``.

    Strict: every parameter of ``model`` must be there with its shape (a ``ValueError`` says which).
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(
            f"`checkpoint` {checkpoint!r} has no weights under {prefix!r} (keys: {sorted(state)[:5]})"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"`checkpoint` {checkpoint!r} does not fit {type(model).__name__}: {error}"
        ) from error
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False``: the reference policy."""
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


class WarmStartLM(TinyCausalLM):
    """:class:`TinyCausalLM` that starts from a ``LossModule`` checkpoint's ``model.`` weights.

    Args:
        init_checkpoint: path of a checkpoint (e.g. the task-SFT run's), or None for a fresh init.
        The others: as in :class:`TinyCausalLM` (they must match the checkpoint's model).

    >>> WarmStartLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10).max_len
    10
    """

    def __init__(
        self,
        vocab_size: int = 14,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 16,
        dropout: float = 0.0,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__(vocab_size, d_model, num_layers, num_heads, max_len, dropout)
        self.init_checkpoint = init_checkpoint
        if init_checkpoint is not None:
            load_model_weights(self, init_checkpoint)


class AdditionDataModule(pl.LightningDataModule):
    """Shared base: the task (:class:`AdditionTask`), the batch size and the thread setting.

    Args:
        digits / val_size: the task (:class:`AdditionTask`).
        batch_size: sequences (or prompts, or pairs: see the subclass) per batch.
        seed: seeds shuffling and sampling (plus the rank under DDP).
        torch_threads: ``torch.set_num_threads`` in ``setup`` (process-wide; None leaves it).
        split_seed: seeds the train/held-out split; keep it equal across the SFT, GRPO and DPO runs so that
            the held-out problems stay unseen.
    """

    def __init__(
        self,
        digits: int = 2,
        val_size: int = 500,
        batch_size: int = 64,
        seed: int = 0,
        torch_threads: int | None = 1,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"`torch_threads` must be positive or None, got {torch_threads}")
        self.task = AdditionTask(digits, val_size, split_seed)
        self.batch_size, self.seed, self.torch_threads = batch_size, seed, torch_threads

    def setup(self, stage: str | None = None) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def _trained_model(self) -> nn.Module:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.lightning_module is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a Trainer with a LossModule, or an explicit policy"
            )
        return trainer.lightning_module.model


class AdditionSFTDataModule(AdditionDataModule):
    """Task SFT: ``prompt + answer + "."`` rows for ``nll``, the mask on the answer tokens.

    Args: see :class:`AdditionDataModule`; ``train_size``: labelled problems (None: the whole training split).

    Training uses the first ``train_size`` problems of the training split (a small labelled set: the
    model generalizes from it to the held-out split); validation every held-out problem.
    Batches: ``{"input_ids" [B, T], "token_mask" [B, T]}``.

    >>> dm = AdditionSFTDataModule(train_size=100, batch_size=8, torch_threads=None)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> batch["input_ids"].shape, int(batch["token_mask"][0].sum()) >= 2
    (torch.Size([8, 10]), True)
    """

    def __init__(
        self,
        digits: int = 2,
        train_size: int | None = 1000,
        val_size: int = 500,
        batch_size: int = 64,
        seed: int = 0,
        torch_threads: int | None = 1,
        split_seed: int = 0,
    ) -> None:
        super().__init__(digits, val_size, batch_size, seed, torch_threads, split_seed)
        available = len(self.task.pairs["train"])
        if train_size is not None and not 0 < train_size <= available:
            raise ValueError(f"`train_size` must be in [1, {available}] or None, got {train_size}")
        self.save_hyperparameters()
        self.train_size = available if train_size is None else train_size

    def dataset(self, split: str) -> DictDataset:
        pairs = self.task.pairs[split]
        if split == "train":
            pairs = pairs[: self.train_size]
        prompts = [self.task.prompt(a, b) for a, b in pairs]
        answers = [self.task.answer(a, b) for a, b in pairs]
        return DictDataset(**encode_examples(self.task, prompts, answers))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + self._rank())
        return DataLoader(self.dataset("train"), self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), self.batch_size * 8)


class GreedyAccuracy(pl.Callback):
    """At each validation epoch end, log ``name``: the greedy accuracy of ``pl_module.model`` on the data
    module's ``split`` prompts (:func:`greedy_accuracy`; every rank evaluates all of them)."""

    def __init__(self, name: str = "val/accuracy", split: str = "val", batch_size: int = 500) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        self.name, self.split, self.batch_size = name, split, batch_size
        self.history: list[tuple[int, float]] = []  # (global step, accuracy)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task: Any = getattr(trainer.datamodule, "task", None)
        if not isinstance(task, AdditionTask):
            raise ValueError(f"{type(self).__name__} needs a data module with an AdditionTask `task`")
        accuracy = greedy_accuracy(pl_module.model, task, task.prompts(self.split), self.batch_size)
        if not trainer.sanity_checking:
            self.history.append((trainer.global_step, accuracy))
        pl_module.log(self.name, accuracy, prog_bar=True)
