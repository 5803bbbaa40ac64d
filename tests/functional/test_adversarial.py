import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_losses.functional.adversarial import adversarial_loss, attack_mode, pgd_attack
from lightning_losses.losses.adversarial import AdversarialLoss
from lightning_losses.registry import build_loss
from tests.loss_tester import LossTester


def brute_force_attack_and_loss(
    weight, bias, inputs, target, epsilon, alpha, num_steps, step_size=None, clamp_min=0.0, clamp_max=1.0
):
    """PGD on a linear softmax classifier in float64 Python loops, with the closed-form input gradient
    ∂/∂x_n of mean_i CE(W x_i + b, y_i) = Wᵀ(softmax(W x_n + b) − e_{y_n}) / N."""
    W, b = weight.tolist(), bias.tolist()
    X, Y = inputs.tolist(), target.tolist()
    n, classes, features = len(X), len(W), len(W[0])
    eta = (epsilon if num_steps == 1 else 2.5 * epsilon / num_steps) if step_size is None else step_size

    def probs(x):
        z = [sum(W[c][f] * x[f] for f in range(features)) + b[c] for c in range(classes)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    def mean_ce(xs):
        return sum(-math.log(probs(x)[y]) for x, y in zip(xs, Y, strict=True)) / n

    def bounds(value, origin):
        lo, hi = origin - epsilon, origin + epsilon
        if clamp_min is not None:
            lo, hi = max(lo, clamp_min), max(hi, clamp_min)
        if clamp_max is not None:
            lo, hi = min(lo, clamp_max), min(hi, clamp_max)
        return min(max(value, lo), hi)

    adv = [row[:] for row in X]
    for _ in range(num_steps):
        for i in range(n):
            p = probs(adv[i])
            delta = [p[c] - (1.0 if c == Y[i] else 0.0) for c in range(classes)]
            grad = [sum(W[c][f] * delta[c] for c in range(classes)) / n for f in range(features)]
            sign = [(g > 0) - (g < 0) for g in grad]
            adv[i] = [bounds(adv[i][f] + eta * sign[f], X[i][f]) for f in range(features)]
    clean, adversarial = mean_ce(X), mean_ce(adv)
    return torch.tensor(clean + alpha * adversarial, dtype=torch.float64), torch.tensor(
        adv, dtype=torch.float64
    )


def linear_model(dtype, seed, features=5, classes=3):
    torch.manual_seed(100 + seed)
    return nn.Linear(features, classes).to(dtype)


class TestAdversarial(LossTester):
    functional = staticmethod(adversarial_loss)
    module_class = AdversarialLoss
    option_sets = [
        {"epsilon": 0.1, "alpha": 0.5, "num_steps": 1},
        {"epsilon": 0.2, "alpha": 1.0, "num_steps": 5},
        {
            "epsilon": 0.3,
            "alpha": 2.0,
            "num_steps": 4,
            "step_size": 0.05,
            "clamp_min": None,
            "clamp_max": None,
        },
    ]
    config = "digits_adversarial.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        return {
            "model": linear_model(dtype, seed),
            "inputs": torch.rand(6, 5, generator=g).to(dtype),
            "target": torch.randint(0, 3, (6,), generator=g),
        }

    def reference(self, model, inputs, target, **options):
        loss, _ = brute_force_attack_and_loss(
            model.weight.double(), model.bias.double(), inputs, target, **options
        )
        return loss

    def test_gradcheck(self):
        """fp64 gradcheck with respect to the model's parameters: the attack point is piecewise constant
        in them (a sign), so the numerical gradient is that of L_clean + α·L_adv at the fixed x'."""
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(torch.float64, seed=index)
            model = inputs.pop("model")
            names = [name for name, _ in model.named_parameters()]

            def fn(*params, model=model, names=names, inputs=inputs, options=options):
                def call(x):
                    return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))

                return adversarial_loss(call, **inputs, **options).loss

            params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
            assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-5, fast_mode=True), options


