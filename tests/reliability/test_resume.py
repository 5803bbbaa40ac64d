"""Kill and resume: a ``lightning-losses fit`` run killed with SIGKILL mid-epoch, restarted by the same
command (``--ckpt_path last``), ends with exactly the weights, learned loss parameters and AdamW state
of a run that was never interrupted.

The job: digits multi-task with learned uncertainty weights (``configs/digits_multitask.yaml``), 3 epochs
of 20 batches, a checkpoint every 15 optimizer steps (``save_last``), ``ResumableTraining``. The kill
comes at step 35, so the restart resumes from step 30: epoch 1 after 10 of its 20 batches (mid-epoch,
shuffled loader), and trains across the next epoch boundary. Without ``ResumableTraining`` Lightning
restarts the interrupted epoch from a fresh shuffle, and the weights differ (the control below).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "digits_multitask.yaml"
EVERY, KILL_AT, EPOCHS, BATCHES = 15, 35, 3, 20
KILL_ENV = "LIGHTNING_LOSSES_TEST_SIGKILL_AT_STEP"


class SigkillAtStep(pl.Callback):
    """Fault injection: SIGKILL this process when the optimizer step given by an env variable begins."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = os.environ.get(KILL_ENV)
        if step is not None and trainer.global_step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)


def write_config(directory: Path, resumable: bool = True) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    trainer = config["trainer"]
    trainer.update(max_epochs=EPOCHS, enable_progress_bar=False, enable_model_summary=False)
    trainer["logger"]["init_args"]["save_dir"] = str(directory / "runs")
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": EVERY, "save_last": True, "save_top_k": -1},
        },
        {"class_path": f"{__name__}.SigkillAtStep"},
    ]
    if resumable:
        trainer["callbacks"].append({"class_path": "lightning_losses.callbacks.ResumableTraining"})
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """``lightning-losses fit --config <config> --ckpt_path last``: the same command every time."""
    script = Path(sys.executable).parent / "lightning-losses"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_losses.cli"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    return subprocess.run(
        [*command, "fit", "--config", str(config), "--ckpt_path", "last"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_checkpoint(directory: Path) -> dict:
    (path,) = (directory / "runs").rglob("last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def killed_then_resumed(directory: Path, resumable: bool) -> tuple[dict, dict]:
    """The checkpoint the killed run left behind, and the resumed run's final one."""
    config = write_config(directory, resumable)
    killed = fit(config, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_kill = last_checkpoint(directory)
    resumed = fit(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert len(list((directory / "runs").rglob("metrics.csv"))) == 1  # logged on into the same run
    return at_kill, last_checkpoint(directory)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][index][key]), (index, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = fit(write_config(directory))  # --ckpt_path last with no checkpoint yet: a fresh start
    assert result.returncode == 0, result.stderr[-3000:]
    return last_checkpoint(directory)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_epoch_then_same_command_resumes_to_identical_weights(tmp_path, uninterrupted):
    at_kill, resumed = killed_then_resumed(tmp_path, resumable=True)

    # the fault point: the last checkpoint before the kill is mid-epoch (epoch 1, 10 of 20 batches)
    assert at_kill["global_step"] == 30 and at_kill["epoch"] == 1
    progress = at_kill["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 30 - BATCHES  # saved in the 10th batch's on_train_batch_end
    assert uninterrupted["global_step"] == resumed["global_step"] == EPOCHS * BATCHES

    assert_same_training_state(resumed, uninterrupted)
    # the learned loss parameters are part of it, and were trained
    log_variances = [k for k in uninterrupted["state_dict"] if k.startswith("loss.")]
    assert log_variances
    assert any(uninterrupted["state_dict"][k].abs().max() > 0.05 for k in log_variances)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_control_without_resumable_training_the_resumed_weights_differ(tmp_path, uninterrupted):
    """The test above can fail: Lightning alone restarts the interrupted epoch with a fresh shuffle."""
    _, resumed = killed_then_resumed(tmp_path, resumable=False)
    assert resumed["global_step"] == uninterrupted["global_step"]
    weight = "model.class_head.weight"
    assert not torch.equal(resumed["state_dict"][weight], uninterrupted["state_dict"][weight])
