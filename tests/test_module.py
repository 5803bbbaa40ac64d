"""LossModule in one process: input resolution, training with three kinds of loss, precision, clipping."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import LossModule
from lightning_losses.examples import MLP, DictDataset
from tests.helpers import (
    GuideProtocolLoss,
    LearnableScaleLoss,
    PoisonableTokenLoss,
    TinyLM,
    TokenRegressor,
    TokenSquaredError,
    concat_shards,
    quiet_trainer,
    token_shards,
)


def lm_batches(num_batches: int = 8, batch: int = 4, steps: int = 6, vocab: int = 7) -> list[dict]:
    """Sequences following a fixed next-token rule, with ragged token masks."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(0, vocab, (batch, steps), generator=generator)
        lengths = torch.randint(2, steps + 1, (batch,), generator=generator)
        mask = (torch.arange(steps) < lengths[:, None]).float()
        out.append({"input_ids": ids, "token_mask": mask})
    return out


class RecordLoss(pl.Callback):
    def __init__(self, key: str = "train/loss") -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(trainer.callback_metrics[self.key].item())


def first_and_last(values: list[float], n: int = 5) -> tuple[float, float]:
    return sum(values[:n]) / n, sum(values[-n:]) / n


def test_guide_protocol_loss_trains_unchanged():
    module = LossModule(
        TinyLM(), GuideProtocolLoss({"alpha": 1.0}), optimizer=lambda p: torch.optim.Adam(p, 0.05)
    )
    record = RecordLoss("train/nll")
    trainer = quiet_trainer(max_epochs=6, callbacks=[record])
    trainer.fit(module, DataLoader(lm_batches(), batch_size=None))
    first, last = first_and_last(record.values)
    assert last < 0.7 * first, (first, last)
    # the batch-size count reached the loss: 4 sequences per batch, no sample mask
    assert trainer.callback_metrics["train/valid_seqs_epoch"].item() == 4


def test_plain_torch_loss_trains_and_logs_loss_only():
    x = torch.randn(256, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    module = LossModule(
        nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)),
        nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.Adam(p, 0.02),
        input_map={"input": "logits"},
    )
    record = RecordLoss()
    trainer = quiet_trainer(max_epochs=8, callbacks=[record])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    first, last = first_and_last(record.values)
    assert last < 0.5 * first, (first, last)
    assert module.loss_logger["train"].keys() == ["loss"]


