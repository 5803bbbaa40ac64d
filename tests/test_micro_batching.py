"""``LossModule(micro_batch_size=...)``: exact gradients over micro-batches and DDP ranks.

The headline property of the LLM losses: with uneven token masks, the parameter gradient of one optimizer
step is the same (fp64, 1e-12) whether the global batch is processed whole, in micro-batches of any size,
or split over two DDP processes that micro-batch their halves. The Trainer's ``accumulate_grad_batches``
over the same micro-batches (per-micro-batch counts) gives another gradient, so the tests can fail.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_losses import LossModule
from lightning_losses.losses import (
    ClippedPGLoss,
    CombinedLoss,
    CustomSequenceLoss,
    DPOLoss,
    KLDivergenceLoss,
    NLLLoss,
)
from lightning_losses.module import split_batch
from tests.helpers import DestroyProcessGroup, RankShardData, TinyLM, quiet_trainer

VOCAB, STEPS = 7, 5
SGD = functools.partial(torch.optim.SGD, lr=0.1)


def token_batch(rows: int, seed: int) -> dict[str, Tensor]:
    """``input_ids [rows, STEPS]`` and a token mask with very uneven valid lengths per row."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 2, 4])[:rows]
    mask = torch.arange(STEPS)[None, :] < lengths[:, None]
    return {"input_ids": torch.randint(0, VOCAB, (rows, STEPS), generator=generator), "token_mask": mask}


