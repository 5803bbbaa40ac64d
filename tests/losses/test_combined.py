import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_losses.losses.combined as combined_module
from lightning_losses import LossModule
from lightning_losses.binding import Binding
from lightning_losses.losses.combined import CombinedLoss
from lightning_losses.registry import build_loss
from tests.helpers import LearnableScaleLoss, TokenSquaredError
from tests.loss_tester import LossTester

CE_AND_MSE = {
    "loss_functions": ["cross_entropy", "mse"],
    "loss_weights": [0.7, 0.3],
    "input_maps": {"mse": {"preds": "logits", "target": "soft_target"}},
}
SMOOTHED_AND_MSE_BY_NAME = {
    "loss_functions": {
        "smoothed": {"name": "cross_entropy", "params": {"label_smoothing": 0.2}},
        "squared": {"name": "mse", "input_map": {"preds": "logits", "target": "soft_target"}},
    },
    "loss_weights": {"squared": 2.0},
}


def combined(**inputs_and_options):
    """The module called as a function: CombinedLoss has no math of its own beyond the weighted sum."""
    options = {k: inputs_and_options.pop(k, None) for k in ("loss_functions", "loss_weights", "input_maps")}
    return CombinedLoss(**{k: v for k, v in options.items() if v is not None})(**inputs_and_options).loss


def brute_force(logits, target, mask, soft_target, smoothing, weights):
    """Masked means of cross-entropy (with smoothing) and of the squared error, by Python loops."""
    ce_total = se_total = count = 0.0
    for row, t, m, soft in zip(
        logits.tolist(), target.tolist(), mask.tolist(), soft_target.tolist(), strict=True
    ):
        if not m:
            continue
        log_z = math.log(sum(math.exp(x) for x in row))
        log_p = [x - log_z for x in row]
        ce_total += -(1 - smoothing) * log_p[t] - smoothing * sum(log_p) / len(row)
        se_total += sum((x - y) ** 2 for x, y in zip(row, soft, strict=True))
        count += 1
    ce, se = (ce_total / count, se_total / (count * len(logits[0]))) if count else (0.0, 0.0)
    return torch.tensor(weights[0] * ce + weights[1] * se, dtype=torch.float64)


class TestCombined(LossTester):
    functional = staticmethod(combined)
    module_class = CombinedLoss
    option_sets = [CE_AND_MSE, SMOOTHED_AND_MSE_BY_NAME]
    grad_inputs = ("logits",)
    mask_input = "mask"
    config = "digits_combined.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        return {
            "logits": (2 * torch.randn(6, 4, generator=g)).to(dtype),
            "target": torch.randint(0, 4, (6,), generator=g),
            "mask": torch.tensor([True, True, False, True, False, True]),
            "soft_target": torch.softmax(torch.randn(6, 4, generator=g), -1).to(dtype),
        }

    def call_functional(self, inputs, options):
        return combined(**inputs, **options)

    def reference(self, logits, target, mask, soft_target, **options):
        smoothing = 0.2 if "smoothed" in options["loss_functions"] else 0.0
        weights = list(options["loss_weights"]) if isinstance(options["loss_weights"], list) else [1.0, 2.0]
        return brute_force(logits, target, mask, soft_target, smoothing, weights)


def test_metrics_per_component_weighted_and_unweighted():
    loss_fn = CombinedLoss(**CE_AND_MSE)
    inputs = TestCombined().make_inputs(torch.float64, seed=0)
    loss, metrics = loss_fn(**inputs)
    keep = inputs["mask"]
    ce = F.cross_entropy(inputs["logits"][keep], inputs["target"][keep])
    mse = F.mse_loss(inputs["logits"][keep], inputs["soft_target"][keep])
    torch.testing.assert_close(metrics["cross_entropy_loss"], ce)
    torch.testing.assert_close(metrics["cross_entropy_weighted_loss"], 0.7 * ce)
    torch.testing.assert_close(metrics["mse_loss"], mse)
    torch.testing.assert_close(metrics["mse_weighted_loss"], 0.3 * mse)
    torch.testing.assert_close(metrics["total_loss"], 0.7 * ce + 0.3 * mse)
    assert metrics["loss"] is metrics["total_loss"] and torch.equal(loss.detach(), metrics["loss"])
    accuracy = (inputs["logits"][keep].argmax(-1) == inputs["target"][keep]).double().mean()  # as the inputs
    torch.testing.assert_close(metrics["cross_entropy_accuracy"], accuracy)


