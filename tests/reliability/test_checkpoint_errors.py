"""A damaged checkpoint file gives one clear error naming the file and the fault, not a deep torch traceback.

Faults injected into a real Lightning checkpoint of a ``LossModule``: cut in half, cut by its last 10 bytes
(the zip directory), empty, one byte flipped inside a weight record, a text file, a missing file. Each is
tried through ``check_checkpoint``, through ``lightning-losses fit/test --ckpt_path`` (in process and,
once, as the console script) and through ``--ckpt_path last`` resolving to a damaged ``last.ckpt``.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_losses import LossModule
from lightning_losses.callbacks import CheckpointError, check_checkpoint
from lightning_losses.cli import main
from tests.helpers import TokenRegressor, TokenSquaredError, quiet_trainer, token_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "digits_cross_entropy.yaml"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint: ``LossModule`` after one optimizer step, saved by the Trainer."""
    torch.manual_seed(0)
    module = LossModule(TokenRegressor(), TokenSquaredError())
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader(token_shards(torch.float32)[:1], batch_size=None))
    path = tmp_path_factory.mktemp("checkpoints") / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


def largest_record_data(path: Path) -> tuple[str, int, int]:
    """(name, offset of its data in the file, size) of the largest tensor storage record."""
    with zipfile.ZipFile(path) as archive:
        storages = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(storages, key=lambda i: i.file_size)
    with path.open("rb") as file:
        file.seek(info.header_offset)
        header = file.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.filename, info.header_offset + 30 + name_length + extra_length, info.file_size


def cut_in_half(data: bytes, path: Path) -> bytes:
    return data[: len(data) // 2]


def cut_the_end(data: bytes, path: Path) -> bytes:
    return data[:-10]


def empty(data: bytes, path: Path) -> bytes:
    return b""


def flip_a_weight_byte(data: bytes, path: Path) -> bytes:
    _, offset, size = largest_record_data(path)
    damaged = bytearray(data)
    damaged[offset + size // 2] ^= 0x10
    return bytes(damaged)


def text_file(data: bytes, path: Path) -> bytes:
    return b"model weights will be here\n"


FAULTS: dict[str, tuple[Callable[[bytes, Path], bytes], str]] = {
    "cut_in_half": (cut_in_half, "is truncated"),
    "cut_the_end": (cut_the_end, "is truncated"),
    "empty": (empty, "is empty"),
    "flipped_byte": (flip_a_weight_byte, "is corrupted: the record"),
    "text_file": (text_file, "is not a PyTorch checkpoint"),
}


def damaged_copy(good: Path, directory: Path, fault: str) -> Path:
    make, _ = FAULTS[fault]
    path = directory / f"{fault}.ckpt"
    path.write_bytes(make(good.read_bytes(), good))
    return path


def test_a_good_checkpoint_passes_and_loads(good_checkpoint):
    assert check_checkpoint(good_checkpoint) == good_checkpoint
    restored = LossModule.load_from_checkpoint(
        good_checkpoint, model=TokenRegressor(), loss=TokenSquaredError()
    )
    assert torch.isfinite(restored.model.linear.weight).all()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_check_checkpoint_names_the_file_and_the_fault(good_checkpoint, tmp_path, fault):
    path = damaged_copy(good_checkpoint, tmp_path, fault)
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and FAULTS[fault][1] in message, message


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nowhere\.ckpt does not exist"):
        check_checkpoint(tmp_path / "nowhere.ckpt")


def test_torch_load_takes_a_flipped_weight_byte_silently(good_checkpoint, tmp_path):
    """Why the CRC check: torch.load does not verify the records' checksums (torch 2.13)."""
    path = damaged_copy(good_checkpoint, tmp_path, "flipped_byte")
    good = tensors(torch.load(good_checkpoint, weights_only=False))
    damaged = tensors(torch.load(path, weights_only=False))
    assert len(good) == len(damaged)
    assert sum(not torch.equal(a, b) for a, b in zip(good, damaged, strict=True)) == 1


def tensors(value: object) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in value for t in tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_cli_ckpt_path_fault_is_one_clear_line(good_checkpoint, tmp_path, fault, subcommand):
    path = damaged_copy(good_checkpoint, tmp_path, fault)
    with pytest.raises(SystemExit) as stop:
        main([subcommand, "--config", str(CONFIG), "--ckpt_path", str(path)])
    message = str(stop.value.code)
    assert message.startswith("lightning-losses: error: checkpoint") or "not a PyTorch checkpoint" in message
    assert str(path) in message and FAULTS[fault][1] in message, message


def test_cli_ckpt_path_last_resolving_to_a_truncated_file(good_checkpoint, tmp_path):
    checkpoints = tmp_path / "runs" / "digits_cross_entropy" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    last = checkpoints / "last.ckpt"
    last.write_bytes(good_checkpoint.read_bytes()[:-10])
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--ckpt_path",
                "last",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            ]
        )
    message = str(stop.value.code)
    assert str(last) in message and "is truncated" in message, message


@pytest.mark.slow
def test_console_script_prints_no_traceback(good_checkpoint, tmp_path):
    path = damaged_copy(good_checkpoint, tmp_path, "cut_in_half")
    script = Path(sys.executable).parent / "lightning-losses"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_losses.cli"]
    result = subprocess.run(
        [*command, "fit", "--config", str(CONFIG), "--ckpt_path", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lightning-losses: error: checkpoint {path} is truncated: {path.stat().st_size} bytes, and the zip "
        "directory that ends a complete checkpoint is missing (File is not a zip file); was the run killed "
        "while saving it?"
    )


@pytest.mark.parametrize("fault", ["cut_in_half", "flipped_byte"])
def test_load_from_checkpoint_names_the_file_and_the_fault(good_checkpoint, tmp_path, fault):
    path = damaged_copy(good_checkpoint, tmp_path, fault)
    with pytest.raises(CheckpointError, match=FAULTS[fault][1]):
        LossModule.load_from_checkpoint(path, model=TokenRegressor(), loss=TokenSquaredError())
