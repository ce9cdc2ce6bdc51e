"""channel_layer_norm: LayerNorm over the channels of [B, C, H, W] with a gain and no bias (the
original's LayerNorm, used twice per attention block).

Backends: ``triton`` (kernels/channel_layer_norm.py: one pass forward, one backward, contiguous or
channels-last as given), ``cpu`` and ``reference`` (``ddps.reference.channel_layer_norm``).
Differentiable on all three.

``cpu``: channels-last input goes to torch's layer_norm kernel on the channel-minor view (one
statistics pass instead of the reference's separate mean and variance, about 1.9x on this
package's reference CPU). Channel-major input (NCHW: a user's own model's) of float32, bfloat16
or float16 goes to the C++ kernel (csrc/channel_layer_norm/: per tile of pixels, one pass over
the channels' rows for the statistics and one for y; backward likewise): layer_norm would need
the channels-last view copied in and its output copied back, and the same math in torch ops over
dim 1 makes five passes. float64 and empty inputs take layer_norm. Channels-last half-precision
x asked for in its own dtype (``dtype=``, as the fused UNet asks under autocast) takes torch's
mixed-precision layer_norm: float32 inside, no float32 copy of x or of the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference
from ..kernels._layout import bcp
from . import _common

IMPLEMENTED = _backend.implements("channel_layer_norm", ("cpu", "triton", "reference"))


def channel_layer_norm(x: torch.Tensor, g: torch.Tensor, eps: float | None = None,
                       backend: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x - mean_c) / sqrt(var_c + eps) * g over dim 1: x [B, C, *spatial], g with C elements
    ([1, C, 1, 1] as the module stores it). eps None: 1e-5 for float32, else 1e-3 (the original).
    dtype: the output's, the reference's result type rounded once to it (None: that type); for a
    caller that rounds the output anyway, as a convolution under autocast does, which saves the
    wider tensor (on the CPU, channels-last half-precision x is then normalised by torch's
    mixed-precision layer_norm, float32 inside, with no float32 copy of x or of the output)."""
    _checks.floating(x, "x")
    _checks.floating(g, "g")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    if g.numel() != x.shape[1]:
        raise ValueError(f"g must have C={x.shape[1]} elements for x of shape {tuple(x.shape)}, got shape "
                         f"{tuple(g.shape)}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    chosen = _backend.resolve("channel_layer_norm", backend, x.device)
    if chosen == "reference":
        out = reference.channel_layer_norm(x, g, eps)
        return out if dtype is None else out.to(dtype)
    eps = reference._norm_eps(x) if eps is None else eps
    if chosen == "cpu" and dtype == x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 and x.numel() > 0:
        last = x.movedim(1, -1)
        return F.layer_norm(last, (x.shape[1],), g.reshape(-1).float(), None, eps).movedim(-1, 1)
    out = _in_result_type(x, g, eps, chosen)
    return out if dtype is None else out.to(dtype)


def _in_result_type(x: torch.Tensor, g: torch.Tensor, eps: float, chosen: str) -> torch.Tensor:
    # The reference's result type (a half-precision x with a float32 gain, under autocast:
    # float32), normalised from x in that type rather than rounded to x's first.
    x = x.to(torch.promote_types(x.dtype, g.dtype))
    if chosen == "triton":
        return _triton()(x, g.reshape(-1), eps)[0]
    if _kernel_takes(x):
        # The gain in float32 whatever x's dtype, as the kernel computes.
        return torch.ops.ddps.channel_layer_norm(x.contiguous(), g.reshape(-1).float().contiguous(), eps)[0]
    # Half-precision inputs are normalised in float32 (as autocast does with layer_norm): torch's
    # half-precision layer_norm backward loses more in the gain's gradient than the reference.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    last = x.movedim(1, -1).to(compute)
    out = F.layer_norm(last, (x.shape[1],), g.reshape(-1).to(compute), None, eps)
    return out.movedim(-1, 1).to(x.dtype)


def _kernel_takes(x) -> bool:
    """The C++ kernel's case: channels not the minor dim (a strided view is made contiguous
    first), float32, bfloat16 or float16, not empty."""
    return x.dim() >= 3 and x.stride(1) != 1 and x.dtype in _common.LOGIT_DTYPES and x.numel() > 0


@_backend.register_fake("channel_layer_norm")
def _cpu_fake(x, g, eps):
    stat = x.new_empty((x.shape[0], x.numel() // max(x.shape[0] * x.shape[1], 1)), dtype=torch.float32)
    return torch.empty_like(x), stat, stat.clone()


@_backend.register_fake("channel_layer_norm_backward")
def _cpu_backward_fake(grad, x, g, mean, rstd):
    return torch.empty_like(x), torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    x, g, _ = inputs
    ctx.save_for_backward(x, g, output[1], output[2])


_backend.register_autograd(
    "channel_layer_norm",
    lambda ctx, grad, _mean, _rstd: (*torch.ops.ddps.channel_layer_norm_backward(grad.contiguous(),
                                                                                 *ctx.saved_tensors), None),
    _setup_context)


def _fwd_fake(x, g, eps):
    x, pixels, _ = bcp(x)
    stat = x.new_empty((x.shape[0], pixels), dtype=torch.float32)
    return torch.empty_like(x), stat, stat.clone()


def _bwd_fake(grad, x, g, mean, rstd):
    return torch.empty_like(bcp(x)[0]), torch.empty_like(g)


def _triton():
    return _common.triton_autograd("channel_layer_norm", _fwd_fake, _bwd_fake, 2, 1, 0)
