import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_losses.losses.combined as combined_module
from lightning_losses import LossModule
from lightning_losses.binding import Binding
from lightning_losses.cli import build_cli
from lightning_losses.functional.multi_task import effective_task_weights, multi_task_loss
from lightning_losses.losses.multi_task import MultiTaskLoss
from lightning_losses.registry import build_loss
from tests.helpers import (
    DestroyProcessGroup,
    RankShardData,
    RecordGradients,
    TokenRegressor,
    concat_shards,
    quiet_trainer,
)
from tests.loss_tester import LossTester

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_multitask.yaml"
TASK_WEIGHTS = [1.0, 0.5, 2.0, 0.25]
REGRESSION = [False, True, False, True]


class Echo(nn.Module):
    """A task 'loss' that returns its input: fixes L_i."""

    def forward(self, value: Tensor) -> Tensor:
        return value


class MaskedEcho(nn.Module):
    """Returns ``value``; takes a ``mask`` so that MultiTaskLoss reads the task's presence from it."""

    def forward(self, value: Tensor, mask: Tensor | None = None) -> Tensor:
        return value


def kendall_reference(
    task_losses, log_variances, present, uncertainty=True, task_weights=None, regression=None
):
    """Kendall et al. written with σ² = exp(s): L/σ² + log σ², or L/(2σ²) + log σ for regression."""
    total = 0.0
    for i, loss in enumerate(task_losses.tolist()):
        if not present[i]:
            continue
        weight = 1.0 if task_weights is None else task_weights[i]
        if not uncertainty:
            total += weight * loss
            continue
        variance = math.exp(log_variances[i].item())
        if regression is not None and regression[i]:
            term = loss / (2 * variance) + math.log(math.sqrt(variance))
        else:
            term = loss / variance + math.log(variance)
        total += weight * term
    return torch.tensor(total, dtype=torch.float64)


class TestMultiTaskLoss(LossTester):
    functional = staticmethod(multi_task_loss)
    module_class = MultiTaskLoss
    option_sets = [
        {},
        {"task_weights": TASK_WEIGHTS, "regression": REGRESSION},
    ]
    grad_inputs = ("task_losses", "log_variances")
    mask_input = "present"
    config = "digits_multitask.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        task_losses = (2 * torch.rand(4, generator=g) + 0.1).to(dtype)
        task_losses[2] = float("nan")  # an absent task: the mean of no sample
        return {
            "task_losses": task_losses,
            "log_variances": torch.randn(4, generator=g).to(dtype),
            "present": torch.tensor([True, True, False, True]),
        }

    def functional_options(self, options):
        converted = dict(options)
        if "task_weights" in options:
            converted["task_weights"] = torch.tensor(options["task_weights"])
        if "regression" in options:
            converted["regression"] = torch.tensor(options["regression"])
        return converted

    def reference(self, task_losses, log_variances, present, **options):
        return kendall_reference(task_losses, log_variances, present, **options)

    def build_module(self, options):
        names = [f"task{i}" for i in range(4)]
        regression = options.get("regression") or [False] * 4
        return MultiTaskLoss(
            {name: MaskedEcho() for name in names},
            task_weights=options.get("task_weights"),
            uncertainty_weighting=True,
            regression_tasks=[n for n, r in zip(names, regression, strict=True) if r],
            input_maps={name: {"value": f"loss_{name}", "mask": f"mask_{name}"} for name in names},
        )

    def module_inputs(self, module, inputs):
        """Fixed task losses, each task's presence read from its mask; the learned log-variances set."""
        with torch.no_grad():
            module.log_variances.copy_(inputs["log_variances"])
        per_task = {}
        for i in range(4):
            per_task[f"loss_task{i}"] = inputs["task_losses"][i]
            per_task[f"mask_task{i}"] = inputs["present"][i : i + 1]
        return per_task

    def test_absent_task_metric_is_zero(self):
        for index, options in enumerate(self.option_sets):
            module = self.build_module(options)
            output = module(**self.module_inputs(module, self.make_inputs(torch.float32, seed=index)))
            assert torch.isfinite(output.loss)
            assert output.metrics["task2_loss"] == 0  # absent: 0, not NaN (its loss input is NaN)