def logprobs(rows: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return -torch.rand(rows, STEPS, generator=generator, dtype=torch.float64) * 3


def nll_batch() -> dict[str, Tensor]:
    return token_batch(6, 0)


def clipped_pg_batch() -> dict[str, Tensor]:
    batch = token_batch(6, 1)
    generator = torch.Generator().manual_seed(11)
    batch["advantages"] = torch.randn(6, generator=generator, dtype=torch.float64)
    batch["prev_logprobs"] = logprobs(6, 12)  # far from the model's: many ratios are clipped
    batch["reference_logprobs"] = logprobs(6, 13)
    batch["sample_mask"] = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    return batch


def custom_sequence_batch() -> dict[str, Tensor]:
    batch = token_batch(6, 2)
    batch["advantages"] = torch.randn(6, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    batch["sample_mask"] = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    return batch


def dpo_batch() -> dict[str, Tensor]:
    batch = token_batch(8, 3)  # 4 pairs: chosen on even rows, rejected on odd rows
    batch["reference_logprobs"] = logprobs(8, 31)
    batch["sample_mask"] = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    return batch


def kl_batch() -> dict[str, Tensor]:
    batch = token_batch(6, 4)
    generator = torch.Generator().manual_seed(41)
    return {
        "input_ids": batch["input_ids"],
        "mask": batch["token_mask"],
        "teacher_logits": torch.randn(6, STEPS, VOCAB, generator=generator, dtype=torch.float64),
    }


def combined_batch() -> dict[str, Tensor]:
    batch = token_batch(6, 5)
    generator = torch.Generator().manual_seed(51)
    batch["teacher_logits"] = torch.randn(6, STEPS, VOCAB, generator=generator, dtype=torch.float64)
    return batch


def nll_plus_local_mse() -> CombinedLoss:
    """A globally normalized NLL plus a plain torch MSE (a local mean, given no count)."""
    return CombinedLoss(
        {"nll": "nll", "match": torch.nn.MSELoss()},
        loss_weights={"match": 0.5},
        input_maps={"match": {"input": "next_token_logits", "target": "teacher_logits"}},
    )


@dataclass
class Case:
    make_loss: Callable[[], torch.nn.Module]
    make_batch: Callable[[], dict[str, Tensor]]
    micro_batch_sizes: tuple[int, ...]  # besides the whole batch
    rank_rows: tuple[int, int] | None  # how the global batch is split over 2 ranks (uneven)
    input_map: dict[str, str] = field(default_factory=dict)


CASES = {
    "nll": Case(NLLLoss, nll_batch, (1, 2, 4), (4, 2)),
    "clipped_pg": Case(lambda: ClippedPGLoss(kl_beta=0.1), clipped_pg_batch, (1, 2, 4), (4, 2)),
    "clipped_pg_sequence": Case(
        lambda: ClippedPGLoss(aggregation="sequence", ratio_clip_c=3.0), clipped_pg_batch, (1, 2), (4, 2)
    ),
    "custom_sequence": Case(lambda: CustomSequenceLoss(beta=0.0), custom_sequence_batch, (1, 2, 4), (4, 2)),
    # DPO needs whole pairs in a micro-batch: 2 rows = 1 pair is its smallest micro-batch
    "dpo": Case(lambda: DPOLoss(beta=0.5, sft_weight=0.3), dpo_batch, (2, 4), (6, 2)),
    "kl_divergence": Case(
        lambda: KLDivergenceLoss(temperature=2.0),
        kl_batch,
        (1, 2, 4),
        (4, 2),
        {"logits": "next_token_logits"},
    ),
    # not under DDP: there a local mean is averaged over ranks (mean of rank means), as DDP does
    "combined_with_a_local_mean": Case(nll_plus_local_mse, combined_batch, (1, 2, 4), None),
}


class RecordStepGradients(pl.Callback):
    """Each rank's gradients right before each optimizer step (after accumulation and DDP's average)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.steps: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        self.steps.append(grads)
        if self.directory is not None:
            torch.save(grads, self.directory / f"grads_rank{trainer.global_rank}.pt")


def initial_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab_size=VOCAB).double()


def step_gradients(
    case: Case, batches: list[dict[str, Tensor]], accumulate: int = 1, **module_kwargs: Any
) -> dict[str, Tensor]:
    """The gradient of the first optimizer step of a one-process run over ``batches``."""
    module = LossModule(
        initial_model(), case.make_loss(), optimizer=SGD, input_map=case.input_map, **module_kwargs
    )
    record = RecordStepGradients()
    trainer = quiet_trainer(
        precision="64-true", max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[record]
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return record.steps[0]


def assert_equal_gradients(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-12)


def differs(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> bool:
    return any(not torch.allclose(actual[n], expected[n], rtol=1e-6, atol=1e-9) for n in expected)


@pytest.mark.parametrize("name", list(CASES))
def test_micro_batches_give_the_whole_batch_gradient_and_accumulation_does_not(name):
    case = CASES[name]
    batch = case.make_batch()
    whole = step_gradients(case, [batch])
    assert any(g.abs().max() > 1e-3 for g in whole.values())  # a real gradient to compare
    for size in case.micro_batch_sizes:
        assert_equal_gradients(step_gradients(case, [batch], micro_batch_size=size), whole)

    # The naive way: each micro-batch its own step of Trainer accumulation, with its own counts.
    size = case.micro_batch_sizes[0]
    parts = split_batch(batch, size)
    accumulated = step_gradients(case, parts, accumulate=len(parts))
    assert differs(accumulated, whole)


def test_micro_batch_metrics_equal_the_whole_batch_metrics():
    case = CASES["clipped_pg"]
    batch = case.make_batch()
    results = []
    for size in (None, 1):
        module = LossModule(initial_model(), case.make_loss(), optimizer=SGD, micro_batch_size=size)
        trainer = quiet_trainer(precision="64-true", max_epochs=1)
        trainer.fit(module, DataLoader([batch], batch_size=None))
        results.append({k: v.double() for k, v in trainer.callback_metrics.items()})
    whole, micro = results
    assert whole.keys() == micro.keys()
    for key in whole:
        torch.testing.assert_close(micro[key], whole[key], rtol=1e-6, atol=1e-7, msg=key)


def test_local_mean_losses_are_weighed_by_the_micro_batch_share():
    """A loss given no count (plain ``torch.nn``) averages its micro-batch: weighed by rows, the
    micro-batches of 2, 2 and 1 rows give the mean over all 5."""
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, 3, generator=generator), torch.randint(0, 4, (5,), generator=generator))
    grads = []
    for size in (None, 2):
        torch.manual_seed(0)
        module = LossModule(
            torch.nn.Linear(3, 4), torch.nn.CrossEntropyLoss(), input_map={"input": "logits"},
            optimizer=SGD, micro_batch_size=size,
        )  # fmt: skip
        record = RecordStepGradients()
        quiet_trainer(max_epochs=1, callbacks=[record]).fit(module, DataLoader([batch], batch_size=None))
        grads.append(record.steps[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_micro_batch_training_clips_gradients_and_steps_schedulers():
    batch = nll_batch()
    record = RecordStepGradients()  # callbacks see the gradients before the module clips them
    module = LossModule(
        initial_model(), NLLLoss(), optimizer=SGD, micro_batch_size=2, gradient_clip_val=1e-3,
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr_scheduler_interval="step",
    )  # fmt: skip
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    trainer = quiet_trainer(precision="64-true", max_epochs=1, max_steps=1, callbacks=[record])
    trainer.fit(module, DataLoader([batch], batch_size=None))
    unclipped = torch.cat([g.flatten() for g in record.steps[0].values()]).norm()
    assert unclipped > 1e-2
    # SGD moved the weights by lr x the clipped gradient, whose norm is the threshold
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert float((before - after).norm() / 0.1) == pytest.approx(1e-3, rel=1e-4)  # clip adds 1e-6 to the norm
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    assert trainer.global_step == 1


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed with a gradient scaler"])
def test_micro_batch_mixed_precision_clips_in_true_gradient_units(precision):
    """Under fp16 AMP the module clips after the scaler unscaled the gradients (CPU has no fp16 AMP of
    its own in Lightning, so the plugin is built by hand with a CPU GradScaler at scale 1024): clipping
    the still-scaled gradients would move the weights 1024x less."""
    torch.manual_seed(0)
    module = LossModule(
        TinyLM(vocab_size=VOCAB), NLLLoss(), optimizer=SGD, micro_batch_size=2, gradient_clip_val=1e-3
    )
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    if precision == "bf16-mixed":
        trainer = quiet_trainer(precision="bf16-mixed", max_epochs=1, max_steps=1)
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        trainer = quiet_trainer(
            plugins=[MixedPrecision("16-mixed", "cpu", scaler)], max_epochs=1, max_steps=1
        )
    trainer.fit(module, DataLoader([nll_batch()], batch_size=None))
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert float((before - after).norm() / 0.1) == pytest.approx(1e-3, rel=1e-3)


def test_micro_batch_nan_policy_skip_takes_no_step():
    batch = nll_batch()
    model = initial_model()
    model.head.bias.data[0] = float("nan")
    module = LossModule(model, NLLLoss(), optimizer=SGD, micro_batch_size=2, nan_policy="skip")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    quiet_trainer(precision="64-true", max_epochs=1).fit(module, DataLoader([batch], batch_size=None))
    assert module.skipped_steps.item() == 1
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], equal_nan=True)

    raising = LossModule(model, NLLLoss(), optimizer=SGD, micro_batch_size=2)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        quiet_trainer(precision="64-true", max_epochs=1).fit(raising, DataLoader([batch], batch_size=None))


def test_micro_batch_size_arguments_are_checked():
    with pytest.raises(ValueError, match="micro_batch_size"):
        LossModule(TinyLM(), NLLLoss(), micro_batch_size=0)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        LossModule(TinyLM(), NLLLoss(), gradient_clip_val=-1.0)
    module = LossModule(TinyLM(), KLDivergenceLoss(), micro_batch_size=1)
    with pytest.raises(ValueError, match="before the model runs"):  # no mask: counting needs the logits
        module._batch_counts(
            {"input_ids": torch.zeros(2, 3, dtype=torch.long), "teacher_logits": torch.zeros(2, 3, 7)}
        )


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.rank_rows is not None])
def test_two_ddp_processes_with_micro_batches_give_the_one_process_gradient(name, tmp_path):
    """Rank 0 and rank 1 hold unequal halves (so unequal numbers of micro-batches and valid tokens)."""
    case = CASES[name]
    batch = case.make_batch()
    whole = step_gradients(case, [batch])
    first = case.rank_rows[0]
    halves = [{k: v[:first] for k, v in batch.items()}, {k: v[first:] for k, v in batch.items()}]
    module = LossModule(
        initial_model(), case.make_loss(), optimizer=SGD, input_map=case.input_map,
        micro_batch_size=case.micro_batch_sizes[0],
    )  # fmt: skip
    trainer = quiet_trainer(
        devices=2, strategy="ddp_spawn", precision="64-true", max_epochs=1, use_distributed_sampler=False,
        callbacks=[RecordStepGradients(tmp_path), DestroyProcessGroup()],
    )  # fmt: skip
    trainer.fit(module, datamodule=RankShardData([[halves[0]], [halves[1]]]))
    for rank in range(2):
        assert_equal_gradients(torch.load(tmp_path / f"grads_rank{rank}.pt"), whole)
