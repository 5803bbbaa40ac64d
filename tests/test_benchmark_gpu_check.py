"""The prepared device script, ``benchmarks/gpu_check.sh run``, as a dry run on this machine: every step
(the CUDA tests, which skip without CUDA, and the benchmarks at tiny sizes) runs and writes its output,
so that the one device call a GPU session can afford does not fail on a renamed flag or a lost file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "losses", "fused", "fused_bf16", "overhead")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the full checks")
def test_dry_run_writes_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in STEPS:
        log = (tmp_path / f"{step}.txt").read_text()
        assert log.rstrip().endswith(f"== {step}: exit 0"), log[-2000:]
    assert "cuda False" in (tmp_path / "env.txt").read_text()
    assert "skipped" in (tmp_path / "tests.txt").read_text()  # CUDA tests were collected, then skipped
    assert json.loads((tmp_path / "losses.json").read_text())
    assert json.loads((tmp_path / "fused.json").read_text())
    # what a device call brings back: at most 8 files
    assert len(list(tmp_path.iterdir())) <= 8


def test_unknown_verb_is_refused():
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "usage" in result.stderr
