"""Mixed precision: every config in configs/ trains under ``precision="bf16-mixed"`` in a short version
(1 epoch of 3 batches, 2 validation batches) and stays finite.

``nan_policy="raise"`` is set, so any non-finite training loss or gradient stops the run; afterwards every
logged metric and every parameter must be finite, and the model's ``nn.Linear`` layers must have produced
bfloat16 outputs (autocast was on). Configs that load an earlier run's checkpoint (the
distillation teacher, the SFT warm start) get the short bf16 run of that config first, in the same
scratch directory (the configs' relative ``runs/`` paths land there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_losses.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PREREQUISITES = {
    "digits_distillation": "digits_teacher",
    "digits_combined": "digits_teacher",
    "lm_grpo": "lm_task_sft",
    "lm_dpo": "lm_task_sft",
}
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.max_steps=-1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.nan_policy=raise",
]


def short_fit(
    name: str,
    output_dtypes: set[torch.dtype] | None = None,
    *,
    precision: str = "bf16-mixed",
    accelerator: str = "cpu",
    callbacks: Sequence[Callback] = (),
):
    """The short mixed-precision run of a config; records the dtypes of the model's ``nn.Linear``
    outputs."""
    overrides = [f"--trainer.precision={precision}", f"--trainer.accelerator={accelerator}"]
    cli = build_cli(["--config", str(CONFIGS / f"{name}.yaml"), *SHORT, *overrides], run=False)
    if output_dtypes is not None:
        for layer in cli.model.model.modules():
            if isinstance(layer, nn.Linear):
                layer.register_forward_hook(lambda module, args, out: output_dtypes.add(out.dtype))
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def assert_finite_run(cli) -> None:
    """Trained some steps, skipped none, every logged metric and parameter finite."""
    trainer = cli.trainer
    assert trainer.global_step > 0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert any(k.startswith("train/") for k in metrics), sorted(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert cli.model.skipped_steps.item() == 0
    for parameter_name, parameter in cli.model.named_parameters():
        assert torch.isfinite(parameter).all(), parameter_name


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bf16_runs")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_config_trains_finite_under_bf16_mixed(name, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    torch.set_num_threads(1)
    prerequisite = PREREQUISITES.get(name)
    if prerequisite is not None and not (scratch / "runs" / prerequisite).exists():
        short_fit(prerequisite)
    dtypes: set[torch.dtype] = set()
    cli = short_fit(name, dtypes)
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.bfloat16 in dtypes, dtypes
    assert_finite_run(cli)
