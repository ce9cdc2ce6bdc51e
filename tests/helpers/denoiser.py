"""Shared checks of the denoiser ops: a fused op against ddps.reference, forward and backward,
with an fp64 run of the reference as the oracle."""
import pytest
import torch

import ddps
from ddps.ops.conv3x3 import bf16_dot

# The backends with a fast path for the denoiser ops that can run here.
DENOISER = [b for b in ("cpu", "triton") if ddps.backends()[b]["available"]]
# The kernels' bfloat16 products (conv3x3, attention) run only where the CPU has AVX512-BF16.
BF16_DOT = pytest.mark.skipif("cpu" not in DENOISER or not bf16_dot(), reason="needs a CPU with AVX512-BF16")


def bf16_ulp(y: torch.Tensor) -> torch.Tensor:
    """One bfloat16 step (8 significant bits) at each value of y, in float64."""
    return 2.0 ** (torch.frexp(y.abs().clamp_min(1e-30))[1].double() - 8)


def device_of(backend: str) -> str:
    """Where a backend's kernels run in this suite: on a GPU, CUDA tensors for triton (compiled,
    natively); else CPU tensors (triton under TRITON_INTERPRET=1, set by conftest.py)."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def on(backend: str, *tensors):
    """The tensors moved to ``device_of(backend)`` (non-tensors as they are)."""
    device = device_of(backend)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _run(fn, inputs, grad_out, device="cpu"):
    inputs = [x.detach().to(device).requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    out.backward(grad_out.to(out.device, out.dtype))
    return out.detach().double().cpu(), [x.grad.double().cpu() if x.grad is not None else None for x in inputs]


def _error(a, b):
    return (a - b).abs().max().item()


def assert_matches_reference(fused, ref, inputs, dtype=torch.float32, rtol=1e-5, device="cpu"):
    """Forward output and input gradients of ``fused`` vs the fp64 reference. float32: max error
    <= rtol * max|oracle| + 1e-6; float16/bfloat16: flash-attention's rule, error <= 2 x the error of the
    reference computed in the same dtype, + an atol: 1e-3 of max|oracle|, and at least half an ulp of
    the dtype there (the rounding of a correctly rounded result: at tiny sizes the reference's own
    roundings can happen to be smaller). ``fused`` runs on ``device`` (``device_of(backend)``), the
    reference on CPU."""
    oracle_out = ref(*[x.double() if x.is_floating_point() else x for x in inputs])
    grad_out = torch.randn(oracle_out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    oracle = _run(ref, [x.double() if x.is_floating_point() else x for x in inputs], grad_out)
    cast = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    got = _run(fused, cast, grad_out, device)
    low = _run(ref, cast, grad_out)
    for name, g, o, l in [("output", got[0], oracle[0], low[0])] + [
            (f"grad of input {i}", gg, oo, ll) for i, (gg, oo, ll) in enumerate(zip(got[1], oracle[1], low[1]))]:
        if o is None:
            continue
        scale = o.abs().max().item()
        atol = max(1e-3, torch.finfo(dtype).eps / 2) * scale
        bound = rtol * scale + 1e-6 if dtype == torch.float32 else 2 * _error(l, o) + atol
        assert _error(g, o) <= bound, f"{name}: error {_error(g, o):.3g} > {bound:.3g}"
