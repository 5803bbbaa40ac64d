import sys

import pytest


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI(args=...) warns when pytest's own argv is also present."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
