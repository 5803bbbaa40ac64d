"""The ``lightning-losses`` command: LightningCLI over ``LossModule`` and any LightningDataModule.

lightning-losses fit --config configs/digits_cross_entropy.yaml
lightning-losses test --config configs/digits_cross_entropy.yaml --ckpt_path last
lightning-losses fit --config configs/digits_cross_entropy.yaml --print_config
lightning-losses plot runs/digits_cross_entropy        # metrics.csv -> metrics.png
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_losses.module import LossModule

__all__ = ["LossCLI", "build_cli", "main"]


class SaveConfigBesideLogs(SaveConfigCallback):
    """Save the run's config in the logger's directory; without a logger (``--trainer.logger=false``,
    an evaluation run) there is no run directory, so nothing is written (not a stray ``config.yaml``)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class LossCLI(LightningCLI):
    """LightningCLI with ``LossModule`` as the model and a ``class_path`` data module."""


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> LossCLI:
    """The CLI object; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks)."""
    return LossCLI(
        LossModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_callback=SaveConfigBesideLogs,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-losses`` console script: LightningCLI's subcommands, and ``plot``
    (see :mod:`lightning_losses.plotting`)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["plot"]:
        from lightning_losses.plotting import plot_main

        plot_main(argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
