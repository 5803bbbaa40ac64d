"""Losses, models and data shared by the tests (importable from spawned DDP workers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

from lightning_losses import LossFunction, LossOutput, LossType

_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class _CopiesToMeta(TorchDispatchMode):
    """Raise on an op that moves CPU data to ``meta``: an explicit copy (``.to``, ``copy_``) of a CPU
    tensor, or a CPU tensor of one or more dimensions (an index) taken into a result on ``meta``. 0-dim
    CPU tensors in other ops are wrapped scalars (no copy)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        results = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        copies = func in _COPIES
        if any(t.is_meta for t in results) and any(
            t.device.type == "cpu" and (copies or t.ndim > 0) for t in inputs
        ):
            described = ", ".join(f"{t.device}{tuple(t.shape)}" for t in inputs)
            raise RuntimeError(f"CPU data moved to the device by {func}: inputs {described}")
        return out


class _DataToDevice(TorchFunctionMode):
    """Raise on ``torch.tensor`` / ``torch.as_tensor`` of Python data (not an empty list: nothing to copy)
    on a device other than the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        data = args[0] if args else kwargs.get("data")
        empty = isinstance(data, (list, tuple)) and len(data) == 0  # torch.get_default_device's probe
        if func in (torch.tensor, torch.as_tensor) and not isinstance(data, Tensor) and not empty:
            device = kwargs.get("device", args[2] if func is torch.as_tensor and len(args) > 2 else None)
            if device is not None and torch.device(device).type != "cpu":
                raise RuntimeError(f"torch.{func.__name__} of Python data on {device}: a host-to-device copy")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_to_device() -> Iterator[None]:
    """Raise where CPU data would be copied to ``meta`` tensors: ``.to`` or ``copy_`` of a CPU tensor, a
    CPU index tensor, ``torch.tensor(data, device=...)``. On CUDA each is a host-to-device copy, a sync;
    with ``meta`` tensors, which raise on host reads, this is the CPU's proxy of
    ``torch.cuda.set_sync_debug_mode("error")``.

    >>> with no_host_to_device():
    ...     torch.ones(3, device="meta")[torch.tensor([0, 2])]
    Traceback (most recent call last):
    ...
    RuntimeError: CPU data moved to the device by aten.index.Tensor: inputs meta(3,), cpu(2,)
    >>> with no_host_to_device():
    ...     torch.tensor(1.0, device="meta")
    Traceback (most recent call last):
    ...
    RuntimeError: torch.tensor of Python data on meta: a host-to-device copy
    """
    with _DataToDevice(), _CopiesToMeta():
        yield


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary, unless overridden."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class TokenSquaredError(LossFunction):
    """A token-level loss: Σ m·(preds − target)² / global_valid_toks."""

    loss_type = LossType.TOKEN_LEVEL
    partial_metrics = ("squared_error",)

    def forward(
        self, preds: Tensor, target: Tensor, token_mask: Tensor, global_valid_toks: Tensor
    ) -> LossOutput:
        total = ((preds - target) ** 2 * token_mask).sum()
        loss = total / global_valid_toks
        return LossOutput(
            loss,
            {
                "loss": loss.detach(),
                "squared_error": loss.detach(),
                "global_valid_toks": global_valid_toks.detach().to(loss.dtype),
            },
        )


class LocalMeanSquaredError(nn.Module):
    """The naive loss: a mean over this rank's valid tokens (no global count, no loss_type)."""

    def forward(self, preds: Tensor, target: Tensor, token_mask: Tensor) -> Tensor:
        return ((preds - target) ** 2 * token_mask).sum() / token_mask.sum()


class PoisonableTokenLoss(TokenSquaredError):
    """TokenSquaredError that returns NaN when the batch says so (fault injection)."""

    def forward(self, preds, target, token_mask, global_valid_toks, poison):  # type: ignore[override]
        loss, metrics = super().forward(preds, target, token_mask, global_valid_toks)
        return LossOutput(torch.where(poison.any(), torch.full_like(loss, float("nan")), loss), metrics)


