"""Backend discovery and choice for the ddps ops.

One resolver for every op: an explicit ``backend=`` argument, else the ``DDPS_BACKEND`` environment
variable, else the compiled extension for the tensor's device (``cpu`` / ``cuda``), else Triton
(CUDA tensors only: on CPU tensors Triton runs only under ``TRITON_INTERPRET=1``, and only when
asked for), else ``reference``. The extension is imported lazily; a missing or broken build gives
one warning and the ops fall back, ``import ddps`` never fails because of it.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from . import _checks

# One vocabulary from the heads down to the ops: "auto" (the resolver's choice; None does the same for
# an op), "reference" (the original's eager ops) or a kernel family. An op asked for a family it
# lacks raises; a module or head passes its backend to every op it runs, each op that lacks the
# family taking its own default, as under DDPS_BACKEND (see preferred).
BACKENDS = ("cpu", "cuda", "triton", "reference")
MODULE_BACKENDS = ("reference", "auto", "cpu", "cuda", "triton")
FAKES: dict[str, object] = {}
IMPLEMENTED: dict[str, tuple[str, ...]] = {}


def implements(op_name: str, backends: tuple[str, ...]) -> tuple[str, ...]:
    """Record which backends ``op_name`` has (for ``preferred``) and return them."""
    IMPLEMENTED[op_name] = backends
    return backends


def check_module_backend(backend: str) -> str:
    """A module's or head's ``backend=``, checked."""
    return _checks.choice(backend, "backend", MODULE_BACKENDS, "a backend")


def preferred(op_name: str, backend: str) -> str | None:
    """The ``backend=`` a module whose backend is ``backend`` passes to ``op_name``: None (the
    resolver's choice) for "auto" and for a kernel family the op lacks, else the backend."""
    return None if backend == "auto" or backend not in IMPLEMENTED[op_name] else backend


def register_fake(op_name: str):
    """Record the fake (meta) implementation of ``ddps::<op_name>``; it is registered with
    torch.library as soon as the extension that defines the schema is loaded."""

    def wrap(fn):
        FAKES[op_name] = fn
        return fn

    return wrap


AUTOGRAD: dict[str, tuple] = {}


def register_autograd(op_name: str, backward, setup_context):
    """Record the autograd formula of ``ddps::<op_name>``, registered with the fakes."""
    AUTOGRAD[op_name] = (backward, setup_context)


@functools.cache
def _load_extension():
    """Return (module or None, reason)."""
    if os.environ.get("DDPS_NO_EXTENSION") == "1":
        return None, "DDPS_NO_EXTENSION=1 is set"
    try:
        module = importlib.import_module("ddps._C")
    except Exception as exc:  # ImportError, or an OSError from a stale .so built for another torch
        return None, f"ddps._C failed to import ({type(exc).__name__}: {exc})"
    for name, fn in FAKES.items():
        torch.library.register_fake(f"ddps::{name}")(fn)
    for name, (backward, setup_context) in AUTOGRAD.items():
        torch.library.register_autograd(f"ddps::{name}", backward, setup_context=setup_context)
    return module, "compiled extension ddps._C loaded"


@functools.cache
def extension():
    """The loaded ``ddps._C`` module, or None (warning once, naming the reason)."""
    module, reason = _load_extension()
    if module is None:
        warnings.warn(
            f"ddps: compiled kernels unavailable, falling back to slower backends: {reason}. "
            "Reinstall with `pip install --no-build-isolation -e .` to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return module


@functools.cache
def _triton_status():
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


def backends() -> dict[str, dict]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str}}``."""
    return {name: dict(entry) for name, entry in _backends().items()}


@functools.cache
def _backends() -> dict[str, dict]:
    # Fixed for the life of the process (the build, the devices and TRITON_INTERPRET's effect on
    # an imported Triton do not change), and asked on every op call with an explicit backend.
    module, reason = _load_extension()
    if module is None:
        cpu, cuda = (False, reason), (False, reason)
    else:
        cpu = (True, reason)
        if not torch._C._dispatch_has_kernel_for_dispatch_key("ddps::q_sample", "CUDA"):
            cuda = (False, "ddps._C was built without CUDA kernels")
        elif not torch.cuda.is_available():
            cuda = (False, "CUDA kernels built, but no CUDA device is visible")
        else:
            cuda = (True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    triton_ok = _triton_status()
    checked = gpu_checks()
    return {
        "cpu": {"available": cpu[0], "reason": cpu[1]},
        "cuda": {"available": cuda[0], "reason": cuda[1], "checked": checked},
        "triton": {"available": triton_ok[0], "reason": triton_ok[1], "checked": checked},
        "reference": {"available": True, "reason": "eager PyTorch, always available"},
    }


def gpu_checks() -> str:
    """Which checks the GPU code of this release has passed, and where: compiled without a GPU in
    CI, and each run of `make gpu-check` on a GPU (device and date), as recorded in
    ddps/gpu_checks.json."""
    import json
    from importlib import resources
    record = json.loads(resources.files("ddps").joinpath("gpu_checks.json").read_text())
    runs = record["executed"]
    executed = "; ".join(f"{r['device']} on {r['date']} ({r['summary']})" for r in runs) if runs else "never"
    return f"compiled {record['compiled']}; executed on a GPU by make gpu-check: {executed}"


# Whether this CPU has AVX-512, for which the C++ kernels of attention and linear_attention are
# register-blocked (16-float vectors, 32 registers). Elsewhere GCC lowers their vectors through
# the stack: on an AVX2 EPYC they ran 12-35x slower than torch's SDPA and the ops' torch
# composites, which the ops then take instead. A constant: torch.compile reads it as one.
WIDE_CPU_VECTORS = torch.backends.cpu.get_cpu_capability() == "AVX512"


# torch.compile runs the resolver once at trace time and keeps its answer: the choice depends on
# the environment and the installed build, not on tensor data.
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str | None, device: torch.device, env_optional: bool = False) -> str:
    """The backend that runs ``op`` on ``device``, among those it implements (``implements``).
    ``env_optional``: a ``DDPS_BACKEND`` naming a backend the op lacks leaves it on its default
    instead of raising (for an op the fused modules call whatever that process-wide choice is)."""
    implemented = IMPLEMENTED[op]
    if backend == "auto":
        backend = None
    requested = backend if backend is not None else os.environ.get("DDPS_BACKEND") or None
    if backend is None and env_optional and requested in BACKENDS and requested not in implemented:
        requested = None
    if requested is not None:
        source = "backend=" if backend is not None else "DDPS_BACKEND="
        if requested not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {source}{requested!r}; choose one of {BACKENDS} or 'auto'")
        if requested not in implemented:
            raise ValueError(f"{op}: backend {source}{requested!r} does not implement this op "
                             f"(it has {implemented})")
        _check_runnable(op, requested, device, source)
        return requested
    if device.type == "cpu" and "cpu" in implemented and extension() is not None:
        return "cpu"
    if device.type == "cuda":
        if "cuda" in implemented and extension() is not None and _backends()["cuda"]["available"]:
            return "cuda"
        if "triton" in implemented and _triton_status()[0]:
            return "triton"
    return "reference"


def _check_runnable(op: str, backend: str, device: torch.device, source: str) -> None:
    if backend == "reference":
        return
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"{op}: {source}{backend!r} cannot run on {device.type} tensors")
        status = _backends()[backend]
        if not status["available"]:
            raise ValueError(f"{op}: {source}{backend!r} is unavailable: {status['reason']}")
        return
    ok, reason = _triton_status()
    if not ok:
        raise ValueError(f"{op}: {source}'triton' is unavailable: {reason}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{op}: {source}'triton' on CPU tensors needs TRITON_INTERPRET=1")
