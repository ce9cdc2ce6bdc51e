"""attention: the mid block's softmax attention, in the layouts of the convolutions around it.

Backends: ``cpu`` (torch's scaled_dot_product_attention on token-major copies: on this package's
reference CPU it is 4x the reference at the mid-block shape, while the same call on the
transposed views is slower than the reference; views of a channels-last conv's output are already
token-major and go in as they are, and the output then comes back token-major too) and
``reference`` (``ddps.reference.attention``). Differentiable on both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference

IMPLEMENTED = ("cpu", "reference")


def token_major(x: torch.Tensor) -> bool:
    """Whether a [B, heads, d, N] view has its d channels adjacent in memory, as the views of a
    channels-last 1x1 conv's output do (then the ops work on tokens and return that layout)."""
    return x.shape[-2] > 1 and x.stride(-2) == 1 and x.shape[-1] > 1


def heads_output(out: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, heads * d, N] laid out token-major (one copy), which a channels-last
    output convolution reads without a reorder."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              backend: str | None = None) -> torch.Tensor:
    """softmax((q * scale)^T k) over keys, applied to v: q, k, v [B, heads, d, N] (the 1x1 qkv
    conv's output viewed per head) -> [B, heads * d, N] (what the output conv reads)."""
    _checks.heads(q, k, v)
    chosen = _backend.resolve("attention", backend, q.device, IMPLEMENTED)
    if chosen == "reference":
        return reference.attention(q, k, v, scale)
    if token_major(q):  # channels-last qkv conv: SDPA reads the views as they are
        out = F.scaled_dot_product_attention(*(x.transpose(-1, -2) for x in (q, k, v)), scale=scale)
        return heads_output(out)
    out = F.scaled_dot_product_attention(*(x.transpose(-1, -2).contiguous() for x in (q, k, v)), scale=scale)
    return out.transpose(-1, -2).reshape(q.shape[0], -1, q.shape[-1])  # [B, heads * d, N]