def test_static_weights_match_the_reference_and_skip_absent_tasks():
    inputs = TestMultiTaskLoss().make_inputs(torch.float64, seed=3)
    weights = torch.tensor(TASK_WEIGHTS, dtype=torch.float64)
    losses = inputs["task_losses"].requires_grad_()
    loss = multi_task_loss(losses, None, present=inputs["present"], task_weights=weights)
    expected = kendall_reference(
        losses.detach(), None, inputs["present"], uncertainty=False, task_weights=TASK_WEIGHTS
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(losses.grad, weights * inputs["present"])


@pytest.mark.parametrize("uncertainty", [False, True])
def test_effective_task_weights_are_the_factor_of_each_task_loss(uncertainty):
    """The logged weights are dL/dL_i of multi_task_loss (one computes with the other), 0 for absent tasks."""
    inputs = TestMultiTaskLoss().make_inputs(torch.float64, seed=5)
    weights, regression = torch.tensor(TASK_WEIGHTS, dtype=torch.float64), torch.tensor(REGRESSION)
    s = inputs["log_variances"] if uncertainty else None
    losses = inputs["task_losses"].requires_grad_()
    multi_task_loss(losses, s, inputs["present"], task_weights=weights, regression=regression).backward()
    expected = effective_task_weights(s, weights, regression) * inputs["present"]
    torch.testing.assert_close(losses.grad, expected)


def echo_tasks(losses, **kwargs):
    names = [f"t{i}" for i in range(len(losses))]
    module = MultiTaskLoss(
        {name: Echo() for name in names},
        input_maps={name: {"value": name} for name in names},
        **kwargs,
    )
    return module, dict(zip(names, losses, strict=True))


@pytest.mark.parametrize("regression", [False, True])
def test_learned_variances_converge_to_the_task_losses(regression):
    """For fixed L_i the optimum of w(e^{-s}L + s) (or its ½ form) is e^{s} = L_i."""
    losses = torch.tensor([0.05, 1.0, 7.0])
    module, inputs = echo_tasks(
        losses, uncertainty_weighting=True, regression_tasks=["t1", "t2"] if regression else ()
    )
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        module(**inputs).loss.backward()
        optimizer.step()
    torch.testing.assert_close(module.log_variances.detach().exp(), losses, rtol=1e-3, atol=0)
    metrics = module(**inputs).metrics
    torch.testing.assert_close(metrics["t2_sigma"], losses[2].sqrt(), rtol=1e-3, atol=0)
    factor = 0.5 if regression else 1.0
    torch.testing.assert_close(metrics["t2_weight"], factor / losses[2], rtol=1e-3, atol=0)


def test_metrics_and_static_weights():
    module, inputs = echo_tasks(torch.tensor([2.0, 3.0]), task_weights={"t1": 0.5})
    assert module.log_variances is None
    loss, metrics = module(**inputs)
    assert loss.item() == 2.0 + 0.5 * 3.0
    assert {k: v.item() for k, v in metrics.items()} == {
        "t0_loss": 2.0,
        "t1_loss": 3.0,
        "t0_weight": 1.0,
        "t1_weight": 0.5,
        "loss": 3.5,
        "total_loss": 3.5,
    }
    torch.testing.assert_close(
        effective_task_weights(torch.tensor([0.0, math.log(4.0)]), regression=torch.tensor([False, True])),
        torch.tensor([1.0, 0.125]),
    )


def test_guide_schema_with_task_indices_as_weight_keys():
    module = build_loss(
        {
            "name": "multi_task",
            "params": {
                "tasks": ["cross_entropy", "mse"],
                "task_weights": {0: 1.0, 1: 0.5},
                "uncertainty_weighting": True,
                "input_maps": {"mse": {"preds": "values", "target": "value_target"}},
            },
        }
    )
    assert module.task_names == ["cross_entropy", "mse"]
    assert module.task_weights.tolist() == [1.0, 0.5]
    assert isinstance(module.log_variances, nn.Parameter)


def test_log_variances_round_trip_through_state_dict():
    module, _ = echo_tasks(torch.ones(3), uncertainty_weighting=True)
    module.log_variances.data = torch.tensor([0.5, -1.0, 2.0])
    state = module.state_dict()
    assert set(state) == {"log_variances"}  # task weights are configuration, not state
    restored, _ = echo_tasks(torch.ones(3), uncertainty_weighting=True)
    restored.load_state_dict(state)
    assert torch.equal(restored.log_variances, module.log_variances)


# -- per-sample task ids --------------------------------------------------------------------------------


def task_id_batch(seed=0, task_ids=(0, 1, 2, 0, 2, 1, 0, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(task_ids)
    size = len(ids)
    return {
        "logits": torch.randn(size, 3, generator=g, dtype=torch.float64, requires_grad=True),
        "target": torch.randint(0, 3, (size,), generator=g),
        "preds": torch.randn(size, generator=g, dtype=torch.float64, requires_grad=True),
        "value": torch.randn(size, generator=g, dtype=torch.float64),
        "task_ids": ids,
    }


def task_id_loss(**kwargs):
    """Task 0: cross_entropy (takes a mask); 1: mse (takes a mask); 2: torch.nn.MSELoss (no mask: rows)."""
    kwargs.setdefault("select_task_rows", True)
    return MultiTaskLoss(
        {
            "digit": "cross_entropy",
            "ink": "mse",
            "plain": {"class_path": "torch.nn.MSELoss", "input_map": {"input": "preds", "target": "value"}},
        },
        task_weights=[1.0, 0.5, 2.0],
        uncertainty_weighting=True,
        regression_tasks=["ink"],
        input_maps={"ink": {"target": "value"}},
        **kwargs,
    )


def task_id_reference(batch, log_variances):
    """Each task's torch loss on its own rows, then Kendall's weighting, all written out."""
    ids = batch["task_ids"]
    terms = []
    for task, weight, half in ((0, 1.0, False), (1, 0.5, True), (2, 2.0, False)):
        rows = (ids == task).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if task == 0:
            loss = F.cross_entropy(batch["logits"][rows], batch["target"][rows])
        else:
            loss = F.mse_loss(batch["preds"][rows], batch["value"][rows])
        s = log_variances[task]
        scale = 0.5 if half else 1.0
        terms.append(weight * scale * (torch.exp(-s) * loss + s))
    return torch.stack(terms).sum()


@pytest.mark.parametrize("task_ids", [(0, 1, 2, 0, 2, 1, 0, 2, 2), (0, 0, 2, 2, 0), (1, 1, 1)])
def test_task_ids_route_each_sample_to_its_task(task_ids):
    loss_fn = task_id_loss().double()
    loss_fn.log_variances.data = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)
    batch = task_id_batch(task_ids=task_ids)
    loss, metrics = loss_fn(**batch)
    s = loss_fn.log_variances.detach().clone().requires_grad_()
    expected = task_id_reference(batch, s)
    torch.testing.assert_close(loss, expected)

    grads = torch.autograd.grad(loss, [batch["logits"], batch["preds"], loss_fn.log_variances])
    expected_grads = torch.autograd.grad(expected, [batch["logits"], batch["preds"], s], allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)
    for task, name in enumerate(("digit", "ink", "plain")):
        if task not in task_ids:  # absent: 0, not NaN, and no pull on its sigma
            assert metrics[f"{name}_loss"] == 0 and grads[2][task] == 0


def test_task_ids_mode_combines_with_a_user_mask():
    loss_fn = task_id_loss()
    batch = {k: v.detach().float() if v.is_floating_point() else v for k, v in task_id_batch().items()}
    # the mask also hides samples: digit (rows 0, 3, 6) keeps 0 and 6, ink (rows 1, 5) keeps 5
    keep = torch.tensor([1, 0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    _, metrics = loss_fn(**batch, mask=keep)
    rows = torch.tensor([0, 6])
    torch.testing.assert_close(
        metrics["digit_loss"], F.cross_entropy(batch["logits"][rows], batch["target"][rows])
    )
    torch.testing.assert_close(metrics["ink_loss"], (batch["preds"][5] - batch["value"][5]) ** 2)


def test_task_ids_refuse_a_task_loss_without_mask_unless_rows_are_selected():
    """Selecting rows is a host sync per step on an accelerator: only on request (`select_task_rows`)."""
    batch = {k: v.detach().float() if v.is_floating_point() else v for k, v in task_id_batch().items()}
    with pytest.raises(
        ValueError, match=r"task loss\(es\) 'plain' \(MSELoss\) take no `mask`.*select_task_rows"
    ):
        task_id_loss(select_task_rows=False)(**batch)
    task_id_loss(select_task_rows=True)(**batch)
    without_ids = {k: v for k, v in batch.items() if k != "task_ids"}
    task_id_loss(select_task_rows=False)(**without_ids)  # per-task inputs: no rows to select


def test_task_ids_give_token_level_and_multi_output_tasks_a_mask_of_their_target_shape():
    """Without a `mask` input, a task's samples become a mask of its target's shape ([B, T], [B, D])."""
    g = torch.Generator().manual_seed(7)
    batch_size, steps, vocab, outputs = 5, 3, 4, 2
    target = torch.randint(0, vocab, (batch_size, steps), generator=g)
    target[1, 2] = target[4, 0] = -100  # ignored tokens
    batch = {
        "logits": torch.randn(batch_size, steps, vocab, generator=g, dtype=torch.float64, requires_grad=True),
        "target": target,
        "preds": torch.randn(batch_size, outputs, generator=g, dtype=torch.float64, requires_grad=True),
        "value": torch.randn(batch_size, outputs, generator=g, dtype=torch.float64),
        "task_ids": torch.tensor([0, 1, 0, 1, 0]),
    }
    loss_fn = MultiTaskLoss(
        {"tokens": "cross_entropy", "vector": "mse"},
        uncertainty_weighting=True,
        input_maps={"vector": {"target": "value"}},
    ).double()
    loss_fn.log_variances.data = torch.tensor([0.2, -0.4], dtype=torch.float64)
    loss, metrics = loss_fn(**batch)

    s = loss_fn.log_variances.detach().clone().requires_grad_()
    rows = [torch.tensor([0, 2, 4]), torch.tensor([1, 3])]
    token_loss = F.cross_entropy(batch["logits"][rows[0]].reshape(-1, vocab), target[rows[0]].reshape(-1))
    vector_loss = F.mse_loss(batch["preds"][rows[1]], batch["value"][rows[1]])
    expected = sum(torch.exp(-s[i]) * task + s[i] for i, task in enumerate((token_loss, vector_loss)))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["tokens_loss"], token_loss.detach())
    torch.testing.assert_close(metrics["vector_loss"], vector_loss.detach())
    grads = torch.autograd.grad(loss, [batch["logits"], batch["preds"], loss_fn.log_variances])
    expected_grads = torch.autograd.grad(expected, [batch["logits"], batch["preds"], s])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="the `target` of task 'tokens' must have the batch size 5"):
        loss_fn(**batch | {"target": target[:2]})


def test_no_valid_sample_in_any_task_gives_exactly_zero():
    loss_fn = MultiTaskLoss({"digit": "cross_entropy", "ink": "mse"}, uncertainty_weighting=True)
    logits, preds = torch.randn(5, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1])
    loss, metrics = loss_fn(
        logits=logits,
        preds=preds,
        target=target,
        task_ids=torch.zeros(5, dtype=torch.long),
        mask=torch.zeros(5),
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics["digit_loss"] == 0 and metrics["ink_loss"] == 0
    for tensor in (logits, preds, loss_fn.log_variances):
        assert torch.count_nonzero(tensor.grad) == 0


def test_ddp_shares_add_up_to_the_full_batch_loss(monkeypatch):
    """With global counts each rank returns its share (LossModule multiplies by the world size before
    DDP averages): the shares of two ranks add up to the one-process loss, s-terms counted once."""
    loss_fn = MultiTaskLoss(
        {"digit": "cross_entropy", "reg": {"class_path": "torch.nn.MSELoss"}},
        uncertainty_weighting=True,
        input_maps={"reg": {"input": "preds", "target": "value"}},
    ).double()
    loss_fn.log_variances.data = torch.tensor([0.4, -0.3], dtype=torch.float64)
    batch = task_id_batch()
    monkeypatch.setattr(combined_module, "_world_size", lambda: 2)
    count = torch.tensor(8)
    shares = [
        loss_fn(
            logits=batch["logits"][rows],
            target=batch["target"][rows],
            mask=torch.ones(4, dtype=torch.bool),
            global_valid_toks=count,
            preds=batch["preds"][rows],
            value=batch["value"][rows],
        )
        for rows in (slice(0, 4), slice(4, 8))
    ]
    full = loss_fn.forward(
        logits=batch["logits"][:8],
        target=batch["target"][:8],
        preds=batch["preds"][:8],
        value=batch["value"][:8],
    )
    torch.testing.assert_close(shares[0].loss + shares[1].loss, full.loss)
    assert "digit_loss" in loss_fn.partial_metrics and "reg_loss" not in loss_fn.partial_metrics


def token_rank_shards(seed=0):
    """One global batch of two ranks: rank 0 holds 3 valid tokens, rank 1 none (all masked)."""
    g = torch.Generator().manual_seed(seed)
    shards = []
    for valid in (torch.tensor([[1, 1, 0], [0, 1, 0]]), torch.zeros(2, 3, dtype=torch.long)):
        shards.append(
            {
                "logits": torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True),
                "target": torch.randint(0, 4, (2, 3), generator=g),
                "preds": torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True),
                "value": torch.randn(2, 3, generator=g, dtype=torch.float64),
                "mask": valid.bool(),
            }
        )
    return shards


