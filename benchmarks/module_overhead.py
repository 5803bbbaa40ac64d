"""Training steps per second through ``LossModule`` against a hand-written LightningModule doing the same.

Run::

    python -m benchmarks.module_overhead --epochs 6 --repeats 7 --json out.json [--profile]
    python -m benchmarks.module_overhead --epochs 4 --repeats 6 --processes 10  # medians over 10 processes

Every variant trains the same MLP (``lightning_losses.examples.MLP``, ``--hidden`` units) on scikit-learn's
digits (``DigitsDataModule``: 1,257 training images, ``--batch-size`` rows per batch, dict batches) with
``torch.nn.CrossEntropyLoss`` and AdamW, under the same Trainer settings (``--device``, no validation, no
checkpoint, no progress bar, no logger: ``self.log`` still runs Lightning's whole logging path, into
``trainer.callback_metrics``), and log the loss each step and its epoch mean:

- ``hand_written``: ``training_step`` calls the model and the loss and logs
  ``self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(target))``;
- ``loss_module``: ``LossModule(model, torch.nn.CrossEntropyLoss(), input_map={"input": "logits"})``, which
  logs ``train/loss`` each step and ``train/loss_epoch`` through its own weighted-mean metric;
- ``loss_logger``: the hand-written ``training_step`` logging through the library's ``LossLogger`` (as the
  README's "plug into an existing Lightning project" does) instead of its one ``self.log``: it logs as
  ``LossModule`` does, so ``loss_logger / hand_written`` is the cost of that way of logging and
  ``loss_module / loss_logger`` the cost of the rest of ``LossModule`` (binding inputs by name, the
  non-finite check, ...).

Time per step: a callback reads ``time.perf_counter`` at the start and the end of every training epoch;
the first ``--warmup-epochs`` epochs are left out; a run's time per step is the median over the rest of
each epoch's time / steps (a burst of load on a shared machine spoils an epoch, not the run). Runs are
interleaved (each repeat runs every variant once, in an order rotated by one from the last repeat's), each
a fresh model, Trainer and seed, so that a change of load on a shared machine hits all alike. Reported:
each variant's median steps per second, its overhead
``median(variant step time) / median(hand_written step time) - 1``, and the median of its per-repeat
ratios to ``hand_written`` (each repeat's runs are neighbours in time); and the same ratio of the medians
of the process's CPU time per step (``time.process_time``; one torch thread, data loaded in the main
process), which a busy machine disturbs less than wall time, as time spent waiting for a core is left out;
the ratio of the medians over repeats of each run's fastest epoch, which a burst of load on the
machine (several seconds of it slowed whole runs here) disturbs less; and the median over repeats of the
paired ratios of each run's 10th-percentile step (the time from one ``on_train_batch_start`` to the next:
a whole loop iteration), which a short burst of load does not reach at all: load only adds time to a
step, so the fast steps of a run are the ones it left alone.

``--profile`` then runs each variant once more under ``cProfile`` and prints, by cumulative time, the
library's functions and Lightning's ``log`` (call counts show how many ``self.log`` calls a step makes).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import itertools
import json
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses.examples.digits import DigitsDataModule
from lightning_losses.examples.models import MLP
from lightning_losses.loss_logger import LossLogger
from lightning_losses.module import LossModule

__all__ = [
    "VARIANTS",
    "HandWrittenModule",
    "format_processes",
    "format_table",
    "main",
    "run_benchmark",
    "run_processes",
    "time_fit",
]

_PROFILED = r"lightning_losses|module_overhead|\(log\)"
VARIANTS: tuple[str, ...] = ("hand_written", "loss_module", "loss_logger")


class HandWrittenModule(pl.LightningModule):
    """What a user would write by hand: model, ``torch.nn.CrossEntropyLoss``, one ``self.log``; with
    ``loss_logger=True`` a ``LossLogger`` logs instead."""

    def __init__(self, model: nn.Module, lr: float, loss_logger: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr = lr
        self.fused = fused
        self.loss_logger = LossLogger() if loss_logger else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        target = batch["target"]
        loss = self.loss_fn(self.model(batch["inputs"]), target)
        if self.loss_logger is not None:
            return self.loss_logger(self, "train", loss, batch_size=len(target))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(target))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused)


class _EpochTimer(pl.Callback):
    """Wall time, CPU time of this process and number of steps of every training epoch, and the start
    time of each of its steps."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, float, int]] = []
        self.step_starts: list[list[float]] = []  # per epoch
        self._start = (0.0, 0.0)
        self._steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps = 0
        self.step_starts.append([])
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.step_starts[-1].append(time.perf_counter())

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._steps += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall, cpu = self._start
        self.epochs.append((time.perf_counter() - wall, time.process_time() - cpu, self._steps))


