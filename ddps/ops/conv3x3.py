"""conv3x3: the denoiser's 3x3 convolution (stride 1, padding 1; the Blocks' weight-standardised
convolutions and the UNet's plain 3x3 ones), most of a UNet forward's FLOPs.

Backends: ``cpu`` (for channels-last activations, as in the fused UNet: Winograd F(2x2, 3x3),
csrc/conv3x3/conv3x3.cpp, 2.25x fewer multiply-adds than the direct convolution; float32, bfloat16
or float16 activations, float32 inside; its backward takes dx by the same algorithm, and dweight
as G^T dU G from dU, the weight's gradient in the Winograd domain, summed over tiles by a second
kernel; dbias is grad's sum; otherwise ``F.conv2d``) and ``reference`` (``F.conv2d``, the original's op).
The Winograd result differs from the direct convolution by float rounding only (tested against a
float64 convolution: no larger error than ``F.conv2d``'s own).

Under ``torch.autocast`` it computes as autocast's ``conv2d`` does (``_common.compute_dtype``): x, weight
and bias in the autocast dtype, output in it; the kernel rounds the weight's transform from the
rounded weight and sums in float32. In bfloat16, on a CPU with AVX512-BF16 (``bf16_dot``), the
products take bfloat16 operands: both transforms are computed in float32 and rounded once to
bfloat16, and AVX512-BF16's dot products sum them in float32, twice the multiply-adds per
instruction; other CPUs keep float32 operands.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from ._common import LOGIT_DTYPES, compute_dtype

IMPLEMENTED = _backend.implements("conv3x3", ("cpu", "reference"))

# G of F(2x2, 3x3): the weight transform U = G w G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _both_axes(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """m t m^T over the first two axes of t [q, q, n]: [p, p, n] for m [p, q]. Two matmuls (einsum
    took 6 ms on a 256 x 256 weight here, these 1); in float32, m's entries (0, +-1/2, 1) scale
    exactly and each result sums at most three terms."""
    with torch.autocast(t.device.type, enabled=False):  # float32 whatever the caller's autocast
        half = torch.matmul(m, t.reshape(t.shape[0], -1)).reshape(m.shape[0], t.shape[1], -1)
        return torch.matmul(m, half)


@functools.cache
def bf16_dot() -> bool:
    """Whether conv3x3 multiplies bfloat16 operands with AVX512-BF16's dot products (vdpbf16ps):
    where the compiled extension finds them in this CPU's cpuid, at run time, unless the
    environment sets DDPS_BF16_DOT=0 (read once, at the first call)."""
    return _backend.extension() is not None and bool(torch.ops.ddps.cpu_bf16_dot())


def winograd_shape(weight: torch.Tensor) -> tuple[int, int, int, int]:
    """The shape of ``winograd_weight(weight)``."""
    cout, cin = weight.shape[:2]
    if weight.dtype == torch.bfloat16 and bf16_dot():
        return 16, -(-cout // 32), -(-cin // 2), 64
    return 16, -(-cout // 32), cin, 32


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """G w G^T of a [Cout, Cin, 3, 3] weight as the kernel reads it: float32
    [16, ceil(Cout / 32), Cin, 32], 32-column panels of each position's Cin x Cout matrix, Cout
    padded with zeros. For a bfloat16 weight where ``bf16_dot()``: rounded to bfloat16, input
    channels in pairs side by side as the dot products take them, [16, ceil(Cout / 32),
    ceil(Cin / 2), 64] (Cin padded with a zero channel). ``conv3x3`` computes it on every call
    unless given; a caller whose weight does not change (inference) computes it once."""
    cout, cin = weight.shape[:2]
    g = weight.new_tensor(_G, dtype=torch.float32)  # made per call: fake tensors (torch.compile) too
    w = weight.detach().to(torch.float32).permute(2, 3, 1, 0).reshape(3, 3, cin * cout)
    u = _both_axes(g, w).reshape(16, cin, cout)
    panels = -(-cout // 32)
    u = F.pad(u, (0, panels * 32 - cout)).reshape(16, cin, panels, 32).transpose(1, 2)
    if winograd_shape(weight)[-1] == 32:
        return u.contiguous()
    u = F.pad(u, (0, 0, 0, cin % 2)).reshape(16, panels, -1, 2, 32).transpose(3, 4)
    return u.reshape(16, panels, -1, 64).to(torch.bfloat16).contiguous()


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            winograd: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for x [B, Cin, H, W], weight [Cout, Cin, 3, 3],
    bias [Cout] or None. ``winograd``: ``winograd_weight(weight.to(compute_dtype(x)))`` when the
    caller keeps it."""
    _checks.floating(x, "x")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"conv3x3: x must be [B, Cin, H, W] and weight [Cout, Cin, 3, 3], got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"conv3x3: bias must be [Cout={weight.shape[0]}], got shape {tuple(bias.shape)}")
    # No Triton or CUDA kernel (on GPUs cuDNN's convolution is the fast path): DDPS_BACKEND=triton
    # or cuda, meant for the other ops, leaves conv3x3 on its default.
    chosen = _backend.resolve("conv3x3", backend, x.device, env_optional=True)
    dtype = compute_dtype(x)
    if chosen == "reference" or not _kernel_takes(x, weight, bias, dtype):
        return F.conv2d(x, weight, bias, padding=1)
    # Autocast's casts, made here (autocast does not see the custom op); no-ops outside it.
    x, weight = x.to(dtype), weight.to(dtype)
    if winograd is None:
        winograd = winograd_weight(weight)
    elif winograd.shape != winograd_shape(weight):
        raise ValueError(f"conv3x3: winograd must be winograd_weight(weight), of shape {winograd_shape(weight)} here, got "
                         f"shape {tuple(winograd.shape)}")
    # The bias is added in float32 before the output's one rounding.
    return torch.ops.ddps.conv3x3(x, weight, winograd, None if bias is None else bias.to(dtype).float())