def test_learnable_loss_parameter_is_optimized():
    x = torch.randn(128, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(128)
    loss_fn = LearnableScaleLoss(init_log_variance=2.0)
    module = LossModule(nn.Linear(4, 1), loss_fn, optimizer=lambda p: torch.optim.Adam(p, 0.05))
    record = RecordLoss()
    trainer = quiet_trainer(max_epochs=15, callbacks=[record])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    first, last = first_and_last(record.values)
    assert last < first - 1.0, (first, last)
    # the optimum of 0.5·exp(-s)·mse + 0.5·s is s = log(mse): the variance was learned, not left at 2
    mse = trainer.callback_metrics["train/mse_epoch"]
    assert loss_fn.log_variance.item() < 0.0  # moved from 2.0 towards its optimum log(mse)
    assert loss_fn.log_variance.item() > torch.log(mse).item()


def test_inputs_resolved_by_name_keyword_model_and_tuple_batches():
    module = LossModule(TokenRegressor(), TokenSquaredError())
    batch = token_shards(torch.float32)[0]
    outputs = module(batch)
    assert outputs.keys() == {"preds"}
    _, kwargs, global_count = module._loss_inputs(batch, outputs)
    assert global_count.item() == 10
    assert kwargs.keys() == {"preds", "target", "token_mask", "global_valid_toks"}
    assert kwargs["global_valid_toks"].item() == batch["token_mask"].sum().item() == 10

    tuple_module = LossModule(nn.Linear(3, 2), nn.CrossEntropyLoss(), input_map={"input": "logits"})
    loss, metrics, _, named, *_ = tuple_module._step((torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
    assert named.keys() == {"inputs", "target"} and metrics.keys() == {"loss"} and loss.ndim == 0


def test_missing_loss_input_error_lists_what_was_available():
    module = LossModule(nn.Linear(3, 2), nn.CrossEntropyLoss())
    with pytest.raises(ValueError) as info:
        module._step({"inputs": torch.randn(4, 3), "target": torch.tensor([0, 1, 1, 0])})
    message = str(info.value)
    assert "CrossEntropyLoss needs the input `input`" in message
    assert "model outputs have keys ['logits']" in message
    assert "batch have keys ['inputs', 'target']" in message


def test_missing_token_mask_for_global_valid_toks_is_a_clear_error():
    module = LossModule(TinyLM(), GuideProtocolLoss({}))
    batch = lm_batches(1)[0]
    del batch["token_mask"]
    with pytest.raises(
        ValueError, match="needs `global_valid_toks`, counted from the batch key 'token_mask'"
    ):
        module._step(batch)


def test_sample_mask_restricts_token_counts():
    module = LossModule(TokenRegressor(), TokenSquaredError())
    batch = token_shards()[0]
    batch["sample_mask"] = torch.tensor([1, 0, 1])
    toks, seqs = module.global_valid_counts(batch)
    assert (toks.item(), seqs.item()) == (4 + 3, 2)
    assert toks.dtype == torch.long


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="`nan_policy`"):
        LossModule(nn.Linear(2, 2), nn.MSELoss(), nan_policy="off")
    with pytest.raises(TypeError, match="`loss` must be an nn.Module"):
        LossModule(nn.Linear(2, 2), torch.nn.functional.mse_loss)
    module = LossModule(nn.Linear(2, 2), nn.MSELoss(), batch_keys=("inputs",))
    with pytest.raises(ValueError, match="batch of 2 elements"):
        module.batch_as_dict((torch.ones(1), torch.ones(1)))


def test_bf16_mixed_trains_and_loss_computes_in_fp32():
    seen_dtypes = []

    class SpyCE(nn.Module):
        def forward(self, logits, target):
            seen_dtypes.append(logits.dtype)
            return nn.functional.cross_entropy(logits, target)

    x = torch.rand(256, 64)
    y = (x[:, :32].sum(1) > x[:, 32:].sum(1)).long()
    module = LossModule(MLP(64, 2, hidden=(32,)), SpyCE(), optimizer=lambda p: torch.optim.Adam(p, 0.01))
    record = RecordLoss()
    trainer = quiet_trainer(max_epochs=6, precision="bf16-mixed", callbacks=[record])
    trainer.fit(module, DataLoader(DictDataset(inputs=x, target=y), batch_size=32))
    first, last = first_and_last(record.values)
    assert last < 0.8 * first, (first, last)
    assert set(seen_dtypes) == {torch.float32}  # the bf16 logits were upcast before the loss


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradient norm it is asked to apply (after Lightning's clipping)."""

    norms: list[float]

    def step(self, closure=None):
        result = super().step(closure) if closure is None else None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            super().step()
        return result


class PreClipNorm(pl.Callback):
    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


@pytest.mark.parametrize("nan_policy", ["raise", "skip"])
def test_gradient_clipping_takes_effect(nan_policy):
    x = torch.randn(64, 4) * 10
    y = x.sum(1, keepdim=True) * 10
    holder = {}

    def make_optimizer(params):
        holder["opt"] = RecordingSGD(params, lr=1e-4)
        holder["opt"].norms = []
        return holder["opt"]

    module = LossModule(
        nn.Linear(4, 1),
        nn.MSELoss(),
        optimizer=make_optimizer,
        input_map={"input": "logits"},
        nan_policy=nan_policy,
    )
    pre = PreClipNorm()
    trainer = quiet_trainer(max_steps=5, gradient_clip_val=0.5, callbacks=[pre])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    applied = holder["opt"].norms
    assert len(applied) == 5
    assert min(pre.norms) > 0.5  # clipping had work to do
    assert max(applied) <= 0.5 + 1e-5


def test_nan_policy_raise_and_skip_in_one_process():
    shards = token_shards(torch.float32)
    good = shards[0] | {"poison": torch.tensor(False)}
    bad = shards[0] | {"poison": torch.tensor(True)}
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        quiet_trainer(max_steps=2).fit(
            LossModule(TokenRegressor(), PoisonableTokenLoss()), DataLoader([good, bad], batch_size=None)
        )

    module = LossModule(
        TokenRegressor(),
        PoisonableTokenLoss(),
        nan_policy="skip",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    weights = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append(pl_module.model.linear.weight.detach().clone())

    quiet_trainer(max_steps=3, callbacks=[Snapshot()]).fit(
        module, DataLoader([good, bad, good], batch_size=None)
    )
    assert module.skipped_steps.item() == 1
    assert torch.equal(weights[0], weights[1])  # the poisoned step changed nothing
    assert not torch.equal(weights[1], weights[2])  # training went on
    assert torch.isfinite(weights[2]).all()


def test_validation_and_test_metrics_and_task_metrics():
    from torchmetrics.classification import MulticlassAccuracy

    x = torch.randn(96, 4)
    y = (x[:, 0] > 0).long()
    data = DataLoader(DictDataset(inputs=x, target=y), batch_size=40)  # batches of 40, 40, 16
    module = LossModule(
        nn.Linear(4, 2),
        nn.CrossEntropyLoss(),
        input_map={"input": "logits"},
        metrics={"accuracy": MulticlassAccuracy(num_classes=2, average="micro")},
    )
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, data, data)
    assert {"train/loss", "train/loss_epoch", "val/loss", "val/accuracy", "train/accuracy"} <= set(
        trainer.callback_metrics
    )
    results = trainer.test(module, data, verbose=False)[0]
    assert {"test/loss", "test/accuracy"} <= results.keys()
    with torch.no_grad():
        logits = module.model(x)
    expected_acc = (logits.argmax(1) == y).float().mean().item()
    expected_loss = nn.functional.cross_entropy(logits, y).item()  # batch means weighed by batch size
    assert results["test/accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert results["test/loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_full_batch_matches_manual_gradient_in_one_process():
    """Single process: LossModule's gradient is the plain autograd gradient of the global-batch loss."""
    torch.manual_seed(0)
    batch = concat_shards(token_shards())
    module = LossModule(TokenRegressor(), TokenSquaredError()).double()
    loss = module._step(batch).loss
    loss.backward()
    reference = TokenRegressor().double()
    reference.load_state_dict(module.model.state_dict())
    preds = reference(batch["features"])["preds"]
    ref_loss = ((preds - batch["target"]) ** 2)[batch["token_mask"]].mean()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(module.model.linear.weight.grad, reference.linear.weight.grad)


def test_nan_policy_warn_skips_and_warns():
    good = token_shards(torch.float32)[0] | {"poison": torch.tensor(False)}
    bad = good | {"poison": torch.tensor(True)}
    module = LossModule(TokenRegressor(), PoisonableTokenLoss(), nan_policy="warn")
    with pytest.warns(UserWarning, match="non-finite training loss.*skipping the optimizer step"):
        quiet_trainer(max_steps=2).fit(module, DataLoader([bad, good], batch_size=None))
    assert module.skipped_steps.item() == 1


def test_nan_policy_ignore_checks_nothing():
    good = token_shards(torch.float32)[0] | {"poison": torch.tensor(False)}
    bad = good | {"poison": torch.tensor(True)}
    module = LossModule(TokenRegressor(), PoisonableTokenLoss(), nan_policy="ignore")
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = quiet_trainer(max_steps=2, callbacks=[Record()])
    trainer.fit(module, DataLoader([bad, good], batch_size=None))
    assert trainer.global_step == 2 and module.skipped_steps.item() == 0
    assert math.isnan(losses[0]) and math.isfinite(losses[1])  # the NaN loss went through unchecked
    assert "train/skipped_steps" not in trainer.callback_metrics


def test_skip_policy_leaves_clean_training_unchanged_with_accumulation():
    """The skip path runs the optimizer itself: without faults it must match Lightning's own path."""
    batches = [
        s | {"poison": torch.tensor(False)} for seed in range(3) for s in token_shards(torch.float64, seed)
    ]
    final = {}
    for policy in ("raise", "skip"):
        torch.manual_seed(0)
        module = LossModule(
            TokenRegressor().double(),
            PoisonableTokenLoss(),
            nan_policy=policy,
            optimizer=lambda p: torch.optim.AdamW(p, lr=0.05),
        )
        trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.3)
        trainer.fit(module, DataLoader(batches, batch_size=None))
        assert trainer.global_step == 6  # 2 epochs × 6 batches / 2
        final[policy] = module.model.linear.weight.detach().clone()
    torch.testing.assert_close(final["skip"], final["raise"], rtol=0, atol=0)


def test_sequence_counts_without_token_mask_are_integers():
    module = LossModule(nn.Linear(2, 1), nn.MSELoss())
    toks, seqs = module.global_valid_counts({"inputs": torch.ones(5, 2)}, need_tokens=False)
    assert (toks.item(), seqs.item()) == (0, 5) and seqs.dtype == torch.long
    _, weighted = module.global_valid_counts(
        {"inputs": torch.ones(2, 2), "sample_mask": torch.tensor([0.5, 1.0])}, need_tokens=False
    )
    assert weighted.dtype == torch.float32 and weighted.item() == 1.5


def test_model_inputs_by_name_fallback_and_error():
    class TwoInputs(nn.Module):
        def forward(self, images, scale):
            return {"logits": images * scale}

    module = LossModule(TwoInputs(), nn.MSELoss(), model_input_map={"images": "inputs"})
    out = module({"inputs": torch.ones(2), "scale": torch.tensor(3.0)})
    assert torch.equal(out["logits"], torch.full((2,), 3.0))
    with pytest.raises(ValueError, match=r"TwoInputs needs the input `scale`.*batch have keys \['inputs'\]"):
        module({"inputs": torch.ones(2)})
    # one required parameter that the batch does not name: it gets batch["inputs"]
    single = LossModule(nn.Sequential(nn.Identity()), nn.MSELoss())
    assert torch.equal(single({"inputs": torch.ones(3)})["logits"], torch.ones(3))


def test_loss_parameters_get_no_weight_decay_and_task_metric_names_must_not_clash():
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_losses.losses import CrossEntropyLoss

    module = LossModule(
        nn.Linear(4, 1), LearnableScaleLoss(), optimizer=lambda p: torch.optim.AdamW(p, weight_decay=0.1)
    )
    optimizer = module.configure_optimizers()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[1]["params"] == [module.loss.log_variance]

    clashing = LossModule(
        nn.Linear(4, 3), CrossEntropyLoss(), metrics={"accuracy": MulticlassAccuracy(num_classes=3)}
    )
    data = DataLoader(DictDataset(inputs=torch.randn(8, 4), target=torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(ValueError, match=r"task metrics \['accuracy'\] have the names of metrics the loss"):
        quiet_trainer(max_steps=1).fit(clashing, data)


def test_library_loss_epoch_metrics_are_exact_over_uneven_batches():
    """A globally normalized loss logs one value per step; its local-mean metrics weigh by batch size."""
    from lightning_losses.losses import CrossEntropyLoss

    x = torch.randn(96, 4)
    y = (x[:, 0] + 0.5 * torch.randn(96) > 0).long()
    data = DataLoader(DictDataset(inputs=x, target=y), batch_size=40)  # 40, 40, 16
    module = LossModule(nn.Linear(4, 2), CrossEntropyLoss())
    results = quiet_trainer().test(module, data, verbose=False)[0]
    with torch.no_grad():
        logits = module.model(x)
    assert results["test/accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert results["test/loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_validate_before_fit_then_train():
    """Metric states first created under `trainer.validate` (inference mode) still update in `fit`."""
    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=16)
    module = LossModule(nn.Linear(4, 3), nn.CrossEntropyLoss(), input_map={"input": "logits"})
    quiet_trainer(max_epochs=1).validate(module, data, verbose=False)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, data, data)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_epoch_means_are_logged_again_after_a_learning_rate_finder_run(tmp_path):
    """A tuner's run trains steps of epoch 0 on the same trainer, then Lightning resets what was logged:
    the epoch means (logged once per epoch as Metric objects) must be logged again for the real epoch 0,
    or `train/loss_epoch` keeps the finder's value."""
    from lightning.pytorch.callbacks import LearningRateFinder

    shards = [token_shards(torch.float32, seed=seed)[0] for seed in range(6)]
    per_step = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            per_step.append((float(metrics["train/loss"]), float(metrics["train/global_valid_toks"])))

        def on_train_epoch_start(self, trainer, pl_module):
            per_step.clear()  # the finder's steps, then each epoch's own

        def on_train_epoch_end(self, trainer, pl_module):
            self.epoch_steps = list(per_step)

    torch.manual_seed(0)
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    module = LossModule(TokenRegressor(), TokenSquaredError(), optimizer=sgd, nan_policy="skip")
    module.lr = 0.1  # the attribute the finder tunes
    record = Record()
    trainer = quiet_trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        callbacks=[LearningRateFinder(num_training_steps=3), record],
    )
    trainer.fit(module, DataLoader(shards, batch_size=None))
    steps = record.epoch_steps
    assert len(steps) == 6
    expected = sum(loss * toks for loss, toks in steps) / sum(toks for _, toks in steps)
    assert float(trainer.callback_metrics["train/loss_epoch"]) == pytest.approx(expected, rel=1e-6)
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 0.0
