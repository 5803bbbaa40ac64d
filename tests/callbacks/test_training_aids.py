import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import LossModule
from lightning_losses.callbacks import GradientNormLogger, MetricEMA, gradient_norms
from tests.helpers import quiet_trainer


def regression_data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, 10 * x.sum(1, keepdim=True)), batch_size=16)


def make_module(**kwargs) -> LossModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def optimizer(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.001)

    return LossModule(model, nn.MSELoss(), optimizer=optimizer, input_map={"input": "logits"}, **kwargs)


class RecordLogged(pl.Callback):
    def __init__(self, *keys):
        self.keys, self.values = keys, {k: [] for k in keys}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key in self.keys:
            self.values[key].append(trainer.callback_metrics[key].clone())


class ManualNorms(pl.Callback):
    """Reference: the pre-clip norms computed by hand from every parameter's gradient."""

    def __init__(self):
        self.total, self.groups = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.total.append(torch.cat(grads).norm())
        self.groups.append(
            [torch.cat([p.grad.flatten() for p in g["params"]]).norm() for g in optimizer.param_groups]
        )


def test_gradient_norms_match_a_hand_computed_norm_before_clipping():
    manual = ManualNorms()
    record = RecordLogged("grad_norm/total", "grad_norm/group_0", "grad_norm/group_1")
    trainer = quiet_trainer(
        max_steps=4, gradient_clip_val=0.1, callbacks=[GradientNormLogger(), manual, record]
    )
    trainer.fit(make_module(), regression_data())
    for step in range(4):
        logged = record.values["grad_norm/total"][step]
        assert isinstance(logged, torch.Tensor)
        torch.testing.assert_close(logged, manual.total[step])
        torch.testing.assert_close(record.values["grad_norm/group_0"][step], manual.groups[step][0])
        torch.testing.assert_close(record.values["grad_norm/group_1"][step], manual.groups[step][1])
    assert min(manual.total) > 0.1  # the logged norms are the pre-clip ones


def test_gradient_norms_inf_norm_and_empty():
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([1.0, -5.0, 2.0])
    assert gradient_norms(torch.optim.SGD([w], lr=1.0), float("inf"))["total"].item() == 5.0
    assert gradient_norms(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)) == {}
    with pytest.raises(ValueError, match="`norm_type`"):
        GradientNormLogger(norm_type=0)


def test_metric_ema_is_a_debiased_average_and_leaves_training_unchanged():
    record = RecordLogged("train/loss", "train/loss_ema")
    with_ema = make_module()
    quiet_trainer(max_steps=8, callbacks=[MetricEMA(decay=0.5), record]).fit(with_ema, regression_data())
    without = make_module()
    quiet_trainer(max_steps=8).fit(without, regression_data())
    for a, b in zip(with_ema.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)  # logging only: same weights with and without the callback

    average = 0.0
    for step, (value, logged) in enumerate(
        zip(record.values["train/loss"], record.values["train/loss_ema"], strict=True), 1
    ):
        average = 0.5 * average + 0.5 * value.item()
        assert logged.item() == pytest.approx(average / (1 - 0.5**step), rel=1e-6)


def test_metric_ema_state_round_trip():
    ema = MetricEMA(decay=0.8)
    ema.averages, ema.counts = {"train/loss": torch.tensor(2.0)}, {"train/loss": 3}
    restored = MetricEMA(decay=0.8)
    restored.load_state_dict(ema.state_dict())
    assert restored.counts == {"train/loss": 3} and restored.averages["train/loss"].item() == 2.0
    with pytest.raises(ValueError, match="`decay`"):
        MetricEMA(decay=1.0)
