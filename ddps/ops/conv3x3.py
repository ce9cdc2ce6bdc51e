"""conv3x3: the denoiser's 3x3 convolution (stride 1, padding 1; the Blocks' weight-standardised
convolutions and the UNet's plain 3x3 ones), most of a UNet forward's FLOPs.

Backends: ``cpu`` (for float32 channels-last activations outside autocast, as in the fused UNet:
Winograd F(2x2, 3x3), csrc/conv3x3/conv3x3.cpp, 2.25x fewer multiply-adds than the direct
convolution; its backward takes dx by the same algorithm and dweight, dbias from torch's
convolution backward; otherwise ``F.conv2d``) and ``reference`` (``F.conv2d``, the original's op).
The Winograd result differs from the direct convolution by float rounding only (tested against a
float64 convolution: no larger error than ``F.conv2d``'s own).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks

IMPLEMENTED = ("cpu", "reference")

# G of F(2x2, 3x3): the weight transform U = G w G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """G w G^T of a [Cout, Cin, 3, 3] weight, computed in float64, as the kernel reads it: float32
    [16, ceil(Cout / 32), Cin, 32], 32-column panels of each position's Cin x Cout matrix, Cout
    padded with zeros. ``conv3x3`` computes it on every call unless given; a caller whose weight
    does not change (inference) computes it once."""
    cout, cin = weight.shape[:2]
    g = weight.new_tensor(_G, dtype=torch.float64)  # made per call: fake tensors (torch.compile) too
    u = torch.einsum("ru,oiuv,sv->rsio", g, weight.detach().to(torch.float64), g).reshape(16, cin, cout)
    panels = -(-cout // 32)
    u = F.pad(u, (0, panels * 32 - cout)).reshape(16, cin, panels, 32).transpose(1, 2)
    return u.to(torch.float32).contiguous()


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            winograd: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for x [B, Cin, H, W], weight [Cout, Cin, 3, 3],
    bias [Cout] or None. ``winograd``: ``winograd_weight(weight)`` when the caller keeps it."""
    _checks.floating(x, "x")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"conv3x3: x must be [B, Cin, H, W] and weight [Cout, Cin, 3, 3], got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"conv3x3: bias must be [Cout={weight.shape[0]}], got shape {tuple(bias.shape)}")
    # No Triton or CUDA kernel (on GPUs cuDNN's convolution is the fast path): DDPS_BACKEND=triton
    # or cuda, meant for the other ops, leaves conv3x3 on its default.
    chosen = _backend.resolve("conv3x3", backend, x.device, IMPLEMENTED, env_optional=True)
    if chosen == "reference" or not _kernel_takes(x, weight, bias):
        return F.conv2d(x, weight, bias, padding=1)
    if winograd is None:
        winograd = winograd_weight(weight)
    elif winograd.shape != (16, -(-weight.shape[0] // 32), weight.shape[1], 32):
        raise ValueError(f"conv3x3: winograd must be winograd_weight(weight), [16, ceil(Cout / 32), Cin={weight.shape[1]}, "
                         f"32], got shape {tuple(winograd.shape)}")
    return torch.ops.ddps.conv3x3(x, weight, winograd, bias)


def _kernel_takes(x, weight, bias) -> bool:
    """The C++ kernel's case: float32 channels-last activations (the fused UNet's), float32
    parameters, and no autocast (under which F.conv2d's casting policy applies)."""
    return (x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and not torch.is_autocast_enabled(x.device.type))


@_backend.register_fake("conv3x3")
def _fake(x, weight, u, bias):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    x, weight, _, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _grads(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = grad.contiguous(memory_format=torch.channels_last)
    dx = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        # The gradient of a stride-1, padding-1 3x3 convolution with respect to its input is the
        # same convolution of grad by the flipped, transposed weight: Winograd again.
        flipped = weight.detach().transpose(0, 1).flip(2, 3)
        dx = torch.ops.ddps.conv3x3(grad, flipped, winograd_weight(flipped), None)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        _, dweight, dbias = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]])
    return dx, dweight, None, dbias


_backend.register_autograd("conv3x3", _grads, _setup_context)
