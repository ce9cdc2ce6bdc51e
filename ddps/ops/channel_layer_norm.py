"""channel_layer_norm: LayerNorm over the channels of [B, C, H, W] with a gain and no bias (the
original's LayerNorm, used twice per attention block).

Backends: ``cpu`` (torch's layer_norm kernel on the channels-last view: one statistics pass
instead of the reference's separate mean and variance, about 1.9x on this package's reference
CPU) and ``reference`` (``ddps.reference.channel_layer_norm``). Differentiable on both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference

IMPLEMENTED = ("cpu", "reference")


def channel_layer_norm(x: torch.Tensor, g: torch.Tensor, eps: float | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """(x - mean_c) / sqrt(var_c + eps) * g over dim 1: x [B, C, *spatial], g with C elements
    ([1, C, 1, 1] as the module stores it). eps None: 1e-5 for float32, else 1e-3 (the original)."""
    _checks.floating(x, "x")
    _checks.floating(g, "g")
    if x.dim() < 2 or g.numel() != x.shape[1]:
        raise ValueError(f"g must have C={x.shape[1] if x.dim() > 1 else '?'} elements for x of shape "
                         f"{tuple(x.shape)}, got shape {tuple(g.shape)}")
    chosen = _backend.resolve("channel_layer_norm", backend, x.device, IMPLEMENTED)
    if chosen == "reference":
        return reference.channel_layer_norm(x, g, eps)
    eps = reference._norm_eps(x) if eps is None else eps
    # Half-precision inputs are normalised in float32 (as autocast does with layer_norm): torch's
    # half-precision layer_norm backward loses more in the gain's gradient than the reference.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    last = x.movedim(1, -1).to(compute)
    out = F.layer_norm(last, (x.shape[1],), g.reshape(-1).to(compute), None, eps)
    return out.movedim(-1, 1).to(x.dtype)