class GuideProtocolLoss(LossFunction):
    """The guide's protocol written verbatim: config dict, no super().__init__(), __call__."""

    def __init__(self, config):
        self.alpha = config.get("alpha", 1.0)
        self.loss_type = LossType.TOKEN_LEVEL

    def __call__(self, next_token_logits, data, global_valid_seqs, global_valid_toks):
        log_probs = torch.log_softmax(next_token_logits.float(), dim=-1)
        taken = log_probs.gather(-1, data["input_ids"].unsqueeze(-1)).squeeze(-1)
        loss = -self.alpha * (taken * data["token_mask"]).sum() / global_valid_toks
        metrics = {"nll": loss.detach(), "valid_seqs": global_valid_seqs}
        return loss, metrics


class LearnableScaleLoss(nn.Module):
    """Gaussian NLL with a learned log-variance s: 0.5·exp(−s)·mse + 0.5·s (a learnable loss parameter)."""

    def __init__(self, init_log_variance: float = 2.0) -> None:
        super().__init__()
        self.log_variance = nn.Parameter(torch.tensor(init_log_variance))

    def forward(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mse = torch.nn.functional.mse_loss(logits.squeeze(-1), target.to(logits.dtype))
        loss = 0.5 * torch.exp(-self.log_variance) * mse + 0.5 * self.log_variance
        return loss, {"mse": mse.detach(), "log_variance": self.log_variance.detach()}


class TokenRegressor(nn.Module):
    """``features [B, T, F]`` → ``{"preds": [B, T]}``."""

    def __init__(self, num_features: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"preds": self.linear(features).squeeze(-1)}


class TinyLM(nn.Module):
    """``input_ids [B, T]`` → ``next_token_logits [B, T, V]``."""

    def __init__(self, vocab_size: int = 7, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        return {"next_token_logits": self.head(self.embed(input_ids))}


def token_shards(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[dict[str, Tensor]]:
    """Two shards of one global batch, with different numbers of valid tokens (10 and 5)."""
    generator = torch.Generator().manual_seed(seed)
    shards = []
    for valid_per_row in ([4, 3, 3], [1, 4, 0]):
        rows, steps = len(valid_per_row), 4
        mask = torch.zeros(rows, steps, dtype=torch.bool)
        for row, valid in enumerate(valid_per_row):
            mask[row, :valid] = True
        shards.append(
            {
                "features": torch.randn(rows, steps, 3, generator=generator, dtype=dtype),
                "target": torch.randn(rows, steps, generator=generator, dtype=dtype),
                "token_mask": mask,
            }
        )
    return shards


def concat_shards(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}


class RankShardData(pl.LightningDataModule):
    """Rank r trains on ``per_rank[r]``: a list of ready-made batches (use_distributed_sampler=False)."""

    def __init__(self, per_rank: list[list[dict[str, Tensor]]]) -> None:
        super().__init__()
        self.per_rank = per_rank

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.per_rank[self.trainer.global_rank], batch_size=None)


class RecordGradients(pl.Callback):
    """After each backward (DDP-reduced by then), save this rank's gradients, weights and metrics."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = trainer.global_step
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        torch.save(grads, self.directory / f"grads_rank{trainer.global_rank}_step{step}.pt")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        weights = {n: p.detach().clone() for n, p in module.named_parameters()}
        metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
        torch.save(
            {"weights": weights, "metrics": metrics, "skipped_steps": module.skipped_steps.clone()},
            self.directory / f"state_rank{trainer.global_rank}_batch{batch_idx}.pt",
        )


class DestroyProcessGroup(pl.Callback):
    """Destroy the process group when a spawned worker's run ends.

    A gloo process group left alive at interpreter exit aborts the worker now and then ("terminate
    called without an active exception", SIGABRT) in torch 2.13; Lightning 2.6 does not destroy it.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
