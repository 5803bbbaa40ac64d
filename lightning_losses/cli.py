"""The ``lightning-losses`` command: LightningCLI over ``LossModule`` and any LightningDataModule.

lightning-losses fit --config configs/digits_cross_entropy.yaml
lightning-losses test --config configs/digits_cross_entropy.yaml --ckpt_path last
lightning-losses fit --config configs/digits_cross_entropy.yaml --print_config
lightning-losses plot runs/digits_cross_entropy        # metrics.csv -> metrics.png

Resuming a killed run
---------------------
``lightning-losses fit --config X.yaml --ckpt_path last`` continues the newest run of the config: the
CLI looks for ``last*.ckpt`` in ``<logger save_dir>/<name>/<version>/checkpoints/`` (each ``fit`` logs to
a new ``version_N``, where Lightning's own ``ckpt_path="last"`` would look and find nothing), takes the
newest, and logs the resumed run into that same ``version_N`` directory (metrics appended, checkpoints
beside the old ones). With a ``version`` set in the logger config only that directory is searched.
When no ``last`` checkpoint exists yet the run starts from scratch (Lightning warns), so one command
serves both the first start and every restart. Save ``last`` often enough
(``ModelCheckpoint(every_n_train_steps=N, save_last=True)``) and add
``lightning_losses.callbacks.ResumableTraining`` so that the resumed run also replays the interrupted
epoch's batch order and RNG streams: its final weights then equal an uninterrupted run's.

``test`` / ``validate`` / ``predict`` with ``--ckpt_path last`` load the same newest ``last*.ckpt``.

Every checkpoint given by ``--ckpt_path`` (a path, or ``last`` once resolved) is checked first
(:func:`~lightning_losses.callbacks.check_checkpoint`: complete zip structure, CRC-32 of every record):
a truncated or corrupted file stops the command with one line naming the file and the fault.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lightning_losses.callbacks.resume import CheckpointError, check_checkpoint
from lightning_losses.module import LossModule

__all__ = ["LossCLI", "build_cli", "main", "newest_last_checkpoint"]


class SaveConfigBesideLogs(SaveConfigCallback):
    """Save the run's config in the logger's directory; without a logger (``--trainer.logger=false``,
    an evaluation run) there is no run directory, so nothing is written (not a stray ``config.yaml``)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


_SPECIAL_CKPT_PATHS = ("best", "last", "hpc")


class LossCLI(LightningCLI):
    """LightningCLI with ``LossModule`` as the model and a ``class_path`` data module; resolves
    ``--ckpt_path last`` to the newest run of the config and checks checkpoint files (module docstring)."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            found = newest_last_checkpoint(config.get("trainer"))
            if found is not None:
                path, version = found
                config["ckpt_path"] = ckpt_path = str(path)
                if subcommand == "fit":
                    rank_zero_info(f"--ckpt_path last: resuming from {path}")
                    _set_logger_version(config.get("trainer"), version)
                else:  # validate / test / predict the newest run's last weights, logged as a new run
                    rank_zero_info(f"--ckpt_path last: {path}")
        if ckpt_path and ckpt_path not in _SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path):
            check_checkpoint(ckpt_path)  # before LightningCLI reads its hyperparameters with torch.load


def _first_logger(trainer: Any) -> Any:
    logger = trainer.get("logger") if trainer is not None else None
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger if logger is not None and not isinstance(logger, bool) else None


def newest_last_checkpoint(trainer: Any) -> tuple[Path, str] | None:
    """``(newest last*.ckpt, its version directory's name)`` among the runs of the logger in the trainer
    config (``save_dir/name/<version>/checkpoints/``), or None. A parsed config's ``trainer`` section.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for version in ("version_0", "version_1"):
    ...     (root / "job" / version / "checkpoints").mkdir(parents=True)
    ...     _ = (root / "job" / version / "checkpoints" / "last.ckpt").write_bytes(b"")
    >>> logger = {"class_path": "CSVLogger", "init_args": {"save_dir": str(root), "name": "job"}}
    >>> path, version = newest_last_checkpoint({"logger": logger})
    >>> version, path.relative_to(root).as_posix()
    ('version_1', 'job/version_1/checkpoints/last.ckpt')
    """
    logger = _first_logger(trainer)
    if logger is None:
        return None
    init_args = logger.get("init_args") or {}
    save_dir = init_args.get("save_dir") or trainer.get("default_root_dir") or "."
    name = init_args.get("name")
    root = Path(save_dir) / str(name) if name else Path(save_dir)
    version = init_args.get("version")
    if version is not None:
        version = version if isinstance(version, str) else f"version_{version}"
        runs = [root / version]
    else:
        runs = [path for path in root.glob("*") if path.is_dir()] if root.is_dir() else []
    candidates = [
        ckpt
        for run in runs
        for ckpt in (run / "checkpoints").glob("last*.ckpt")
        if ckpt.stem == "last" or ckpt.stem.startswith("last-v")
    ]
    if not candidates:
        return None
    newest = max(candidates, key=lambda path: (path.stat().st_mtime, path.as_posix()))
    return newest, newest.parent.parent.name


def _set_logger_version(trainer: Any, version: str) -> None:
    """Log into the run directory being resumed (a str version is used as the directory name)."""
    logger = _first_logger(trainer)
    if logger is not None and logger.get("init_args") is not None:
        logger["init_args"]["version"] = version


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
    try:
        build_cli(args)
    except CheckpointError as error:  # one line naming the file and the fault, no traceback
        raise SystemExit(f"lightning-losses: error: {error}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
