"""``nan_policy`` against injected faults: a non-finite loss or a non-finite *gradient* (finite loss), in one
process (automatic optimization, ``accumulate_grad_batches``, ``micro_batch_size``) and under 2-process
DDP (ddp_spawn, gloo) with the fault on one rank only.

Gradient faults: ``SqrtResidualLoss`` is the L1 loss written as ``sqrt(r²)``, whose derivative at a zero
residual is 0/0 = NaN (a finite loss, a NaN gradient: the classic bug); ``InfGradRegressor`` is a model
whose backward multiplies the gradient by inf when its batch says so (a rank-local fault under DDP).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

import lightning_losses.module as module_module
from lightning_losses import LossModule
from tests.helpers import (
    DestroyProcessGroup,
    PoisonableTokenLoss,
    RankShardData,
    RecordGradients,
    TokenRegressor,
    TokenSquaredError,
    quiet_trainer,
    token_shards,
)

SGD = functools.partial(torch.optim.SGD, lr=0.1)
ADAMW = functools.partial(torch.optim.AdamW, lr=0.05)
FUSED_ADAMW = functools.partial(torch.optim.AdamW, lr=0.05, fused=True)


class SkipOnDeviceLossModule(LossModule):
    """With ``nan_policy="skip"`` and a fused AdamW, hands the check to the optimizer's kernel as
    ``found_inf`` on the CPU too (``LossModule`` keeps the host check there, where a read is no sync)."""

    _host_check_device_types = frozenset()


SKIP_PATHS = [
    pytest.param(LossModule, ADAMW, id="host_check"),
    pytest.param(SkipOnDeviceLossModule, FUSED_ADAMW, id="fused_on_device"),
]


class SqrtResidualLoss(torch.nn.Module):
    """mean over valid tokens of sqrt((preds - target)²): finite everywhere, NaN gradient at a 0 residual."""

    def forward(self, preds: Tensor, target: Tensor, token_mask: Tensor) -> Tensor:
        residual = (preds - target)[token_mask]
        return torch.sqrt(residual**2).mean()


class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, poison: Tensor) -> Tensor:
        ctx.save_for_backward(poison)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (poison,) = ctx.saved_tensors
        return torch.where(poison.any(), grad * float("inf"), grad), None


class InfGradRegressor(TokenRegressor):
    """TokenRegressor whose backward makes inf gradients when ``poison`` is set (the loss stays finite)."""

    def forward(self, features: Tensor, poison: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"preds": _InfGradient.apply(super().forward(features)["preds"], poison)}


def batches(n: int, dtype: torch.dtype = torch.float32) -> list[dict[str, Tensor]]:
    return [token_shards(dtype, seed=seed)[0] | {"poison": torch.tensor(False)} for seed in range(n)]


def zero_residual(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make one valid token's target equal the prediction of a zero-initialized model (0)."""
    target = batch["target"].clone()
    target[0, 0] = 0.0
    return batch | {"target": target}


def zero_model() -> TokenRegressor:
    model = TokenRegressor()
    torch.nn.init.zeros_(model.linear.weight)
    torch.nn.init.zeros_(model.linear.bias)
    return model


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.model.linear.weight.detach().clone())


def test_sqrt_residual_loss_is_finite_with_a_nan_gradient():
    model = zero_model()
    batch = zero_residual(batches(1)[0])
    loss = SqrtResidualLoss()(model(batch["features"])["preds"], batch["target"], batch["token_mask"])
    loss.backward()
    assert torch.isfinite(loss) and torch.isnan(model.linear.weight.grad).any()


