"""channel_layer_norm: LayerNorm over the channels of [B, C, H, W] with a gain and no bias (the
original's LayerNorm, used twice per attention block).

Backends: ``triton`` (kernels/channel_layer_norm.py: one pass forward, one backward, contiguous or
channels-last as given), ``cpu`` (channels-last input: torch's layer_norm kernel on the
channel-minor view, one statistics pass instead of the reference's separate mean and variance,
about 1.9x on this package's reference CPU; NCHW: mean and variance over dim 1 in place,
``_strided_channels``) and ``reference`` (``ddps.reference.channel_layer_norm``). Differentiable
on all three.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference
from ..kernels._layout import bcp
from . import _common

IMPLEMENTED = ("cpu", "triton", "reference")


def channel_layer_norm(x: torch.Tensor, g: torch.Tensor, eps: float | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """(x - mean_c) / sqrt(var_c + eps) * g over dim 1: x [B, C, *spatial], g with C elements
    ([1, C, 1, 1] as the module stores it). eps None: 1e-5 for float32, else 1e-3 (the original)."""
    _checks.floating(x, "x")
    _checks.floating(g, "g")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    if g.numel() != x.shape[1]:
        raise ValueError(f"g must have C={x.shape[1]} elements for x of shape {tuple(x.shape)}, got shape "
                         f"{tuple(g.shape)}")
    chosen = _backend.resolve("channel_layer_norm", backend, x.device, IMPLEMENTED)
    if chosen == "reference":
        return reference.channel_layer_norm(x, g, eps)
    eps = reference._norm_eps(x) if eps is None else eps
    if chosen == "triton":
        return _triton()(x, g.reshape(-1), eps)[0]
    # Half-precision inputs are normalised in float32 (as autocast does with layer_norm): torch's
    # half-precision layer_norm backward loses more in the gain's gradient than the reference.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.stride(1) != 1:
        return _strided_channels(x.to(compute), g.to(compute), eps).to(x.dtype)
    last = x.movedim(1, -1).to(compute)
    out = F.layer_norm(last, (x.shape[1],), g.reshape(-1).to(compute), None, eps)
    return out.movedim(-1, 1).to(x.dtype)


def _strided_channels(x, g, eps):
    """The cpu backend where channels are not contiguous (NCHW): reductions over dim 1 in x's own
    layout. layer_norm would need the channels-last view copied in and its output copied back,
    which made it 4.8x slower than this at [1, 256, 128, 128] (AVX2 EPYC; torch's var_mean over
    dim 1 was 2.8x slower)."""
    centred = x - x.mean(dim=1, keepdim=True)
    var = centred.square().mean(dim=1, keepdim=True)
    return centred * (var + eps).rsqrt() * g.reshape(-1, *(1,) * (x.dim() - 2))


def _fwd_fake(x, g, eps):
    x, pixels, _ = bcp(x)
    stat = x.new_empty((x.shape[0], pixels), dtype=torch.float32)
    return torch.empty_like(x), stat, stat.clone()


def _bwd_fake(grad, x, g, mean, rstd):
    return torch.empty_like(bcp(x)[0]), torch.empty_like(g)


def _triton():
    return _common.triton_autograd("channel_layer_norm", _fwd_fake, _bwd_fake, 2, 1, 0)