def make_module(
    variant: str, hidden: int, lr: float, nan_policy: str = "raise", fused: bool = False
) -> pl.LightningModule:
    """A fresh module of ``variant`` (seed it first for equal initial weights); ``nan_policy`` is
    ``LossModule``'s; ``fused``: every variant's AdamW is ``fused=True``."""
    model = MLP(64, 10, hidden=(hidden,))
    if variant in ("hand_written", "loss_logger"):
        return HandWrittenModule(model, lr, loss_logger=variant == "loss_logger", fused=fused)
    if variant == "loss_module":
        optimizer = functools.partial(torch.optim.AdamW, lr=lr, fused=fused)
        return LossModule(
            model,
            nn.CrossEntropyLoss(),
            optimizer=optimizer,
            input_map={"input": "logits"},
            nan_policy=nan_policy,
        )
    raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")


def _trainer(epochs: int, device: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def time_fit(
    variant: str,
    data: DigitsDataModule,
    epochs: int,
    warmup_epochs: int,
    hidden: int,
    lr: float,
    device: str,
    nan_policy: str = "raise",
    fused: bool = False,
) -> dict[str, Any]:
    """One training run of ``variant``: its seconds per step after the warm-up epochs and final loss."""
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"`warmup_epochs` must be in [0, epochs), got {warmup_epochs} with epochs={epochs}")
    pl.seed_everything(0, verbose=False)
    module = make_module(variant, hidden, lr, nan_policy, fused)
    timer = _EpochTimer()
    trainer = _trainer(epochs, device, [timer])
    trainer.fit(module, datamodule=data)
    measured = timer.epochs[warmup_epochs:]
    epoch_step_times = [seconds / steps for seconds, _, steps in measured]
    step_time = statistics.median(epoch_step_times)
    # one whole loop iteration each (data, step, logging, callbacks); the last step of an epoch is left
    # out, as its interval would hold the epoch's end
    intervals = sorted(
        b - a for starts in timer.step_starts[warmup_epochs:] for a, b in itertools.pairwise(starts)
    )
    return {
        "variant": variant,
        "step_time_s": step_time,
        "fastest_epoch_step_time_s": min(epoch_step_times),
        "p10_step_time_s": intervals[len(intervals) // 10] if intervals else step_time,
        "steps_per_s": 1 / step_time,
        "step_cpu_time_s": statistics.median(cpu / steps for _, cpu, steps in measured),
        "steps": sum(steps for _, _, steps in measured),
        "final_loss": float(trainer.callback_metrics["train/loss_epoch"]),
    }


def run_benchmark(
    epochs: int = 6,
    warmup_epochs: int = 1,
    repeats: int = 7,
    batch_size: int = 64,
    hidden: int = 128,
    lr: float = 3e-3,
    device: str = "cpu",
    nan_policy: str = "raise",
    fused: bool = False,
) -> dict[str, Any]:
    """Interleaved repeats of every variant; medians and overhead ratios."""
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}")
    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        shift = repeat % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            run = time_fit(variant, data, epochs, warmup_epochs, hidden, lr, device, nan_policy, fused)
            runs.append({"repeat": repeat, **run})
    step_time = {v: statistics.median(r["step_time_s"] for r in runs if r["variant"] == v) for v in VARIANTS}
    cpu_time = {
        v: statistics.median(r["step_cpu_time_s"] for r in runs if r["variant"] == v) for v in VARIANTS
    }
    time_of = {(r["repeat"], r["variant"]): r["step_time_s"] for r in runs}
    paired = {v: [time_of[i, v] / time_of[i, "hand_written"] for i in range(repeats)] for v in VARIANTS[1:]}
    fastest = {
        v: statistics.median(r["fastest_epoch_step_time_s"] for r in runs if r["variant"] == v)
        for v in VARIANTS
    }
    p10_of = {(r["repeat"], r["variant"]): r["p10_step_time_s"] for r in runs}
    p10_paired = {v: [p10_of[i, v] / p10_of[i, "hand_written"] for i in range(repeats)] for v in VARIANTS[1:]}
    return {
        "config": {
            "epochs": epochs,
            "warmup_epochs": warmup_epochs,
            "repeats": repeats,
            "batch_size": batch_size,
            "hidden": hidden,
            "lr": lr,
            "device": device,
            "nan_policy": nan_policy,
            "fused_adamw": fused,
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "threads": torch.get_num_threads(),
        },
        "runs": runs,
        "median_step_time_s": step_time,
        "median_steps_per_s": {v: 1.0 / t for v, t in step_time.items()},
        "overhead": {v: step_time[v] / step_time["hand_written"] - 1.0 for v in VARIANTS[1:]},
        "paired_overhead": {v: statistics.median(ratios) - 1.0 for v, ratios in paired.items()},
        "paired_ratios": paired,
        "median_step_cpu_time_s": cpu_time,
        "median_fastest_epoch_step_time_s": fastest,
        "fastest_epoch_overhead": {v: fastest[v] / fastest["hand_written"] - 1.0 for v in VARIANTS[1:]},
        "cpu_overhead": {v: cpu_time[v] / cpu_time["hand_written"] - 1.0 for v in VARIANTS[1:]},
        "paired_p10_overhead": {v: statistics.median(ratios) - 1.0 for v, ratios in p10_paired.items()},
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    cfg = report["config"]
    lines = [
        f"digits MLP [{cfg['hidden']}], batch {cfg['batch_size']}, {cfg['epochs']} epochs "
        f"({cfg['warmup_epochs']} warm-up left out), {cfg['repeats']} interleaved repeats, {cfg['device']}, "
        f"{cfg['threads']} thread(s), torch {cfg['torch']}, lightning {cfg['lightning']}, "
        f"LossModule nan_policy={cfg.get('nan_policy', 'raise')}"
        + (", AdamW(fused=True)" if cfg.get("fused_adamw") else ""),
        f"{'variant':<14}{'steps/s (median)':>18}{'ms/step':>10}{'CPU ms/step':>13}{'runs (steps/s)':>18}",
    ]
    for variant in VARIANTS:
        per_run = [r["steps_per_s"] for r in report["runs"] if r["variant"] == variant]
        t, cpu = report["median_step_time_s"][variant], report["median_step_cpu_time_s"][variant]
        lines.append(
            f"{variant:<14}{1 / t:>18.1f}{t * 1e3:>10.3f}{cpu * 1e3:>13.3f}   "
            + " ".join(f"{s:.0f}" for s in per_run)
        )
    for variant in VARIANTS[1:]:
        lines.append(
            f"{variant} / hand_written - 1: {report['overhead'][variant]:+.1%} (ratio of median wall "
            f"times), {report['paired_overhead'][variant]:+.1%} (median of paired ratios), "
            f"{report['cpu_overhead'][variant]:+.1%} (ratio of median CPU times), "
            f"{report['fastest_epoch_overhead'][variant]:+.1%} (ratio of median fastest epochs), "
            f"{report['paired_p10_overhead'][variant]:+.1%} (median of paired ratios of 10th-percentile "
            "steps)"
        )
    return "\n".join(lines)


def profile_training_step(
    variant: str, data: DigitsDataModule, epochs: int, hidden: int, lr: float, device: str, top: int = 25
) -> str:
    """``cProfile`` of one run of ``variant``: the ``top`` functions by cumulative time among the library's,
    this benchmark's and Lightning's ``LightningModule.log`` / ``_ResultCollection.log``."""
    pl.seed_everything(0, verbose=False)
    module = make_module(variant, hidden, lr)
    trainer = _trainer(epochs, device, [])
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.fit(module, datamodule=data)
    profiler.disable()
    out = io.StringIO()
    # the library's functions, this file's and Lightning's `log` (with their call counts)
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(_PROFILED, top)
    return out.getvalue()


# the overhead measures that `run_processes` takes the median of, over processes
_MEASURES = ("paired_p10_overhead", "paired_overhead", "fastest_epoch_overhead", "overhead", "cpu_overhead")


def run_processes(processes: int, argv: Sequence[str]) -> dict[str, Any]:
    """``processes`` runs of this benchmark (``argv``), each in a fresh Python process, one after another;
    the median over processes of each overhead measure.

    A process's memory layout moves its figures: the same code measured +2.6% to +6.3% over 8 processes
    here (10th-percentile measure, 6 repeats each), more than a run's repeats differ from each other.
    """
    if processes < 1:
        raise ValueError(f"`processes` must be at least 1, got {processes}")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        for index in range(processes):
            print(f"process {index + 1}/{processes}", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "benchmarks.module_overhead", *argv, "--json", str(out)]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            reports.append(json.loads(out.read_text()))
    medians = {
        measure: {v: statistics.median(r[measure][v] for r in reports) for v in VARIANTS[1:]}
        for measure in _MEASURES
    }
    return {
        "config": {**reports[0]["config"], "processes": processes},
        "processes": reports,
        "median": medians,
    }


def format_processes(report: dict[str, Any]) -> str:
    """``run_processes``' report as plain text: each measure per process, and its median."""
    cfg = report["config"]
    lines = [
        f"{cfg['processes']} processes of {cfg['repeats']} interleaved repeats, {cfg['epochs']} epochs, "
        f"{cfg['device']}, LossModule nan_policy={cfg['nan_policy']}"
        + (", AdamW(fused=True)" if cfg.get("fused_adamw") else "")
    ]
    for variant in VARIANTS[1:]:
        lines.append(f"{variant} / hand_written - 1, median over processes (per process):")
        for measure in _MEASURES:
            values = " ".join(f"{r[measure][variant]:+.1%}" for r in report["processes"])
            lines.append(f"  {measure:<24}{report['median'][measure][variant]:+.2%}   ({values})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu", help="the Trainer's accelerator: cpu, gpu, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--nan-policy",
        default="raise",
        choices=["raise", "skip", "warn", "ignore"],
        help="LossModule's nan_policy (ignore: no host read per step, which is a sync on a GPU)",
    )
    parser.add_argument(
        "--fused-adamw",
        action="store_true",
        help="AdamW(fused=True) in every variant (with --nan-policy skip, LossModule then reads nothing)",
    )
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--profile", action="store_true", help="also cProfile one run of each variant")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the benchmark in this many fresh processes and report the medians over them",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1:
        if args.profile:
            parser.error("--profile profiles one process: leave out --processes")
        report = run_processes(args.processes, _child_arguments(args))
        print(format_processes(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return report
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available: ..." per run
    with warnings.catch_warnings():
        # "does not have many workers", "GPU available but not used": the same for both variants
        warnings.filterwarnings("ignore", module="lightning")
        report = run_benchmark(
            args.epochs,
            args.warmup_epochs,
            args.repeats,
            args.batch_size,
            args.hidden,
            args.lr,
            args.device,
            args.nan_policy,
            args.fused_adamw,
        )
        print(format_table(report))
        if args.profile:
            data = DigitsDataModule(batch_size=args.batch_size)
            data.setup("fit")
            for variant in VARIANTS:
                print(f"\n=== cProfile: {variant} ===")
                print(profile_training_step(variant, data, args.epochs, args.hidden, args.lr, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _child_arguments(args: argparse.Namespace) -> list[str]:
    """The command line of one process of ``--processes``: every setting of ``args`` but the processes,
    the JSON path and the profile (rebuilt from the parsed values, so abbreviations cannot slip through)."""
    child = [
        *("--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs)),
        *("--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--hidden", str(args.hidden)),
        *("--lr", repr(args.lr), "--device", args.device, "--threads", str(args.threads)),
        *("--nan-policy", args.nan_policy),
    ]
    return [*child, "--fused-adamw"] if args.fused_adamw else child


if __name__ == "__main__":
    main()
