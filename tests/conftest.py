import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before Triton
# is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
