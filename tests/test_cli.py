"""The `lightning-losses` CLI: fit from YAML, --print_config round trip, self-rebuilding checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_losses import LossModule
from lightning_losses.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAIN_CONFIG = CONFIGS / "digits_cross_entropy.yaml"


def fit_args(tmp_path: Path, *extra: str, config: Path = MAIN_CONFIG) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def last_checkpoint(tmp_path: Path) -> Path:
    (path,) = tmp_path.rglob("last.ckpt")
    return path


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # validate/test run without the logger
def test_fit_from_yaml_and_reload_checkpoint_without_passing_modules(tmp_path):
    cli = build_cli(fit_args(tmp_path, "--trainer.max_epochs=2"))
    trained = cli.model
    assert trained.trainer.callback_metrics["val/accuracy"] > 0.5

    restored = LossModule.load_from_checkpoint(last_checkpoint(tmp_path))
    assert type(restored.model) is type(trained.model)
    assert isinstance(restored.loss, torch.nn.CrossEntropyLoss)
    for (name, a), (_, b) in zip(trained.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    optimizer = restored.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 0.003
    (metrics_csv,) = tmp_path.rglob("metrics.csv")
    assert "val/accuracy" in metrics_csv.read_text().splitlines()[0]

    for subcommand, key in (("validate", "val/accuracy"), ("test", "test/accuracy")):
        args = fit_args(tmp_path, f"--ckpt_path={last_checkpoint(tmp_path)}", "--trainer.logger=false")
        evaluated = build_cli([subcommand, *args[1:]])
        assert evaluated.trainer.callback_metrics[key] > 0.5
        for name, weight in evaluated.model.state_dict().items():
            assert torch.equal(weight, trained.state_dict()[name]), name

    # `--ckpt_path last` in a fresh CLI finds fit's checkpoint in the config's run directory
    evaluated = build_cli(["test", *fit_args(tmp_path, "--ckpt_path=last")[1:]])
    assert evaluated.trainer.ckpt_path == str(last_checkpoint(tmp_path))
    for name, weight in evaluated.model.state_dict().items():
        assert torch.equal(weight, trained.state_dict()[name]), name


def test_learnable_loss_parameter_is_restored_from_checkpoint(tmp_path):
    config = yaml.safe_load(MAIN_CONFIG.read_text())
    config["model"]["model"]["init_args"]["out_features"] = 1
    config["model"]["loss"] = {
        "class_path": "tests.helpers.LearnableScaleLoss",
        "init_args": {"init_log_variance": 2.0},
    }
    del config["model"]["input_map"], config["model"]["metrics"]
    config["trainer"]["callbacks"][0]["init_args"] = {"monitor": "val/loss", "save_last": True}
    path = tmp_path / "learnable.yaml"
    path.write_text(yaml.safe_dump(config))

    cli = build_cli(fit_args(tmp_path, "--trainer.max_epochs=2", config=path))
    learned = cli.model.loss.log_variance.detach().clone()
    assert abs(learned.item() - 2.0) > 0.01  # trained away from its initial value

    restored = LossModule.load_from_checkpoint(last_checkpoint(tmp_path))
    assert torch.equal(restored.loss.log_variance.detach(), learned)


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_losses.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--model.loss" in result.stdout and "--model.nan_policy" in result.stdout


@pytest.mark.slow
def test_main_job_reaches_95_percent_validation_accuracy(tmp_path):
    cli = build_cli(fit_args(tmp_path))
    best = cli.trainer.checkpoint_callback.best_model_score
    assert best is not None and best.item() >= 0.95, best
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    assert results["test/accuracy"] >= 0.93, results
