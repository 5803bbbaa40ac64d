"""Smoke tests of ``python -m benchmarks.scaling`` at tiny sizes (the figures are not checked here, only
that every variant runs, the chunked paths compute the whole-matrix loss and everything is reported), and
the memory model's arithmetic."""

import json
import math

import pytest

from benchmarks.scaling import (
    PAIR_VARIANTS,
    TOKEN_VARIANTS,
    fit_memory_model,
    format_table,
    largest_batch,
    main,
    run_benchmark,
)


def test_in_process_run_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "out.json"
    sizes = ["--token-sizes", "32,64", "--vocab", "20", "--pair-sizes", "16,24,32", "--dim", "4"]
    main(
        [*sizes, "--chunk-size", "5", "--repeats", "2", "--in-process", "--device", "cpu", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out

    assert {(r["variant"], r["n"]) for r in report["token"]} == {
        (v, n) for v in TOKEN_VARIANTS for n in (32, 64)
    }
    for r in report["token"]:
        assert len(r["times_s"]) == 2 and math.isclose(r["us_per_token"], r["time_s"] / r["n"] * 1e6)
    pairwise = {(r["variant"], r["n"]): r for r in report["pairwise"]}
    assert set(pairwise) == {(v, n) for v in PAIR_VARIANTS for n in (16, 24, 32)}
    for (variant, n), r in pairwise.items():
        assert r["time_s"] > 0 and isinstance(r["peak_bytes"], int) and math.isfinite(r["loss"])
        if variant.endswith("_chunked"):  # same inputs (same seed): the same loss as the whole matrix
            assert math.isclose(
                r["loss"], pairwise[variant.removesuffix("_chunked"), n]["loss"], rel_tol=1e-5
            )
    assert set(report["largest_batch"]) == set(PAIR_VARIANTS)
    assert report["config"]["chunk_size"] == 5 and report["config"]["in_process"]
    for name in (*TOKEN_VARIANTS, *PAIR_VARIANTS, "largest batch within 8.0 GiB", "us/token"):
        assert name in printed


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        main(["--pair-variants", "supcon,nope", "--in-process"])


def test_memory_model_recovers_a_quadratic_and_the_largest_batch_is_the_last_that_fits():
    a, b, c = fit_memory_model(
        [100, 200, 400, 800], [5 * n * n + 300 * n + 7000 for n in (100, 200, 400, 800)]
    )
    assert math.isclose(a, 5, rel_tol=1e-9) and math.isclose(b, 300, rel_tol=1e-6)
    budget = 8 * 2**30
    n = largest_batch((a, b, c), 1024.0, budget)

    def total(m):
        return a * m * m + (b + 1024) * m + c

    assert total(n) <= budget < total(n + 1)
    assert fit_memory_model([10, 20, 30], [100.0, 201.0, 300.0])[0] == 0.0  # linear: refitted without N²
    assert largest_batch((1.0, 0.0, 0.0), 0.0, 0.5) == 0


@pytest.mark.slow
def test_isolated_cpu_memory_sees_the_similarity_matrix():
    """In fresh subprocesses: the whole-matrix SupCon holds at least one fp32 [N, N] (16 MiB here), the
    chunked one far less."""
    report = run_benchmark(
        token_sizes=[],
        pair_sizes=[2048],
        dim=32,
        chunk_size=128,
        repeats=1,
        pair_variants=["supcon", "supcon_chunked"],
    )
    peaks = {r["variant"]: r["peak_bytes"] for r in report["pairwise"]}
    assert peaks["supcon"] >= 2048 * 2048 * 4
    assert 0 < peaks["supcon_chunked"] < peaks["supcon"] / 4
    assert "supcon_chunked" in format_table(report)