def test_ddp_rank_without_valid_tokens_keeps_the_one_process_gradient_of_log_variances(monkeypatch):
    """Under DDP a counted task's presence is global: a rank with no valid token of it still adds its
    share s/R of the regulariser, so DDP's average of R × share is the one-process gradient. (Deciding
    presence per rank dropped that share: the s term weighed n_present/R and the optimum moved to
    e^s = L·R/n_present.)"""
    loss_fn = MultiTaskLoss(
        {"tokens": "cross_entropy", "regress": "mse"},
        uncertainty_weighting=True,
        regression_tasks=["regress"],
        input_maps={"regress": {"target": "value"}},
    ).double()
    loss_fn.log_variances.data = torch.tensor([0.4, -0.3], dtype=torch.float64)
    shards = token_rank_shards()
    full_inputs = {k: torch.cat([shard[k] for shard in shards]) for k in shards[0]}

    # the one-process loss, by hand: Kendall's terms on the masked means of the global batch
    s = loss_fn.log_variances.detach().clone().requires_grad_()
    keep = full_inputs["mask"]
    ce = F.cross_entropy(full_inputs["logits"][keep], full_inputs["target"][keep])
    mse = F.mse_loss(full_inputs["preds"][keep], full_inputs["value"][keep])
    expected = torch.exp(-s[0]) * ce + s[0] + 0.5 * (torch.exp(-s[1]) * mse + s[1])
    full = loss_fn(**full_inputs).loss
    torch.testing.assert_close(full, expected)
    want = torch.autograd.grad(expected, [s, full_inputs["logits"], full_inputs["preds"]])

    monkeypatch.setattr(combined_module, "_world_size", lambda: 2)
    count = keep.sum()  # 3, all on rank 0
    shares = [loss_fn(**shard, global_valid_toks=count).loss for shard in shards]
    torch.testing.assert_close(shares[0] + shares[1], full)
    # LossModule backpropagates R × share and DDP averages over R ranks: the gradient is the sum of shares
    grads = [
        torch.autograd.grad(share, [loss_fn.log_variances, shard["logits"], shard["preds"]])
        for share, shard in zip(shares, shards, strict=True)
    ]
    torch.testing.assert_close(grads[0][0] + grads[1][0], want[0])
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]]), want[1])
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]]), want[2])


