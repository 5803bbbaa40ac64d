"""Smoke tests of ``python -m benchmarks.fused_linear`` at tiny sizes (the figures are not checked here,
only that every variant runs, computes the same loss as its pair and is reported)."""

import json
import math

import pytest

from benchmarks.fused_linear import PAIRS, format_table, main, run_benchmark


def test_in_process_run_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "out.json"
    sizes = ["--n", "48", "--hidden", "8", "--vocab", "40", "--repeats", "2", "--chunk-size", "16"]
    main([*sizes, "--in-process", "--device", "cpu", "--pairs", ",".join(PAIRS), "--json", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    variants = {r["variant"]: r for r in report["results"]}
    assert set(variants) == {v for pair in PAIRS.values() for v in pair}
    for unfused, fused in PAIRS.values():
        assert math.isclose(variants[fused]["loss"], variants[unfused]["loss"], rel_tol=1e-5)
        for name in (unfused, fused):
            assert variants[name]["time_s"] > 0 and len(variants[name]["times_s"]) == 2
            assert isinstance(variants[name]["peak_bytes"], int)
            assert name in printed
    assert set(report["ratios"]) == set(PAIRS)
    assert report["config"]["chunk_size"] == 16 and report["config"]["in_process"]
    assert "fused/unfused time" in printed


def test_unknown_pair_is_refused():
    with pytest.raises(SystemExit):
        main(["--pairs", "ce,nope", "--in-process"])


@pytest.mark.slow
def test_isolated_cpu_memory_sees_the_logits():
    """In fresh subprocesses: the unfused path's peak holds at least its fp32 logits [N, V] (32 MiB here),
    the fused one's far less."""
    report = run_benchmark(
        n=2048, hidden=32, vocab=4096, repeats=1, chunk_size=256, pairs=["ce"], device="cpu"
    )
    peaks = {r["variant"]: r["peak_bytes"] for r in report["results"]}
    assert peaks["unfused_ce"] >= 2048 * 4096 * 4
    assert 0 < peaks["fused_ce"] < peaks["unfused_ce"] / 4
    assert "unfused_ce" in format_table(report)