def poison(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch | {"poison": torch.tensor(True)}


@pytest.fixture(params=["fused_check", "norm_check"])
def check(request, monkeypatch) -> str:
    """The fused check, or the gradients' norms that the dtypes it does not take get (bf16 on CUDA)."""
    if request.param == "norm_check":
        monkeypatch.setattr(module_module, "_FUSED_CHECK_DTYPES", {})
    return request.param


@pytest.mark.parametrize(("module_class", "optimizer"), SKIP_PATHS)
def test_nonfinite_gradient_with_finite_loss_skip_takes_no_step(module_class, optimizer, check):
    data = batches(3)
    data[1] = poison(data[1])  # InfGradRegressor: an inf gradient at step 1, the loss stays finite
    snapshots = Snapshots()
    torch.manual_seed(0)
    module = module_class(InfGradRegressor(), TokenSquaredError(), optimizer=optimizer, nan_policy="skip")
    trainer = quiet_trainer(max_steps=3, callbacks=[snapshots])
    trainer.fit(module, DataLoader(data, batch_size=None))
    assert module.skipped_steps.item() == 1
    assert torch.equal(snapshots.weights[0], snapshots.weights[1])  # the faulty step changed nothing
    assert not torch.equal(snapshots.weights[1], snapshots.weights[2])  # and training went on
    assert torch.isfinite(snapshots.weights[2]).all()
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {2}  # AdamW stepped twice: its state did not see the skipped step


def test_sqrt_at_zero_gradient_fault_skip_then_trains_on():
    data = batches(2)
    data[0] = zero_residual(data[0])  # a zero residual for the zero-initialized model: NaN gradient
    module = LossModule(zero_model(), SqrtResidualLoss(), optimizer=SGD, nan_policy="skip")
    quiet_trainer(max_steps=2).fit(module, DataLoader(data, batch_size=None))
    assert module.skipped_steps.item() == 1
    weight = module.model.linear.weight
    assert torch.isfinite(weight).all() and weight.abs().sum() > 0


class HugeGradientLoss(torch.nn.Module):
    """A finite loss whose gradient elements are ~1e30: finite, though their squares overflow float32."""

    def forward(self, preds: Tensor, target: Tensor, token_mask: Tensor) -> Tensor:
        return (preds * 1e30)[token_mask].sum()


@pytest.mark.parametrize(("module_class", "optimizer"), SKIP_PATHS)
def test_finite_gradients_whose_norm_overflows_are_not_skipped(module_class, optimizer, check):
    """The fused check is exact element by element: a norm or a sum that would overflow does not
    count. With norms, the host check then looks at every element and takes the step; the device
    skip cannot look again and skips it."""
    module = module_class(zero_model(), HugeGradientLoss(), optimizer=optimizer, nan_policy="skip")
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, DataLoader(batches(2), batch_size=None))
    skipped = 2 if check == "norm_check" and module_class is SkipOnDeviceLossModule else 0
    assert module.skipped_steps.item() == skipped
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {2 - skipped}
    assert torch.isfinite(module.model.linear.weight).all()


@pytest.mark.parametrize(("module_class", "optimizer"), SKIP_PATHS)
def test_bf16_gradients_and_float32_losses_are_checked_together(module_class, optimizer, check):
    """``bf16-true``: bfloat16 gradients (which CUDA's fused check does not take) beside the losses."""
    data = batches(3)
    data[1] = poison(data[1])
    torch.manual_seed(0)
    module = module_class(InfGradRegressor(), TokenSquaredError(), optimizer=optimizer, nan_policy="skip")
    grad_dtypes = set()

    class GradDtypes(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            grad_dtypes.update(p.grad.dtype for p in pl_module.parameters() if p.grad is not None)

    trainer = quiet_trainer(max_steps=3, precision="bf16-true", callbacks=[GradDtypes()])
    trainer.fit(module, DataLoader(data, batch_size=None))
    assert grad_dtypes == {torch.bfloat16}
    assert module.skipped_steps.item() == 1 and torch.isfinite(module.model.linear.weight).all()


@pytest.mark.parametrize("check", ["fused_check", "norm_check"], indirect=True)
def test_a_caught_raise_leaves_the_next_fit_unflagged(check, monkeypatch):
    """The host check reuses one flag tensor: a failed check must leave it zero, or every later step
    would look faulty and pay for the diagnosis of a failed check (more reads)."""
    module = LossModule(InfGradRegressor(), TokenSquaredError(), optimizer=SGD)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        quiet_trainer(max_steps=1).fit(module, DataLoader([poison(batches(1)[0])], batch_size=None))
    diagnosed = []
    diagnose = module._nonfinite_ranks
    monkeypatch.setattr(module, "_nonfinite_ranks", lambda *args: diagnosed.append(1) or diagnose(*args))
    before = module.model.linear.weight.detach().clone()
    quiet_trainer(max_steps=2).fit(module, DataLoader(batches(2), batch_size=None))
    assert not diagnosed and not torch.equal(module.model.linear.weight, before)


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_nonfinite_gradient_raise_names_the_parameters(micro_batch_size):
    data = [zero_residual(batches(1)[0])]
    module = LossModule(zero_model(), SqrtResidualLoss(), micro_batch_size=micro_batch_size)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient with a finite training loss.*model\."):
        quiet_trainer(max_steps=1).fit(module, DataLoader(data, batch_size=None))


def test_nonfinite_gradient_warn():
    data = batches(2)
    data[0] = zero_residual(data[0])
    module = LossModule(zero_model(), SqrtResidualLoss(), optimizer=SGD, nan_policy="warn")
    with pytest.warns(UserWarning, match="non-finite gradient.*skipping the optimizer step"):
        quiet_trainer(max_steps=2).fit(module, DataLoader(data, batch_size=None))
    assert module.skipped_steps.item() == 1 and torch.isfinite(module.model.linear.weight).all()


@pytest.mark.parametrize(("module_class", "optimizer"), SKIP_PATHS)
@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_accumulation_window_with_a_fault_in_its_first_batch_is_skipped_whole(
    fault, module_class, optimizer, check
):
    """A fault in the first batch of an ``accumulate_grad_batches=2`` window is caught at the window's
    optimizer step (the loss flags are kept until then); the clean windows match a clean run's."""
    data = batches(6)
    data[2] = poison(data[2])
    if fault == "loss":  # NaN loss with a finite (zero) gradient: only the kept flag reveals it
        loss, model = PoisonableTokenLoss(), TokenRegressor
    else:  # inf gradient, finite loss
        loss, model = TokenSquaredError(), InfGradRegressor
    torch.manual_seed(0)
    module = module_class(model(), loss, optimizer=optimizer, nan_policy="skip")
    snapshots = Snapshots()
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[snapshots])
    trainer.fit(module, DataLoader(data, batch_size=None))
    assert trainer.global_step == 3 and module.skipped_steps.item() == 1  # a skipped step still counts
    assert torch.equal(snapshots.weights[1], snapshots.weights[3])  # window 2 (batches 2, 3) skipped
    assert not torch.equal(snapshots.weights[3], snapshots.weights[5])

    # reference: the same run without the faulty window equals it step for step
    torch.manual_seed(0)
    clean = module_class(model(), loss, optimizer=optimizer, nan_policy="skip")
    clean_data = data[:2] + data[4:]
    quiet_trainer(max_epochs=1, accumulate_grad_batches=2).fit(clean, DataLoader(clean_data, batch_size=None))
    assert torch.equal(clean.model.linear.weight, module.model.linear.weight)


