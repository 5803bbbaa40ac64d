"""``LossModule.training_step`` on ``meta`` tensors (no data: any host read raises; so does CPU data moved
to them, under ``no_host_to_device``), the path a GPU step takes: batch binding, the global counts, the
loss, the non-finite bookkeeping and the epoch-mean objects' updates (Lightning's own ``self.log`` needs a
Trainer and is left to ``tests/test_cuda.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._pytree import tree_map

from lightning_losses import LossModule
from lightning_losses.cli import build_cli
from lightning_losses.examples.models import MLP
from lightning_losses.losses.cross_entropy import CrossEntropyLoss
from lightning_losses.losses.nll import NLLLoss
from tests.helpers import TinyLM, TokenRegressor, TokenSquaredError, no_host_to_device, token_shards
from tests.reliability.test_bf16_configs import CONFIGS, PREREQUISITES


def _classifier_batch() -> dict[str, torch.Tensor]:
    return {"inputs": torch.rand(6, 8), "target": torch.randint(0, 3, (6,))}


def _lm_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 7, (2, 5))
    return {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def _meta_step(module: LossModule, batch: object) -> torch.Tensor:
    """``module`` and ``batch`` moved to ``meta``, then one training step and its backward there."""
    module.to("meta")
    batch = tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, batch)
    with warnings.catch_warnings(), no_host_to_device():
        warnings.filterwarnings("ignore", message=".*self.trainer` reference is not registered.*")
        loss = module.training_step(batch, 0)
        loss.backward()
    assert loss.is_meta and loss.ndim == 0
    return loss


CASES = {
    "classifier": (lambda: MLP(8, 3, hidden=(16,)), CrossEntropyLoss, _classifier_batch),
    "token_level": (TokenRegressor, TokenSquaredError, lambda: token_shards(torch.float32)[0]),
    "next_token": (TinyLM, NLLLoss, _lm_batch),
}


@pytest.mark.parametrize("nan_policy", ["raise", "skip"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_step_makes_no_host_read_off_the_cpu(case, nan_policy):
    make_model, make_loss, make_batch = CASES[case]
    module = LossModule(make_model(), make_loss(), nan_policy=nan_policy)
    loss = _meta_step(module, make_batch())
    assert loss.requires_grad
    assert all(p.grad is not None and p.grad.is_meta for p in module.model.parameters())
    # the epoch means were updated, on the module's device (a state made on the CPU would be a copy)
    means = list(module.loss_logger.train_metrics.children())
    assert means and all(m.update_count == 1 and m.total.is_meta and m.weight.is_meta for m in means)


# rollout data (the policy acts in CartPole or on digits to make its batches) needs values
ROLLOUT_CONFIGS = {"cartpole_actor_critic", "digits_policy_gradient"}
META_CONFIGS = sorted(
    p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in PREREQUISITES and p.stem not in ROLLOUT_CONFIGS
)


@pytest.mark.parametrize("name", META_CONFIGS)
def test_config_training_step_makes_no_host_read_off_the_cpu(name):
    """Each config's module (task metrics included) and one batch of its data, on ``meta``: the step
    and its backward. The configs that load a checkpoint are left to ``tests/test_cuda.py``."""
    cli = build_cli(["--config", str(CONFIGS / f"{name}.yaml"), "--trainer.logger=false"], run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    _meta_step(cli.model, next(iter(cli.datamodule.train_dataloader())))
    assert any(p.grad is not None for p in cli.model.parameters())
