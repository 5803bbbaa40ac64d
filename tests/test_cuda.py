"""Every config on a GPU (skipped without CUDA): the training step makes no host-device sync, and a short
run stays finite under bf16 and fp16 mixed precision.

The sync check turns ``torch.cuda.set_sync_debug_mode("error")`` on from the start of each training batch
to the end of its backward: forward, loss, metric logging, task metrics and backward. The one host read
LossModule makes per optimizer step (the ``nan_policy`` check, after backward) is outside that window by
design.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from lightning_losses import LossModule
from tests.helpers import TokenSquaredError, quiet_trainer
from tests.reliability.test_bf16_configs import CONFIGS, PREREQUISITES, assert_finite_run, short_fit
from tests.reliability.test_nan_ddp import FUSED_ADAMW, InfGradRegressor, batches, poison

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.slow,
    pytest.mark.timeout(600),
]


class NoHostSyncInStep(Callback):
    """Any host-device sync between the start of a training batch and the end of its backward raises."""

    def __init__(self) -> None:
        self.checked_steps = 0
        self.devices: set[str] = set()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.devices.add(pl_module.device.type)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.checked_steps += 1

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        torch.cuda.set_sync_debug_mode("default")


class NoHostSyncInWholeStep(NoHostSyncInStep):
    """Like ``NoHostSyncInStep``, up to the end of the batch: the optimizer step included."""

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        pass

    def on_train_batch_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.checked_steps += 1


def test_skip_policy_with_fused_adamw_makes_no_sync_in_a_whole_step():
    """``nan_policy="skip"`` with a fused AdamW skips on the device: no sync, faulty steps included."""
    data = batches(4)
    data[1] = poison(data[1])  # an inf gradient under a finite loss
    torch.manual_seed(0)
    module = LossModule(InfGradRegressor(), TokenSquaredError(), optimizer=FUSED_ADAMW, nan_policy="skip")
    no_sync = NoHostSyncInWholeStep()
    quiet_trainer(accelerator="gpu", max_steps=4, callbacks=[no_sync]).fit(
        module, DataLoader(data, batch_size=None)
    )
    assert no_sync.devices == {"cuda"} and no_sync.checked_steps == 4
    assert int(module.skipped_steps) == 1 and torch.isfinite(module.model.linear.weight).all()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda_runs")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_config_step_on_cuda(name, precision, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    prerequisite = PREREQUISITES.get(name)
    if prerequisite is not None and not (scratch / "runs" / prerequisite).exists():
        short_fit(prerequisite, accelerator="gpu")
    dtypes: set[torch.dtype] = set()
    no_sync = NoHostSyncInStep()
    cli = short_fit(name, dtypes, precision=precision, accelerator="gpu", callbacks=[no_sync])
    assert no_sync.devices == {"cuda"}  # (Lightning moves the model back to the CPU after fit)
    assert (torch.bfloat16 if precision == "bf16-mixed" else torch.float16) in dtypes, dtypes
    assert no_sync.checked_steps > 0
    assert_finite_run(cli)
