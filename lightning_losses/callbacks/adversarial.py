"""``AdversarialEvaluation``: accuracy under an FGSM/PGD attack, measured at validation and test time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.functional.adversarial import (
    attack_mode,
    check_attack_options,
    normal_tensor,
    pgd_attack,
)

__all__ = ["AdversarialEvaluation"]


class AdversarialEvaluation(pl.Callback):
    """Attack every validation / test batch and log ``<stage>/<name>_accuracy`` (default ``pgd_accuracy``).

    The attack is :func:`lightning_losses.functional.pgd_attack` maximizing the cross-entropy of the
    model's logits, in eval mode (the Trainer's evaluation mode; the callback also restores every
    submodule's mode). It works with ``LossModule``: the batch (a dict) has the input under ``input_key``
    replaced by the attacked one and goes through ``pl_module(batch)`` (so the model's inputs are
    resolved as in training), and the logits are ``outputs[pl_module.preds_key]``. Another
    LightningModule is called as ``pl_module(inputs)``. The accuracy is correct / total summed over
    batches and ranks: exact under DDP. It runs in the evaluation loop's ``inference_mode`` (the attack
    turns gradients on for a copy of the inputs); the model's parameters get no ``.grad``.

    Args:
        epsilon: L∞ radius ε. num_steps: 1 (FGSM) or more (PGD). step_size: η (default 2.5·ε/steps).
        random_start: start from a uniform point of the ε-ball (seeded by ``seed``).
        clamp_min / clamp_max: the valid input range.
        input_key / target_key: the batch keys of the inputs and of the class-index targets.
        name: the metric name prefix (``pgd`` gives ``val/pgd_accuracy``, ``test/pgd_accuracy``).
        stages: where to attack: ``"val"`` and/or ``"test"``.
        seed: the random start's generator seed (per epoch the same points: comparable across epochs).

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_losses.callbacks.AdversarialEvaluation
              init_args: {epsilon: 0.1, num_steps: 10}
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        num_steps: int = 10,
        step_size: float | None = None,
        random_start: bool = False,
        clamp_min: float | None = 0.0,
        clamp_max: float | None = 1.0,
        input_key: str = "inputs",
        target_key: str = "target",
        name: str = "pgd",
        stages: Sequence[str] = ("val", "test"),
        seed: int = 0,
    ) -> None:
        check_attack_options(epsilon, num_steps, step_size, clamp_min, clamp_max)
        unknown = set(stages) - {"val", "test"}
        if unknown:
            raise ValueError(f"`stages` may hold 'val' and 'test', got {sorted(unknown)}")
        self.epsilon = epsilon
        self.num_steps = num_steps
        self.step_size = step_size
        self.random_start = random_start
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max
        self.input_key = input_key
        self.target_key = target_key
        self.name = name
        self.stages = tuple(stages)
        self.seed = seed
        self._counts: dict[str, Tensor] = {}
        self._generator: torch.Generator | None = None

    # -- the attack ------------------------------------------------------------------------------------

    def _logits(self, pl_module: pl.LightningModule, batch: Mapping[str, Any], inputs: Tensor) -> Tensor:
        preds_key = getattr(pl_module, "preds_key", None)
        if preds_key is not None and hasattr(pl_module, "batch_as_dict"):
            return pl_module({**batch, self.input_key: inputs})[preds_key]
        return pl_module(inputs)

    def attack_batch(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        """``(correct, total)`` of this batch under the attack, as tensors on the batch's device."""
        if hasattr(pl_module, "batch_as_dict"):
            batch = pl_module.batch_as_dict(batch)
        if not isinstance(batch, Mapping) or self.input_key not in batch or self.target_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"AdversarialEvaluation needs the batch keys '{self.input_key}' and '{self.target_key}', "
                f"got {keys}; set `input_key` / `target_key`"
            )
        batch = {key: normal_tensor(value) for key, value in batch.items()}  # test loops: inference mode
        inputs, target = batch[self.input_key], batch[self.target_key]
        generator = None
        if self.random_start:
            if self._generator is None or self._generator.device != inputs.device:
                self._generator = torch.Generator(device=inputs.device)
            generator = self._generator
        with attack_mode(pl_module):
            adversarial = pgd_attack(
                lambda x: F.cross_entropy(self._logits(pl_module, batch, x).float(), target),
                inputs,
                self.epsilon,
                num_steps=self.num_steps,
                step_size=self.step_size,
                random_start=self.random_start,
                clamp_min=self.clamp_min,
                clamp_max=self.clamp_max,
                generator=generator,
            )
            with torch.no_grad():
                logits = self._logits(pl_module, batch, adversarial.to(inputs.dtype))
        correct = (logits.argmax(-1) == target).sum()
        return correct, torch.full((), target.numel(), dtype=torch.long, device=correct.device)

    # -- hooks -----------------------------------------------------------------------------------------

    def _start(self, stage: str, device: torch.device) -> None:
        self._counts[stage] = torch.zeros(2, dtype=torch.long, device=device)
        if self._generator is not None:
            self._generator.manual_seed(self.seed)

    def _batch(self, stage: str, pl_module: pl.LightningModule, batch: Any) -> None:
        if stage not in self.stages:
            return
        if stage not in self._counts:
            self._start(stage, pl_module.device)
        if self.random_start and self._generator is None:
            self._generator = torch.Generator(device=pl_module.device)
            self._generator.manual_seed(self.seed)
        correct, total = self.attack_batch(pl_module, batch)
        self._counts[stage] += torch.stack([correct, total]).to(self._counts[stage])

    def _end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stage not in self.stages or stage not in self._counts:
            return
        counts = self._counts.pop(stage)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        accuracy = counts[0].double() / counts[1].clamp(min=1).double()
        pl_module.log(f"{stage}/{self.name}_accuracy", accuracy.float(), on_step=False, on_epoch=True)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self.stages:
            self._start("val", pl_module.device)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._start("test", pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._batch("val", pl_module, batch)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch("test", pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end("val", trainer, pl_module)
        else:
            self._counts.pop("val", None)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("test", trainer, pl_module)
