"""Smoke tests of ``python -m benchmarks.module_overhead`` at tiny sizes (the timings are not checked here,
only that every variant trains, is timed and is reported)."""

import json
import math
import statistics

import pytest

from benchmarks.module_overhead import VARIANTS, format_processes, format_table, main


def test_tiny_run_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["--epochs", "2", "--warmup-epochs", "1", "--repeats", "2", "--batch-size", "256", "--hidden", "8"]
    main([*args, "--json", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert [(r["repeat"], r["variant"]) for r in report["runs"]] == [
        (0, "hand_written"),
        (0, "loss_module"),
        (0, "loss_logger"),
        (1, "loss_module"),
        (1, "loss_logger"),
        (1, "hand_written"),
    ]
    for run in report["runs"]:
        assert run["steps"] == 5  # ceil(1257 / 256) steps in the one measured epoch
        assert run["step_time_s"] > 0 and math.isclose(run["steps_per_s"] * run["step_time_s"], 1.0)
        assert 0 < run["fastest_epoch_step_time_s"] <= run["step_time_s"]
        assert 0 < run["p10_step_time_s"] <= run["step_time_s"] * 1.5  # an epoch of 5 steps: 4 intervals
    # the same seed, data order and arithmetic: every variant trains to the same loss
    losses = {r["variant"]: r["final_loss"] for r in report["runs"] if r["repeat"] == 0}
    assert losses["loss_module"] == pytest.approx(losses["hand_written"], rel=1e-6)
    assert losses["loss_logger"] == pytest.approx(losses["hand_written"], rel=1e-6)
    assert set(report["overhead"]) == set(report["paired_overhead"]) == set(VARIANTS[1:])
    assert set(report["fastest_epoch_overhead"]) == set(report["paired_p10_overhead"]) == set(VARIANTS[1:])
    for variant in VARIANTS:
        assert variant in printed
    assert "loss_module / hand_written - 1" in printed
    assert format_table(report) in printed


def test_fused_adamw_with_skip_trains_every_variant_alike(tmp_path):
    out = tmp_path / "out.json"
    args = ["--epochs", "2", "--repeats", "1", "--batch-size", "256", "--hidden", "8", "--fused-adamw"]
    main([*args, "--nan-policy", "skip", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["config"]["fused_adamw"] is True
    losses = {r["variant"]: r["final_loss"] for r in report["runs"]}
    assert losses["loss_module"] == pytest.approx(losses["hand_written"], rel=1e-6)


def test_bad_warmup_is_refused():
    with pytest.raises(ValueError, match="warmup_epochs"):
        main(["--epochs", "1", "--warmup-epochs", "1", "--repeats", "1"])


def test_processes_report_the_median_of_fresh_processes(tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["--epochs", "2", "--repeats", "1", "--batch-size", "256", "--hidden", "8", "--proc", "3"]
    main([*args, "--nan-policy", "ignore", "--json", str(out)])  # `--proc`: argparse takes abbreviations
    report = json.loads(out.read_text())
    assert report["config"]["processes"] == len(report["processes"]) == 3
    for process in report["processes"]:  # each ran once, with the settings given
        config = process["config"]
        assert (config["epochs"], config["batch_size"], config["hidden"]) == (2, 256, 8)
        assert config["nan_policy"] == "ignore" and config["repeats"] == len(process["runs"]) / len(VARIANTS)
    for measure, by_variant in report["median"].items():
        for variant, median in by_variant.items():
            assert median == statistics.median(r[measure][variant] for r in report["processes"])
    assert format_processes(report) in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--processes", "0"], ["--processes", "2", "--profile"]])
def test_bad_processes_are_refused(extra):
    with pytest.raises(SystemExit):
        main(["--epochs", "2", "--repeats", "1", *extra])
