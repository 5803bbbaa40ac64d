import importlib
import sys

import pytest


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI(args=...) warns when pytest's own argv is also present."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


@pytest.fixture
def fused_token_log_probs(monkeypatch):
    """Token log-probabilities through the fused CPU cross-entropy at every size, not just from
    ``FUSED_MIN_ELEMENTS`` logits up."""
    monkeypatch.setattr(
        importlib.import_module("lightning_losses.functional.sequence_policy"), "FUSED_MIN_ELEMENTS", 0
    )