def test_guide_schema_builds_by_name_and_matches_the_formulas():
    pytest.importorskip("lightning_losses.losses.focal")
    pytest.importorskip("lightning_losses.losses.distillation")
    loss_fn = build_loss(
        {
            "name": "combined",
            "params": {
                "loss_functions": [
                    {"name": "cross_entropy", "params": {"weight": 1.0}},
                    {"name": "focal", "params": {"alpha": 1.0, "gamma": 2.0}},
                    {"name": "kl_divergence", "params": {"temperature": 4.0, "alpha": 0.7}},
                ],
                "loss_weights": [0.6, 0.3, 0.1],
            },
        }
    )
    assert list(loss_fn.components) == ["cross_entropy", "focal", "kl_divergence"]
    g = torch.Generator().manual_seed(0)
    logits, teacher = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, dtype=torch.float64),
    )
    target = torch.tensor([0, 1, 2, 3, 0])
    loss, metrics = loss_fn(logits=logits, target=target, teacher_logits=teacher)

    ce = F.cross_entropy(logits, target)
    p_t = torch.softmax(logits, -1)[torch.arange(5), target]
    focal = (-((1 - p_t) ** 2) * p_t.log()).mean()
    t = 4.0
    kl = F.kl_div(
        F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean"
    )
    distillation = 0.7 * ce + 0.3 * t**2 * kl
    torch.testing.assert_close(loss, 0.6 * ce + 0.3 * focal + 0.1 * distillation)
    torch.testing.assert_close(metrics["kl_divergence_weighted_loss"], 0.1 * distillation)
    assert "focal_p_t" in metrics and "kl_divergence_kl_loss" in metrics


def test_components_by_name_class_path_and_module():
    scale = LearnableScaleLoss(init_log_variance=0.5)
    loss_fn = CombinedLoss(
        [
            "mse",
            {"class_path": "torch.nn.MSELoss", "init_args": {"reduction": "sum"}},
            {"class_path": "lightning_losses.losses.regression.MSELoss"},
            scale,
            nn.L1Loss(),
        ],
        input_maps={
            "mse_2": {"input": "preds"},
            "l1": {"input": "preds"},
            "learnable_scale": {"logits": "preds"},
        },
    )
    assert list(loss_fn.components) == ["mse", "mse_2", "mse_3", "learnable_scale", "l1"]
    # a component's parameters are the composite's: they train, move and checkpoint with it
    assert loss_fn.components["learnable_scale"] is scale
    assert "components.learnable_scale.log_variance" in loss_fn.state_dict()
    assert any(p is scale.log_variance for p in loss_fn.parameters())
    preds, target = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    loss, metrics = loss_fn(preds=preds, target=target)
    mse = F.mse_loss(preds, target)
    expected_scale = 0.5 * math.exp(-0.5) * mse + 0.5 * 0.5
    expected = (
        2 * mse + F.mse_loss(preds, target, reduction="sum") + expected_scale + F.l1_loss(preds, target)
    )
    torch.testing.assert_close(loss, expected)
    assert metrics["learnable_scale_log_variance"] == 0.5  # a bare tensor or a (loss, metrics) pair
    assert sorted(k for k in metrics if k.startswith("mse_2")) == ["mse_2_loss", "mse_2_weighted_loss"]


