"""Resume a killed run exactly where it stopped, and refuse damaged checkpoint files with a clear message.

Lightning restores weights, optimizer and scheduler state and the loop counters from a checkpoint, but a
plain ``DataLoader`` restarts a half-finished epoch from its first batch with a new shuffle, and the
random number generators continue from wherever the new process left them. ``ResumableTraining`` closes
both gaps, so a run killed mid-epoch and restarted from its last checkpoint ends with the same weights
as a run that was never interrupted (bit for bit on a deterministic CPU run):

- the training loader becomes a :class:`ResumableLoader`: its shuffling generator's state at the start
  of the epoch and the number of batches it has handed out are saved in the checkpoint (Lightning stores
  the ``state_dict`` of a stateful train loader), and a resumed epoch replays the same order and skips
  the batches already trained on;
- the global RNG states (torch, CUDA, NumPy, ``random``) are saved and set again when training resumes,
  so dropout and other random layers continue the same stream.

Not covered: randomness inside ``DataLoader`` worker processes (augmentations), and runs on more than
one process (Lightning's distributed sampler is only added to a plain ``DataLoader``; there the
callback warns and leaves the loader alone).

:func:`check_checkpoint` reads a checkpoint file's zip structure and the CRC-32 of every record, so a
truncated or corrupted file fails with its name and what is wrong, before ``torch.load`` (which loads a
flipped byte in tensor data silently, and reports a truncated file as a miniz error).
"""

from __future__ import annotations

import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

