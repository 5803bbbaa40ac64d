from importlib.metadata import EntryPoint

import pytest
import torch
from torch import nn

from lightning_losses import registry
from lightning_losses.losses import CrossEntropyLoss, MSELoss
from lightning_losses.registry import available_losses, build_loss, get_loss, register_loss


def test_every_spec_form_builds():
    assert isinstance(build_loss("cross_entropy"), CrossEntropyLoss)
    guide = build_loss({"name": "cross_entropy", "params": {"label_smoothing": 0.1}})
    assert guide.label_smoothing == 0.1
    cli = build_loss({"class_path": "lightning_losses.losses.MSELoss"})
    assert isinstance(cli, MSELoss)
    assert isinstance(build_loss("torch.nn.L1Loss"), nn.L1Loss)
    module = nn.SmoothL1Loss()
    assert build_loss(module) is module
    assert build_loss("cross_entropy", ignore_index=3).ignore_index == 3


def test_unknown_names_and_parameters_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"unknown loss name 'cross_entropyy'; known losses: .*cross_entropy.*mse"
    ):
        build_loss({"name": "cross_entropyy"})
    with pytest.raises(ValueError, match=r"cannot build the loss 'mse' with parameters \['gamma'\]"):
        build_loss({"name": "mse", "params": {"gamma": 2.0}})
    with pytest.raises(ValueError, match="needs 'name'"):
        build_loss({"params": {}})
    with pytest.raises(ValueError, match=r"unknown keys \['parms'\]"):
        build_loss({"name": "mse", "parms": {}})
    with pytest.raises(ValueError, match="cannot import the loss class_path 'torch.nn.NoSuchLoss'"):
        build_loss({"class_path": "torch.nn.NoSuchLoss"})
    with pytest.raises(TypeError, match="a loss spec must be"):
        build_loss(3)


def test_names_are_unique():
    with pytest.raises(ValueError, match="the loss name 'mse' is taken"):
        register_loss("mse")(nn.L1Loss)
    assert register_loss("mse")(MSELoss) is MSELoss  # the same class again is fine


def test_entry_points_add_names(monkeypatch):
    entry = EntryPoint(name="plugin_l1", value="torch.nn:L1Loss", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [entry] if group == registry.ENTRY_POINT_GROUP else []
    )
    monkeypatch.setitem(registry._loaded, "entry_points", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert get_loss("plugin_l1") is nn.L1Loss
    assert "plugin_l1" in available_losses()
    assert isinstance(build_loss({"name": "plugin_l1", "params": {"reduction": "sum"}}), nn.L1Loss)


def test_guide_scalar_weight_scales_the_loss():
    logits, target = torch.randn(5, 3), torch.randint(0, 3, (5,))
    plain = CrossEntropyLoss()(logits, target).loss
    scaled = build_loss({"name": "cross_entropy", "params": {"weight": 2.0}})(logits, target).loss
    torch.testing.assert_close(scaled, 2 * plain)
    weighted = build_loss("cross_entropy", weight=[1.0, 2.0, 3.0])(logits, target).loss
    torch.testing.assert_close(
        weighted, torch.nn.functional.cross_entropy(logits, target, torch.tensor([1.0, 2.0, 3.0]))
    )