def _kernel_takes(x, weight, bias, dtype) -> bool:
    """The C++ kernel's case: channels-last activations (the fused UNet's), computed in float32,
    bfloat16 or float16, with parameters of that dtype (or any, under autocast, which casts them)."""
    params_match = torch.is_autocast_enabled(x.device.type) or (
        weight.dtype == dtype and (bias is None or bias.dtype == dtype))
    return (dtype in LOGIT_DTYPES
            and x.is_contiguous(memory_format=torch.channels_last) and weight.dtype.is_floating_point
            and params_match)


@_backend.register_fake("conv3x3")
def _fake(x, weight, u, bias):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    x, weight, _, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _grads(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    dx = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        # The gradient of a stride-1, padding-1 3x3 convolution with respect to its input is the
        # same convolution of grad by the flipped, transposed weight: Winograd again.
        flipped = weight.detach().transpose(0, 1).flip(2, 3)
        dx = torch.ops.ddps.conv3x3(grad, flipped, winograd_weight(flipped), None)
    if ctx.needs_input_grad[1]:
        dweight = _weight_grad(torch.ops.ddps.conv3x3_weight_grad(grad, x), weight)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = grad.sum(dim=(0, 2, 3), dtype=torch.float32)
    return dx, dweight, None, dbias


def _weight_grad(du: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weight's gradient G^T dU G from the kernel's dU [16, Cin, Cout], laid out as weight."""
    cin, cout = du.shape[1:]
    dw = _both_axes(du.new_tensor(_G).T, du.reshape(4, 4, cin * cout))
    return torch.empty_like(weight).copy_(dw.reshape(3, 3, cin, cout).permute(3, 2, 0, 1))


@_backend.register_fake("conv3x3_weight_grad")
def _weight_grad_fake(grad, x):
    return x.new_empty((16, x.shape[1], grad.shape[1]), dtype=torch.float32)


_backend.register_autograd("conv3x3", _grads, _setup_context)
