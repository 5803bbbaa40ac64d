"""Every config in configs/ parses and round-trips through --print_config."""

from pathlib import Path

import pytest
import yaml

from lightning_losses.cli import build_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 11


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_prints_and_round_trips(config, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(again), "--print_config"])
    assert capsys.readouterr().out == printed
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["loss"]["class_path"] and parsed["data"]["class_path"]
    assert parsed["seed_everything"] == 0 and parsed["trainer"]["logger"]["class_path"].endswith("CSVLogger")