def test_fgsm_on_a_linear_model_is_the_closed_form():
    """Two classes, target 0: ∇ₓCE = p₁·(W₁ − W₀), so x' = x + ε·sign(W₁ − W₀) (0 where they agree)."""
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [-1.0, 1.0, 0.0]]))
    x = torch.tensor([[0.5, 0.5, 0.5]])
    adversarial = pgd_attack(lambda z: F.cross_entropy(model(z), torch.tensor([0])), x, epsilon=0.1)
    torch.testing.assert_close(adversarial, torch.tensor([[0.4, 0.6, 0.5]]))
    # and against the autograd-free formula on random data, batch of 16
    torch.manual_seed(0)
    model, x, y = nn.Linear(8, 4).double(), torch.rand(16, 8, dtype=torch.float64), torch.randint(0, 4, (16,))
    p = torch.softmax(model(x), -1).detach()
    closed_form = (x + 0.05 * torch.sign((p - F.one_hot(y, 4)) @ model.weight.detach())).clamp(0, 1)
    attacked = adversarial_loss(model, x, y, epsilon=0.05, num_steps=1).adversarial_inputs
    torch.testing.assert_close(attacked, closed_form)


def test_attack_leaves_parameter_grads_and_inputs_untouched():
    torch.manual_seed(0)
    model, x, y = nn.Linear(5, 3), torch.rand(4, 5), torch.randint(0, 3, (4,))
    before = x.clone()
    terms = adversarial_loss(model, x, y, epsilon=0.1, num_steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad and torch.equal(x, before)
    assert not terms.adversarial_inputs.requires_grad
    # pre-existing gradients (accumulation) are not modified by the attack either
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    adversarial_loss(model, x, y, epsilon=0.1, num_steps=3)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_total_gradient_is_that_of_clean_plus_alpha_adversarial_on_fixed_inputs():
    torch.manual_seed(0)
    model, x, y = (
        nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)),
        torch.rand(6, 5),
        torch.randint(0, 3, (6,)),
    )
    terms = adversarial_loss(model, x, y, epsilon=0.2, alpha=0.7, num_steps=4, random_start=True)
    terms.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fixed = terms.adversarial_inputs.clone()
    (F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(model(fixed), y)).backward()
    for g, expected in zip(got, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(g, expected)


def test_pgd_stays_in_the_ball_and_the_range_and_beats_fgsm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.rand(64, 10), torch.randint(0, 4, (64,))

    def objective(z):
        return F.cross_entropy(model(z), y)

    g = torch.Generator().manual_seed(1)
    pgd = pgd_attack(objective, x, 0.1, num_steps=20, step_size=0.02, random_start=True, generator=g)
    fgsm = pgd_attack(objective, x, 0.1, num_steps=1)
    assert (pgd - x).abs().max() <= 0.1 + 1e-6 and pgd.min() >= 0 and pgd.max() <= 1
    assert objective(pgd) >= objective(fgsm) > objective(x)
    again = pgd_attack(
        objective,
        x,
        0.1,
        num_steps=20,
        step_size=0.02,
        random_start=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(pgd, again)
    # ε = 0 is no attack
    assert torch.equal(pgd_attack(objective, x, 0.0, num_steps=3), x)


def test_attack_runs_under_no_grad_and_inference_mode():
    torch.manual_seed(0)
    model, y = nn.Linear(5, 3), torch.randint(0, 3, (4,))
    with torch.inference_mode():
        x = torch.rand(4, 5)  # an inference tensor, as in a validation loop
        adversarial = pgd_attack(lambda z: F.cross_entropy(model(z), y), x, 0.1, num_steps=2)
    assert (adversarial - x).abs().max() > 0
    with torch.no_grad():
        _, metrics = AdversarialLoss(epsilon=0.1)(model, torch.rand(4, 5), y)
    assert metrics["adversarial_loss"] > metrics["clean_loss"]
    with torch.inference_mode():  # every batch tensor an inference tensor, as in Trainer.test
        x, y, mask = torch.rand(4, 5), torch.randint(0, 3, (4,)), torch.tensor([True, True, False, True])
        _, metrics = AdversarialLoss(epsilon=0.1)(model, x, y, mask=mask, global_valid_toks=torch.tensor(3))
    assert metrics["adversarial_loss"] > metrics["clean_loss"]


class BatchNormDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("eval_mode_attack", [True, False])
def test_batchnorm_and_dropout_during_the_attack(eval_mode_attack):
    """The attack runs in eval mode (no running-stat updates, no dropout); modes are restored after."""
    torch.manual_seed(0)
    model = BatchNormDropoutNet().train()
    model.net[3].eval()  # a mixed state, restored exactly
    x, y = torch.rand(8, 5), torch.randint(0, 3, (8,))
    modes = [m.training for m in model.modules()]
    loss, _ = AdversarialLoss(epsilon=0.1, num_steps=4, eval_mode_attack=eval_mode_attack)(model, x, y)
    assert [m.training for m in model.modules()] == modes
    # the clean and the adversarial forward in training mode; the 4 attack steps only without eval mode
    assert model.net[1].num_batches_tracked.item() == (2 if eval_mode_attack else 6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attack_mode_restores_after_an_error():
    model = BatchNormDropoutNet().train()
    with pytest.raises(RuntimeError), attack_mode(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())


def test_module_builds_any_base_loss_and_reports_metrics():
    torch.manual_seed(0)
    model, x, y = nn.Linear(5, 3), torch.rand(6, 5), torch.randint(0, 3, (6,))
    loss_fn = build_loss({"name": "adversarial", "params": {"base_loss": {"name": "focal"}, "num_steps": 2}})
    assert isinstance(loss_fn, AdversarialLoss) and type(loss_fn.base_loss).__name__ == "FocalLoss"
    loss, metrics = loss_fn(model, x, y)
    assert set(metrics) >= {
        "loss",
        "clean_loss",
        "adversarial_loss",
        "total_loss",
        "adversarial_perturbation",
        "clean_accuracy",
        "adversarial_accuracy",
    }
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["adversarial_perturbation"] <= 0.1 + 1e-6
    # a plain torch loss: no mask / global count is passed through (and none is asked for)
    plain = AdversarialLoss(base_loss=nn.CrossEntropyLoss(), epsilon=0.1, num_steps=1)
    assert "global_valid_toks" not in plain.forward_signature().parameters
    assert "global_valid_toks" in AdversarialLoss().forward_signature().parameters
    torch.testing.assert_close(
        plain(model, x, y).loss, AdversarialLoss(epsilon=0.1, num_steps=1)(model, x, y).loss
    )
    # the clean logits may be passed in (LossModule's outputs) instead of a second clean forward
    logits = model(x)
    torch.testing.assert_close(loss_fn(model, x, y, logits=logits).loss, loss)


def test_accuracies_count_only_valid_rows_of_each_output():
    torch.manual_seed(0)
    model, x = nn.Linear(5, 3), torch.rand(12, 5)
    y = torch.randint(0, 3, (12,))
    y[2] = -100  # ignored target
    mask = torch.ones(12)
    mask[[4, 7]] = 0.0
    _, metrics = AdversarialLoss(epsilon=1.0, num_steps=2)(model, x, y, mask=mask)
    adversarial = pgd_attack(
        lambda z: F.cross_entropy(model(z), y, reduction="none")[mask > 0].mean(), x, 1.0, 2
    )
    counted = [i for i in range(12) if y[i] >= 0 and mask[i] != 0]
    for key, inputs in (("clean_accuracy", x), ("adversarial_accuracy", adversarial)):
        predictions = model(inputs).argmax(-1).tolist()
        expected = sum(predictions[i] == y[i] for i in counted) / len(counted)
        assert metrics[key].item() == pytest.approx(expected)
    assert metrics["adversarial_accuracy"] < metrics["clean_accuracy"]


def test_global_count_makes_micro_batches_add_up():
    torch.manual_seed(0)
    model, x, y = nn.Linear(5, 3).double(), torch.rand(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    y[2] = -100  # ignored target
    loss_fn = AdversarialLoss(epsilon=0.1, num_steps=3)
    full = loss_fn(model, x, y).loss
    count = torch.tensor(8)
    parts = sum(loss_fn(model, x[s], y[s], global_valid_toks=count).loss for s in (slice(0, 4), slice(4, 9)))
    torch.testing.assert_close(parts, full)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"epsilon": -0.1}, "`epsilon` must be non-negative"),
        ({"num_steps": 0}, "`num_steps` must be an integer >= 1"),
        ({"step_size": 0.0}, "`step_size` must be positive"),
        ({"clamp_min": 1.0, "clamp_max": 0.0}, "`clamp_min` must be below `clamp_max`"),
        ({"alpha": -1.0}, "`alpha` must be non-negative"),
    ],
)
def test_bad_options_name_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AdversarialLoss(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        adversarial_loss(nn.Linear(2, 2), torch.rand(3, 2), torch.zeros(3, dtype=torch.long), **kwargs)


def test_bad_inputs_name_the_argument():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"`target` must be a tensor with the batch size.*\(4,\).*\(3, 2\)"):
        adversarial_loss(model, torch.rand(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="`inputs` must be a floating"):
        adversarial_loss(model, torch.ones(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`objective` must return a scalar"):
        pgd_attack(lambda z: z, torch.rand(3, 2), 0.1)


def digits_module(loss, **kwargs):
    from lightning_losses import LossModule
    from lightning_losses.examples import MLP

    torch.manual_seed(0)
    return LossModule(MLP(64, 10, hidden=(32,)), loss, **kwargs)


def digits_batches(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    return [
        {"inputs": torch.rand(size, 64, generator=g), "target": torch.randint(0, 10, (size,), generator=g)}
        for _ in range(n)
    ]


def test_loss_module_passes_model_inputs_logits_and_count_and_trains_under_bf16_mixed():
    from tests.helpers import quiet_trainer

    module = digits_module(AdversarialLoss(epsilon=0.1, num_steps=3))
    batch = digits_batches(1)[0]
    _, kwargs, count = module._loss_inputs(batch, module(batch))
    assert kwargs["model"] is module.model and set(kwargs) == {
        "model",
        "inputs",
        "target",
        "logits",
        "global_valid_toks",
    }
    assert count.item() == 32
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = quiet_trainer(max_epochs=1, precision="bf16-mixed")
    trainer.fit(module, torch.utils.data.DataLoader(digits_batches(), batch_size=None))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"]) and metrics["train/adversarial_loss_epoch"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True))


def test_evaluation_callback_matches_clean_accuracy_at_zero_epsilon_and_drops_under_attack():
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_losses.callbacks.adversarial import AdversarialEvaluation
    from lightning_losses.examples.digits import DictDataset
    from tests.helpers import quiet_trainer

    data = digits_batches()
    dataset = DictDataset(**{k: torch.cat([b[k] for b in data]) for k in data[0]})
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)  # collated in the loop: inference tensors
    module = digits_module(
        torch.nn.CrossEntropyLoss(),
        input_map={"input": "logits"},
        metrics={"accuracy": MulticlassAccuracy(10, average="micro")},
    )
    callbacks = [
        AdversarialEvaluation(epsilon=0.0, num_steps=1, name="zero"),
        AdversarialEvaluation(epsilon=0.3, num_steps=10, random_start=True),
    ]
    trainer = quiet_trainer(max_epochs=3, callbacks=callbacks)
    trainer.fit(module, loader, loader)
    assert {"val/pgd_accuracy", "val/zero_accuracy"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(module, loader, verbose=False)
    assert results["test/zero_accuracy"] == pytest.approx(results["test/accuracy"], abs=1e-6)
    assert results["test/pgd_accuracy"] < results["test/accuracy"]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_gradients_equal_one_process_on_the_global_batch(tmp_path):
    """2-process ddp_spawn: the attack's extra forward/backward passes run on the plain model inside
    DDP's forward; the reduced gradients equal a single process's on the concatenated batch."""
    from lightning_losses import LossModule
    from tests.helpers import DestroyProcessGroup, RankShardData, RecordGradients, quiet_trainer

    g = torch.Generator().manual_seed(0)
    shards = [
        {
            "inputs": torch.rand(n, 6, generator=g, dtype=torch.float64),
            "target": torch.randint(0, 3, (n,), generator=g),
        }
        for n in (5, 3)
    ]
    shards[1]["target"][0] = -100  # ranks hold different numbers of valid samples: 5 and 2

    def fit(directory, per_rank, devices):
        directory.mkdir()
        torch.manual_seed(0)
        module = LossModule(
            nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(),
            AdversarialLoss(epsilon=0.1, alpha=0.5, num_steps=3),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        )
        trainer = quiet_trainer(
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            precision="64-true",
            max_epochs=1,
            use_distributed_sampler=False,
            callbacks=[RecordGradients(directory), DestroyProcessGroup()],
        )
        trainer.fit(module, datamodule=RankShardData(per_rank))

    fit(tmp_path / "ddp", [[shards[0]], [shards[1]]], devices=2)
    fit(tmp_path / "single", [[{k: torch.cat([s[k] for s in shards]) for k in shards[0]}]], devices=1)
    reference = torch.load(tmp_path / "single" / "grads_rank0_step0.pt")
    assert reference
    for rank in range(2):
        grads = torch.load(tmp_path / "ddp" / f"grads_rank{rank}_step0.pt")
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_digits_adversarial_config_is_robust(tmp_path, monkeypatch):
    """The real proof: the full config run (fit 17 s on an idle 2-core CPU; minutes when it is shared)."""
    from lightning_losses.cli import build_cli
    from tests.loss_tester import CONFIGS

    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "digits_adversarial.yaml"),
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last", verbose=False)
    assert results["test/accuracy"] >= 0.95
    assert results["test/pgd_accuracy"] >= 0.75