def test_micro_batches_with_a_gradient_fault_in_one_micro_batch_skip():
    data = batches(3)
    data[0] = zero_residual(data[0])  # row 0 holds the zero residual: the first micro-batch of step 0
    module = LossModule(
        zero_model(), SqrtResidualLoss(), optimizer=SGD, nan_policy="skip", micro_batch_size=2
    )
    snapshots = Snapshots()
    quiet_trainer(max_epochs=1, callbacks=[snapshots]).fit(module, DataLoader(data, batch_size=None))
    assert module.skipped_steps.item() == 1
    assert snapshots.weights[0].abs().sum() == 0  # step 0 skipped: still the zero initialization
    assert not torch.equal(snapshots.weights[0], snapshots.weights[1])
    assert torch.isfinite(snapshots.weights[2]).all()


FUSED_SGD = functools.partial(torch.optim.SGD, lr=0.1, fused=True)


class HostReads(pl.Callback):
    """The number of reads of a tensor's value (``item``, ``tolist``, ``bool``, ...) in each training
    batch, from its start to its end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        self.per_batch: dict[int, int] = {}
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.total += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.per_batch[batch_idx] = self.total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_batch[batch_idx] = self.total - self.per_batch[batch_idx]


@pytest.mark.parametrize(
    ("nan_policy", "module_class", "optimizer", "reads_per_step"),
    [
        ("skip", LossModule, SGD, 1),
        ("ignore", LossModule, SGD, 0),
        ("skip", LossModule, FUSED_ADAMW, 1),  # on the CPU
        ("skip", SkipOnDeviceLossModule, FUSED_ADAMW, 0),
        ("raise", SkipOnDeviceLossModule, FUSED_ADAMW, 1),
        # fused SGD's skip of a first step leaves the momentum uninitialized: the host check decides
        ("skip", SkipOnDeviceLossModule, FUSED_SGD, 1),
    ],
)
def test_clean_steps_read_the_host_once_per_step(
    monkeypatch, nan_policy, module_class, optimizer, reads_per_step
):
    """The finite check costs one host read per optimizer step; none with ``nan_policy="ignore"``, or
    with ``"skip"`` and a fused AdamW off the CPU (its kernel skips)."""
    reads = HostReads(monkeypatch)
    module = module_class(TokenRegressor(), TokenSquaredError(), optimizer=optimizer, nan_policy=nan_policy)
    quiet_trainer(max_steps=4, callbacks=[reads]).fit(module, DataLoader(batches(4), batch_size=None))
    assert reads.per_batch == dict.fromkeys(range(4), reads_per_step), reads.per_batch


def test_fused_adamw_skips_faulty_steps_with_no_host_read(monkeypatch):
    """A faulty step too is skipped on the device, and ``train/skipped_steps`` counts it there."""
    data = batches(4)
    data[1], data[2] = poison(data[1]), poison(data[2])
    torch.manual_seed(0)
    module = SkipOnDeviceLossModule(
        InfGradRegressor(), TokenSquaredError(), optimizer=FUSED_ADAMW, nan_policy="skip"
    )
    reads = HostReads(monkeypatch)
    trainer = quiet_trainer(max_steps=4, callbacks=[reads])
    trainer.fit(module, DataLoader(data, batch_size=None))
    assert reads.per_batch == dict.fromkeys(range(4), 0), reads.per_batch
    assert int(module.skipped_steps) == 2 and float(trainer.callback_metrics["train/skipped_steps"]) == 2
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {2}
    assert not hasattr(trainer.optimizers[0], "found_inf")  # removed after the step, as GradScaler does


def test_a_step_with_a_nonfinite_loss_stays_out_of_every_epoch_mean():
    """Its metrics (finite here: the loss alone is NaN) count for nothing, whatever each key's weight:
    the global token count (``loss``, ``squared_error``) or the batch size (``global_valid_toks``)."""
    data = batches(4)
    data[2] = data[2] | {"poison": torch.tensor(True)}  # PoisonableTokenLoss: a NaN loss
    logged = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(
                {k: float(trainer.callback_metrics[f"train/{k}"]) for k in ("loss", "global_valid_toks")}
            )

    module = LossModule(TokenRegressor(), PoisonableTokenLoss(), optimizer=SGD, nan_policy="skip")
    trainer = quiet_trainer(max_epochs=1, callbacks=[Record()])
    trainer.fit(module, DataLoader(data, batch_size=None))
    good = [step for index, step in enumerate(logged) if index != 2]
    toks = [step["global_valid_toks"] for step in good]
    expected_loss = sum(step["loss"] * n for step, n in zip(good, toks, strict=True)) / sum(toks)
    metrics = trainer.callback_metrics
    assert logged[2]["loss"] == 0.0  # logged as 0 with weight 0
    assert float(metrics["train/loss_epoch"]) == pytest.approx(expected_loss, rel=1e-6)
    assert float(metrics["train/squared_error_epoch"]) == pytest.approx(expected_loss, rel=1e-6)
    assert float(metrics["train/global_valid_toks_epoch"]) == pytest.approx(sum(toks) / 3, rel=1e-6)


@pytest.mark.parametrize(("module_class", "optimizer"), SKIP_PATHS)
def test_skipped_steps_is_logged_at_each_epoch_end_with_the_count_so_far(module_class, optimizer):
    data = batches(3)
    data[1] = poison(data[1])  # a skipped step in every epoch
    seen = []

    class AtEpochStart(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.callback_metrics.get("train/skipped_steps"))

    torch.manual_seed(0)
    module = module_class(InfGradRegressor(), TokenSquaredError(), optimizer=optimizer, nan_policy="skip")
    trainer = quiet_trainer(max_epochs=3, callbacks=[AtEpochStart()])
    trainer.fit(module, DataLoader(data, batch_size=None))
    assert seen[0] is None and [float(v) for v in seen[1:]] == [1.0, 2.0]
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 3.0 == module.skipped_steps.item()


# ---------------------------------------------------------------------------------------------------
# 2-process DDP (ddp_spawn, gloo), the fault on rank 1 only
# ---------------------------------------------------------------------------------------------------


class RecordingLossModule(LossModule):
    """LossModule whose ranks each record the ``FloatingPointError`` they stop with, then wait (at most 60
    s) for the other ranks' records before raising: ``mp.spawn`` terminates the other workers as soon as
    one exits with an error, which would race a slower rank's record (and Lightning calls callbacks'
    ``on_exception`` only in the launching process). A rank that never raises leaves its record missing."""

    record_directory: Path | None = None

    def optimizer_step(self, *args, **kwargs):
        try:
            return super().optimizer_step(*args, **kwargs)
        except FloatingPointError as error:
            directory = self.record_directory
            (directory / f"exception_rank{self.global_rank}.txt").write_text(repr(error))
            records = [directory / f"exception_rank{rank}.txt" for rank in range(self.trainer.world_size)]
            deadline = time.monotonic() + 60
            while not all(path.exists() for path in records) and time.monotonic() < deadline:
                time.sleep(0.05)
            raise


class RecordingSkipOnDeviceLossModule(RecordingLossModule):
    _host_check_device_types = frozenset()  # as SkipOnDeviceLossModule


def ddp_fit(
    directory: Path,
    per_rank: list[list[dict]],
    model: torch.nn.Module,
    loss,
    optimizer=SGD,
    module_class: type[RecordingLossModule] = RecordingLossModule,
    **module_kwargs,
):
    directory.mkdir(exist_ok=True)
    module = module_class(model, loss, optimizer=optimizer, **module_kwargs)
    module.record_directory = directory
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_spawn",
        precision="64-true",
        max_epochs=1,
        use_distributed_sampler=False,
        callbacks=[RecordGradients(directory), DestroyProcessGroup()],
    )
    trainer.fit(module, datamodule=RankShardData(per_rank))


def poisoned_on_rank1(step: int, steps: int = 3) -> list[list[dict]]:
    shards = [token_shards(seed=seed) for seed in range(steps)]
    clean = {"poison": torch.tensor(False)}
    per_rank = [[s[0] | clean for s in shards], [s[1] | clean for s in shards]]
    per_rank[1][step] = per_rank[1][step] | {"poison": torch.tensor(True)}
    return per_rank


def inf_grad_model() -> InfGradRegressor:
    torch.manual_seed(0)
    return InfGradRegressor().double()


def assert_ranks_identical_and_step_skipped(directory: Path, skipped_batch: int, steps: int = 3) -> None:
    states = [[torch.load(directory / f"state_rank{r}_batch{b}.pt") for b in range(steps)] for r in range(2)]
    for batch in range(steps):
        for name, weight in states[0][batch]["weights"].items():
            assert torch.equal(weight, states[1][batch]["weights"][name]), (batch, name)
    assert all(states[r][-1]["skipped_steps"].item() == 1 for r in range(2))
    weights = [states[0][b]["weights"]["model.linear.weight"] for b in range(steps)]
    assert torch.equal(weights[skipped_batch - 1], weights[skipped_batch])  # both ranks skipped it
    assert not torch.equal(weights[skipped_batch], weights[skipped_batch + 1])  # and trained on
    assert torch.isfinite(weights[-1]).all()


def assert_every_rank_stopped_with(directory: Path, pattern: str) -> None:
    for rank in range(2):
        recorded = (directory / f"exception_rank{rank}.txt").read_text()
        assert "FloatingPointError" in recorded and pattern in recorded, (rank, recorded)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_gradient_fault_on_one_rank_skip(tmp_path):
    """The inf gradient of rank 1 reaches rank 0 through DDP's all-reduce: both skip, no deadlock."""
    ddp_fit(
        tmp_path / "run", poisoned_on_rank1(step=1), inf_grad_model(), TokenSquaredError(), nan_policy="skip"
    )
    assert_ranks_identical_and_step_skipped(tmp_path / "run", skipped_batch=1)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_gradient_fault_on_one_rank_raise_stops_both_processes(tmp_path):
    with pytest.raises(Exception, match="non-finite gradient"):
        ddp_fit(tmp_path / "run", poisoned_on_rank1(step=0, steps=1), inf_grad_model(), TokenSquaredError())
    assert_every_rank_stopped_with(tmp_path / "run", "non-finite gradient with a finite training loss")


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_loss_fault_on_one_rank_raise_stops_both_processes(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(Exception, match="non-finite training loss"):
        ddp_fit(
            tmp_path / "run",
            poisoned_on_rank1(step=0, steps=1),
            TokenRegressor().double(),
            PoisonableTokenLoss(),
        )
    assert_every_rank_stopped_with(tmp_path / "run", "non-finite training loss on 1 of 2 rank(s)")


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_loss_fault_on_one_rank_skip_on_device(tmp_path):
    """A fused AdamW skips on the device: rank 1's NaN loss (finite gradients) reaches rank 0 only
    through the all-reduced ``found_inf``, and both skip the step."""
    torch.manual_seed(0)
    ddp_fit(
        tmp_path / "run",
        poisoned_on_rank1(step=1),
        TokenRegressor().double(),
        PoisonableTokenLoss(),
        optimizer=FUSED_ADAMW,
        module_class=RecordingSkipOnDeviceLossModule,
        nan_policy="skip",
    )
    assert_ranks_identical_and_step_skipped(tmp_path / "run", skipped_batch=1)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_micro_batches_loss_fault_on_one_rank_skip(tmp_path):
    """The manual-optimization path (``micro_batch_size``): rank 1's NaN loss skips the step on both."""
    torch.manual_seed(0)
    ddp_fit(
        tmp_path / "run",
        poisoned_on_rank1(step=1),
        TokenRegressor().double(),
        PoisonableTokenLoss(),
        nan_policy="skip",
        micro_batch_size=2,
    )
    assert_ranks_identical_and_step_skipped(tmp_path / "run", skipped_batch=1)