def test_forward_signature_is_the_union_required_if_any_requires():
    class NeedsData(nn.Module):
        def forward(
            self, logits: Tensor, data: dict, model: nn.Module, extra: Tensor | None = None
        ) -> Tensor:
            return logits.sum() * 0 + data["target"].float().mean() + model.weight.sum() * 0

    loss_fn = CombinedLoss(
        {"ce": "cross_entropy", "custom": NeedsData()}, input_maps={"custom": {"extra": "target"}}
    )
    binding = Binding(loss_fn)
    assert binding.names == ["logits", "target", "mask", "global_valid_toks", "data", "model"]
    assert binding.required == ["logits", "target", "data", "model"]  # target: required by ce only

    module = LossModule(nn.Linear(3, 4), loss_fn)
    batch = {"inputs": torch.randn(5, 3), "target": torch.tensor([0, 1, 2, 3, 0])}
    loss, metrics, outputs, *_ = module._step(batch)
    ce = F.cross_entropy(outputs["logits"], batch["target"])
    torch.testing.assert_close(metrics["ce_loss"], ce)
    torch.testing.assert_close(
        metrics["custom_loss"], batch["target"].float().mean()
    )  # `data` passed through
    torch.testing.assert_close(loss, ce + batch["target"].float().mean())


def test_global_counts_go_to_components_counting_the_same_mask():
    loss_fn = CombinedLoss(
        {"ce": "cross_entropy", "same": "mse", "other": "mse"},
        input_maps={"same": {"preds": "values"}, "other": {"preds": "values", "mask": "value_mask"}},
    )
    assert loss_fn.token_mask_key == "mask"
    assert loss_fn.count_receivers["global_valid_toks"] == {"ce", "same"}
    assert loss_fn.partial_metrics == (
        "total_loss",
        "ce_loss",
        "ce_weighted_loss",
        "same_loss",
        "same_weighted_loss",
    )
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    values = torch.randn(4)
    mask, value_mask = torch.tensor([1, 1, 0, 1]), torch.tensor([1, 0, 1, 1])
    _, metrics = loss_fn(
        logits=logits,
        target=target,
        mask=mask,
        values=values,
        value_mask=value_mask,
        global_valid_toks=torch.tensor(10),
    )
    keep = mask.bool()
    torch.testing.assert_close(
        metrics["ce_loss"], F.cross_entropy(logits[keep], target[keep], reduction="sum") / 10
    )
    squared = (values - target.float()) ** 2
    torch.testing.assert_close(metrics["same_loss"], squared[keep].sum() / 10)
    torch.testing.assert_close(metrics["other_loss"], squared[value_mask.bool()].mean())  # local mean