def two_regression_tasks():
    return MultiTaskLoss(
        {"first": "mse", "second": "mse"},
        uncertainty_weighting=True,
        regression_tasks=["second"],
        input_maps={"first": {"mask": "token_mask"}, "second": {"mask": "token_mask", "target": "target2"}},
    )


def fit_two_tasks(directory, per_rank, devices):
    directory.mkdir()
    torch.manual_seed(0)
    loss_fn = two_regression_tasks()
    loss_fn.log_variances.data = torch.tensor([0.4, -0.3])
    module = LossModule(TokenRegressor(), loss_fn, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true",
        max_epochs=1,
        use_distributed_sampler=False,
        callbacks=[RecordGradients(directory), DestroyProcessGroup()],
    )
    trainer.fit(module, datamodule=RankShardData(per_rank))


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_processes_with_a_rank_without_valid_tokens_equal_one_process(tmp_path):
    """Real 2-process gloo DDP through LossModule: rank 1 has no valid token in either step; the
    gradients (model and log-variances) equal one process's on the global batch."""
    g = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(2):
        shards = []
        for valid in (torch.tensor([[1, 1, 0], [0, 1, 0]]), torch.zeros(2, 3, dtype=torch.long)):
            shards.append(
                {
                    "features": torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
                    "target": torch.randn(2, 3, generator=g, dtype=torch.float64),
                    "target2": 3 * torch.randn(2, 3, generator=g, dtype=torch.float64),
                    "token_mask": valid.bool(),
                }
            )
        steps.append(shards)
    fit_two_tasks(tmp_path / "ddp", [[s[0] for s in steps], [s[1] for s in steps]], devices=2)
    fit_two_tasks(tmp_path / "single", [[concat_shards(s) for s in steps]], devices=1)
    for step in range(2):
        reference = torch.load(tmp_path / "single" / f"grads_rank0_step{step}.pt")
        assert "loss.log_variances" in reference
        for rank in range(2):
            grads = torch.load(tmp_path / "ddp" / f"grads_rank{rank}_step{step}.pt")
            assert grads.keys() == reference.keys()
            for name in reference:
                torch.testing.assert_close(grads[name], reference[name], rtol=1e-12, atol=1e-12, msg=name)