__all__ = ["CheckpointError", "ResumableLoader", "ResumableTraining", "check_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, empty, truncated, corrupted or not a checkpoint."""


class _MissingCheckpoint(CheckpointError, FileNotFoundError):
    """``check_checkpoint`` of a path that is not a file (also a ``FileNotFoundError``)."""


def check_checkpoint(path: str | Path) -> Path:
    """Check that ``path`` is a complete, undamaged ``torch.save`` file; returns it as a ``Path``.

    Reads the whole file once: the zip central directory (missing when the file was cut short) and the
    CRC-32 of every record (a changed byte anywhere). A file in torch's legacy (pre-1.6, non-zip)
    format is passed through unchecked. Raises :class:`CheckpointError` (a ``ValueError``; for a
    missing file also a ``FileNotFoundError``) naming the file and the fault.

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> good = os.path.join(folder, "good.ckpt")
    >>> torch.save({"w": torch.ones(3)}, good)
    >>> check_checkpoint(good).name
    'good.ckpt'
    >>> cut = os.path.join(folder, "cut.ckpt")
    >>> with open(good, "rb") as src, open(cut, "wb") as dst:
    ...     _ = dst.write(src.read()[:200])
    >>> check_checkpoint(cut)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_losses.callbacks.resume.CheckpointError: checkpoint .../cut.ckpt is truncated: ...
    """
    path = Path(path)
    if not path.is_file():
        raise _MissingCheckpoint(f"checkpoint {path} does not exist (or is not a file)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); was the run killed while saving it?")
    with path.open("rb") as file:
        head = file.read(4)
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, which carries no checksums
        return path
    if head[:2] != b"PK":
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it starts with the bytes {head!r}, not a zip archive "
            "(the format torch.save writes)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record and compares its CRC-32
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated: {size} bytes, and the zip directory that ends a complete "
            f"checkpoint is missing ({error}); was the run killed while saving it?"
        ) from None
    except (OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: the record {damaged!r} fails its CRC-32 check (the bytes "
            "changed after the file was written); use another checkpoint"
        )
    return path


def _shuffle_generators(loader: Any, seed: int | None) -> list[torch.Generator]:
    """The ``torch.Generator`` of each shuffling sampler of ``loader`` (given one when it had none)."""
    samplers: dict[int, Any] = {}
    for sampler in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if sampler is not None and hasattr(sampler, "generator"):
            samplers[id(sampler)] = sampler
    generators: dict[int, torch.Generator] = {}
    for sampler in samplers.values():
        if sampler.generator is None:  # a fresh draw from the global RNG each epoch: not replayable
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            sampler.generator = torch.Generator().manual_seed(seed)
        generators[id(sampler.generator)] = sampler.generator
    return list(generators.values())


class ResumableLoader:
    """A training loader whose position in the epoch Lightning saves in checkpoints and restores.

    Wraps ``loader`` (a ``DataLoader``); its shuffling sampler (anything with a ``generator``
    attribute: ``RandomSampler``, ``WeightedRandomSampler``, ...) gets its own ``torch.Generator``
    (seeded by ``seed``, or by a draw from the global RNG) so that an epoch's order can be replayed. The
    state is the generator's state at the start of the current epoch, its current state and the number
    of batches handed out; after ``load_state_dict`` the next epoch replays that order and skips those
    batches (loading them, without training on them), or, when the epoch was complete, goes on with the
    next one. A sampler with ``set_epoch`` (Lightning calls it each epoch) or a sequential one needs no
    generator.

    >>> from torch.utils.data import DataLoader
    >>> loader = ResumableLoader(DataLoader(list(range(6)), batch_size=2, shuffle=True), seed=0)
    >>> batches = iter(loader)
    >>> first = next(batches)
    >>> state = loader.state_dict()  # saved after one batch
    >>> rest = [b.tolist() for b in batches]
    >>> again = ResumableLoader(DataLoader(list(range(6)), batch_size=2, shuffle=True), seed=123)
    >>> again.load_state_dict(state)
    >>> [b.tolist() for b in again] == rest
    True
    """

    def __init__(self, loader: Any, seed: int | None = None) -> None:
        self.loader = loader
        self._generators = _shuffle_generators(loader, seed)
        self._epoch_start = [g.get_state() for g in self._generators]
        self._handed_out = 0
        self._resume: dict[str, Any] | None = None

    # what Lightning reads from a train loader (length, samplers for `set_epoch`, the dataset)
    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    def __iter__(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            finished = state["batches"] >= len(self.loader)
            for generator, saved in zip(
                self._generators, state["current" if finished else "epoch_start"], strict=True
            ):
                generator.set_state(saved)
            skip = 0 if finished else state["batches"]
        self._epoch_start = [g.get_state() for g in self._generators]
        self._handed_out = skip
        iterator = iter(self.loader)
        for _ in range(skip):
            next(iterator)
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_start": [state.clone() for state in self._epoch_start],
            "current": [g.get_state() for g in self._generators],
            "batches": self._handed_out,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["epoch_start"]) != len(self._generators):
            raise ValueError(
                f"the checkpoint's loader state has {len(state_dict['epoch_start'])} shuffling generator(s), "
                f"this loader {len(self._generators)}: was it saved with another data configuration?"
            )
        self._resume = dict(state_dict)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        name, keys, position, has_gauss, gauss = numpy.random.get_state()
        # as a tensor: `torch.load(weights_only=True)` (LightningCLI reads hparams so) refuses numpy arrays
        states["numpy"] = (name, torch.from_numpy(keys.astype("int64")), position, has_gauss, gauss)
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        name, keys, position, has_gauss, gauss = states["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, gauss))


class ResumableTraining(pl.Callback):
    """Make ``fit(ckpt_path=...)`` after a kill continue exactly as the uninterrupted run would have.

    Wraps the training loader (of the LightningDataModule, or the module's ``train_dataloader``) in a
    :class:`ResumableLoader` and keeps the global RNG states in the checkpoint (restored when training
    resumes). Checkpoint as often as you can afford to lose, e.g.
    ``ModelCheckpoint(every_n_train_steps=50, save_last=True)``; see the module docstring for what is
    not covered.

    Args:
        seed: seeds the shuffling generator of a loader that has none (default: a draw from the global
            RNG, itself seeded by ``seed_everything``).

    YAML: ``trainer.callbacks: [{class_path: lightning_losses.callbacks.ResumableTraining}]``.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng_to_restore: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            rank_zero_warn(
                "ResumableTraining supports one process; with several, the train loader is left alone "
                "(Lightning's distributed sampler) and a resumed epoch restarts from its first batch"
            )
            return
        owner: Any = trainer.datamodule
        if owner is None:
            if not is_overridden("train_dataloader", pl_module):
                raise ValueError(
                    "ResumableTraining wraps the train loader of a LightningDataModule or of the module's "
                    "`train_dataloader`; for a loader passed to `fit` directly, pass "
                    "`ResumableLoader(loader)` instead"
                )
            owner = pl_module
        original = owner.train_dataloader
        if getattr(original, "_resumable", False):
            return
        seed = self.seed

        def train_dataloader() -> Any:
            loader = original()
            return loader if isinstance(loader, ResumableLoader) else ResumableLoader(loader, seed)

        train_dataloader._resumable = True  # type: ignore[attr-defined]
        owner.train_dataloader = train_dataloader

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the sanity check and loader setup, right before the first resumed batch
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