def test_ddp_shares_add_up_to_the_full_batch_loss(monkeypatch):
    loss_fn = CombinedLoss(
        {"ce": "cross_entropy", "plain": {"class_path": "torch.nn.MSELoss"}},
        loss_weights=[0.4, 0.6],
        input_maps={"plain": {"input": "values", "target": "value_target"}},
    )
    logits, target = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    values, value_target = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    full = loss_fn(logits=logits, target=target, mask=mask, values=values, value_target=value_target).loss
    monkeypatch.setattr(combined_module, "_world_size", lambda: 2)
    shares = [
        loss_fn(
            logits=logits[rows],
            target=target[rows],
            mask=mask[rows],
            values=values[rows],
            value_target=value_target[rows],
            global_valid_toks=mask.sum(),
        ).loss
        for rows in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(shares[0] + shares[1], full)


def test_loss_module_passes_global_counts_when_the_batch_has_the_mask():
    loss_fn = CombinedLoss(
        {"plain": "cross_entropy", "smoothed": {"name": "cross_entropy", "params": {"label_smoothing": 0.1}}},
        loss_weights=[0.7, 0.3],
    )
    module = LossModule(nn.Linear(3, 4), loss_fn)
    batch = {
        "inputs": torch.randn(6, 3),
        "target": torch.tensor([0, 1, 2, 3, 0, 1]),
        "mask": torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool),
    }
    assert module._loss_inputs(batch, module(batch))[2]  # globally normalized: given global_valid_toks
    loss, _, outputs, *_ = module._step(batch)
    logits, target = outputs["logits"][batch["mask"]], batch["target"][batch["mask"]]
    expected = 0.7 * F.cross_entropy(logits, target) + 0.3 * F.cross_entropy(
        logits, target, label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"loss_functions": ["nope"]},
            ValueError,
            "unknown loss name 'nope'; known losses: .*cross_entropy.*mse",
        ),
        (
            {"loss_functions": ["mse"], "loss_weights": [0.5, 0.5]},
            ValueError,
            r"one weight per loss \(1: \['mse'\]\)",
        ),
        (
            {"loss_functions": ["mse"], "loss_weights": {"ce": 1.0}},
            ValueError,
            r"`loss_weights` names \['ce'\]",
        ),
        ({"loss_functions": []}, ValueError, "at least one loss"),
        ({"loss_functions": {"name": "mse"}}, ValueError, "a single spec.*wrap it in a list"),
        ({"loss_functions": {"a.b": "mse"}}, ValueError, "without '.'"),
        ({"loss_functions": {"to": "mse"}}, ValueError, "'to' cannot name a loss"),
        (
            {"loss_functions": ["mse"], "input_maps": {"mse": {"pred": "x"}}},
            ValueError,
            "input map of 'mse'.*pred",
        ),
        (
            {"loss_functions": [{"name": "mse", "input_map": {"preds": "x"}}], "input_maps": {"mse": {}}},
            ValueError,
            "given twice",
        ),
    ],
)
def test_bad_configuration(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        CombinedLoss(**kwargs)


def test_a_required_count_from_another_mask_is_refused():
    with pytest.raises(
        ValueError, match="requires `global_valid_toks` counted from the batch key 'token_mask'"
    ):
        CombinedLoss({"ce": "cross_entropy", "tokens": TokenSquaredError()})


def test_bad_inputs_name_them():
    loss_fn = CombinedLoss(**CE_AND_MSE)
    with pytest.raises(TypeError, match=r"missing required inputs \['soft_target'\]"):
        loss_fn(logits=torch.randn(2, 4), target=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"unexpected inputs \['typo'\]"):
        loss_fn(logits=torch.randn(2, 4), target=torch.tensor([0, 1]), soft_target=torch.ones(2, 4), typo=1)
    with pytest.raises(ValueError, match="`preds` and `target` must have the same shape"):
        loss_fn(logits=torch.randn(2, 4), target=torch.tensor([0, 1]), soft_target=torch.ones(2, 3))
    unreduced = CombinedLoss([{"class_path": "torch.nn.MSELoss", "init_args": {"reduction": "none"}}])
    with pytest.raises(ValueError, match=r"the loss 'mse' \(MSELoss\) returned a loss of shape \(2,\)"):
        unreduced(input=torch.ones(2), target=torch.zeros(2))


def test_loss_module_counts_what_the_components_average_over():
    """ignore_index targets under a set mask: the shared count is the components' own denominator."""
    logits = torch.randn(2, 3, 4)
    target = torch.tensor([[0, -100, 2], [1, 3, -100]])
    batch = {"inputs": torch.zeros(2), "target": target, "mask": torch.ones(2, 3, dtype=torch.bool)}
    module = LossModule(torch.nn.Identity(), CombinedLoss(["cross_entropy", "focal"]))
    _, kwargs, count = module._loss_inputs(batch, {"logits": logits})
    assert count.item() == 4
    _, metrics = module.loss(**kwargs)
    keep = target != -100
    torch.testing.assert_close(metrics["cross_entropy_loss"], F.cross_entropy(logits[keep], target[keep]))
