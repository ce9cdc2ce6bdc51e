"""Backend discovery, choice and graceful degradation without the compiled extension."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddps
from ddps import DiffusionSchedule
from ddps.ops import q_sample

ROOT = Path(__file__).resolve().parents[1]


def test_backends_report_every_backend_with_a_reason():
    status = ddps.backends()
    assert set(status) == {"cpu", "cuda", "triton", "reference"}
    for name, entry in status.items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    assert status["reference"]["available"]
    if not torch.cuda.is_available():
        assert not status["cuda"]["available"]


X = torch.randint(0, 7, (2, 4, 4))
S = DiffusionSchedule(20, 7)


@pytest.mark.parametrize("backend,match", [
    ("fast", r"unknown backend backend='fast'"),
    ("cuda", "'cuda' cannot run on cpu tensors|'cuda' is unavailable"),
])
def test_bad_backend_argument(backend, match):
    with pytest.raises(ValueError, match=match):
        q_sample(X, 3, S, backend=backend)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton"):
        q_sample(X, 3, S, backend="triton")


def test_environment_variable_chooses_and_is_validated(monkeypatch):
    monkeypatch.setenv("DDPS_BACKEND", "reference")
    torch.manual_seed(0)
    a = q_sample(X, 3, S)
    torch.manual_seed(0)
    assert torch.equal(a, ddps.reference.q_pred(X, 3, S))
    monkeypatch.setenv("DDPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="DDPS_BACKEND='gpu'"):
        q_sample(X, 3, S)


def test_default_is_the_compiled_cpu_kernel():
    gen = lambda: torch.Generator().manual_seed(2)
    assert torch.equal(q_sample(X, 3, S, generator=gen()), q_sample(X, 3, S, generator=gen(), backend="cpu"))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("DDPS_BACKEND", None)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          cwd="/", env=full_env, timeout=120)


def test_missing_extension_degrades_with_one_warning():
    code = (
        "import warnings, torch, ddps\n"
        "from ddps import DiffusionSchedule, reference\n"
        "from ddps.ops import q_sample\n"
        "assert not ddps.backends()['cpu']['available']\n"
        "assert 'DDPS_NO_EXTENSION' in ddps.backends()['cpu']['reason']\n"
        "s = DiffusionSchedule(20, 7); x = torch.randint(0, 7, (2, 4, 4))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.manual_seed(1); a = q_sample(x, 3, s); b = q_sample(x, 4, s)\n"
        "torch.manual_seed(1)\n"
        "assert torch.equal(a, reference.q_pred(x, 3, s))\n"
        "msgs = [str(m.message) for m in w if 'compiled kernels unavailable' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print('ok')\n"
    )
    result = _python(code, DDPS_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_triton_kernels_install_inside_the_package_only():
    # A top-level `kernels` may exist, but not ours (transformers 5 depends on Hugging Face's).
    result = _python("import importlib.util, os, ddps.kernels\n"
                     "spec = importlib.util.find_spec('kernels')\n"
                     "ours = os.path.dirname(ddps.kernels.__file__)\n"
                     "assert spec is None or os.path.dirname(spec.origin) != ours, spec\n"
                     "print(ddps.kernels.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ddps.kernels"


def test_backends_say_where_the_gpu_code_was_checked():
    status = ddps.backends()
    checked = status["triton"]["checked"]
    assert checked == status["cuda"]["checked"]
    assert "sm_80, sm_86 and sm_90" in checked and "make cuda-build-check" in checked
    runs = json.loads((Path(ddps.__file__).parent / "gpu_checks.json").read_text())["executed"]
    assert checked.endswith("executed on a GPU by make gpu-check: never") == (not runs)
