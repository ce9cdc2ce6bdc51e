import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before Triton
# is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import FIXTURES  # noqa: E402


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


# The CPU dispatch of the attention ops: torch composites, or the C++ kernels that only CPUs with
# AVX-512 take (correct on any CPU, only slower without it), whatever this CPU is.
@pytest.fixture(params=[False, True], ids=["composites", "avx512-dispatch"])
def cpu_dispatch(request, monkeypatch):
    import ddps._backend
    monkeypatch.setattr(ddps._backend, "WIDE_CPU_VECTORS", request.param)
    return request.param


@pytest.fixture
def kernel_dispatch(monkeypatch):
    """The C++ kernels' dispatch alone."""
    import ddps._backend
    monkeypatch.setattr(ddps._backend, "WIDE_CPU_VECTORS", True)