# -- inputs and errors ----------------------------------------------------------------------------------


def test_declares_the_union_of_task_inputs_to_loss_module():
    loss_fn = MultiTaskLoss(
        {"digit": "cross_entropy", "center": "mse"},
        input_maps={
            "digit": {"logits": "digit_logits"},
            "center": {"preds": "center_pred", "target": "center"},
        },
    )
    binding = Binding(loss_fn)
    assert binding.names == [
        "digit_logits",
        "target",
        "mask",
        "global_valid_toks",
        "center_pred",
        "center",
        "task_ids",
    ]
    assert binding.required == ["digit_logits", "target", "center_pred", "center"]
    assert loss_fn.token_mask_key == "mask"


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"task_weights": {"nope": 1.0}}, ValueError, r"`task_weights` names 'nope'.*\['a', 'b'\]"),
        ({"task_weights": [1.0]}, ValueError, "one weight per task"),
        ({"task_weights": [1.0, -1.0]}, ValueError, "finite and >= 0"),
        ({"task_weights": {5: 1.0}}, ValueError, "task index 5"),
        (
            {"regression_tasks": ["c"], "uncertainty_weighting": True},
            ValueError,
            r"`regression_tasks` names \['c'\]",
        ),
        ({"regression_tasks": ["a"]}, ValueError, "needs `uncertainty_weighting=True`"),
        ({"input_maps": {"a": {"nope": "x"}}}, ValueError, "the input map of 'a'.*nope"),
        ({"input_maps": {"z": {}}}, ValueError, "`input_maps` names the loss 'z'"),
    ],
)
def test_bad_configuration(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MultiTaskLoss({"a": Echo(), "b": Echo()}, **kwargs)


def test_bad_inputs_name_the_argument():
    loss_fn = task_id_loss()
    batch = {k: v.detach().float() if v.is_floating_point() else v for k, v in task_id_batch().items()}
    with pytest.raises(TypeError, match="`task_ids` must hold integer"):
        loss_fn(**batch | {"task_ids": batch["task_ids"].float()})
    with pytest.raises(ValueError, match=r"`task_ids` must lie in \[0, 3\)"):
        loss_fn(**batch | {"task_ids": batch["task_ids"] + 1})
    with pytest.raises(ValueError, match="`task_ids` must have 1 dimensions"):
        loss_fn(**batch | {"task_ids": batch["task_ids"][None]})
    with pytest.raises(TypeError, match=r"unexpected inputs \['extra'\]"):
        loss_fn(**batch, extra=1)
    with pytest.raises(ValueError, match="the `mask` of task 'digit' must have the batch size 9"):
        loss_fn(**batch, mask=torch.ones(4))
    with pytest.raises(ValueError, match="unknown loss name 'nope'; known losses: .*cross_entropy"):
        MultiTaskLoss({"a": "nope"})


def test_trains_two_heads_with_loss_module_and_restores_sigma_from_a_cli_checkpoint(tmp_path):
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    learned = cli.model.loss.log_variances.detach().clone()
    assert (learned.abs() > 1e-3).all()  # trained away from 0
    optimizer = cli.model.configure_optimizers()
    assert any(p is cli.model.loss.log_variances for group in optimizer.param_groups for p in group["params"])
    assert {"train/digit_sigma", "train/center_sigma", "val/center_loss"} <= set(cli.trainer.callback_metrics)

    (checkpoint,) = tmp_path.rglob("last.ckpt")
    restored = LossModule.load_from_checkpoint(checkpoint)
    assert isinstance(restored.loss, MultiTaskLoss)
    assert torch.equal(restored.loss.log_variances.detach(), learned)
    assert restored.loss.regression_tasks == ["center"]


def test_an_empty_batch_makes_every_task_absent():
    """No sample at all (and no mask to say so): every task is absent, so the log-variances get no
    gradient from a batch with nothing in it (their Kendall term would otherwise pull them down)."""
    loss_fn = MultiTaskLoss(
        {"cls": "cross_entropy", "reg": "mse"},
        uncertainty_weighting=True,
        init_log_variance=0.5,
        input_maps={"reg": {"preds": "reg_pred", "target": "reg_target"}},
    )
    loss, metrics = loss_fn(
        logits=torch.zeros(0, 3), target=torch.zeros(0, dtype=torch.long), reg_pred=torch.zeros(0),
        reg_target=torch.zeros(0),
    )  # fmt: skip
    assert loss.item() == 0.0 and metrics["cls_loss"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, loss_fn.log_variances)
    assert torch.count_nonzero(grad) == 0


def test_a_task_error_names_the_task_and_its_renamed_inputs():
    loss_fn = MultiTaskLoss(
        {"cls": "cross_entropy", "reg": "mse"},
        input_maps={"reg": {"preds": "reg_pred", "target": "reg_target", "mask": "reg_mask"}},
    )
    with pytest.raises(
        ValueError, match=r"the loss 'reg' \(MSELoss\) \(its inputs renamed: .*'mask': 'reg_mask'"
    ):
        loss_fn(
            logits=torch.zeros(4, 3), target=torch.zeros(4, dtype=torch.long), reg_pred=torch.zeros(4),
            reg_target=torch.zeros(4), reg_mask=torch.ones(5),
        )  # fmt: skip
