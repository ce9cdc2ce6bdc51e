import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def official():
    return torch.load(FIXTURES / "official_visible.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_heads():
    return torch.load(FIXTURES / "official_head_visible.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests choose backends explicitly; a DDPS_BACKEND left in the caller's shell must not leak in.
    monkeypatch.delenv("DDPS_BACKEND", raising=False)
