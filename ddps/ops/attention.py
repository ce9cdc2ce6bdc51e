"""attention: the mid block's softmax attention, in the layouts of the convolutions around it.

Backends: ``triton`` (kernels/attention.py: flash-style forward and backward, any layout the
three share, output token-major when the inputs are), ``cpu`` and ``reference``
(``ddps.reference.attention``). Differentiable on all three.

``cpu``: on CPUs with AVX-512, float32, bfloat16 or float16 views of a channels-last conv's output
(token-major, d a multiple of 16 up to 64: the fused UNet's case; float32 inside) go to the C++
kernels (csrc/attention/: register-blocked scores, softmax and weighted sums per block of query
rows; the backward recomputes the probabilities from the saved log-sum-exp per block of keys for
dk, dv and the head's dS^T, from which dq follows; 2.2x torch's
SDPA forward and fwd+bwd here, whose sgemm is slow on this package's reference CPU). Everything
else runs torch's scaled_dot_product_attention on token-major views (copies where the inputs are
not), the output then token-major too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference
from ..kernels._layout import MAX_D, accumulator, as_heads_like, heads_like, token_major
from . import _common

IMPLEMENTED = _backend.implements("attention", ("cpu", "triton", "reference"))


def split_heads(qkv: torch.Tensor, heads: int):
    """The qkv convolution's output [B, 3 * heads * d, H, W] -> q, k, v: three [B, heads, d, H * W]
    views (token-major when qkv is channels-last)."""
    b, c, h, w = qkv.shape
    return tuple(part.reshape(b, heads, c // (3 * heads), h * w) for part in qkv.chunk(3, dim=1))


def merge_heads(out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """An attention op's output [B, heads * d, N] as [B, heads * d, H, W]. A token-major output is
    viewed through its [B, N, C] memory: reshaping the [B, C, N] view itself gives a one-sample
    batch a batch stride that torch's layout check reads as not channels-last, and the output
    convolution (and its backward) then copies the whole tensor to NCHW first."""
    b, c, _ = out.shape
    if token_major(out):
        return out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return out.reshape(b, c, h, w)


def heads_output(out: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, heads * d, N] laid out token-major (one copy), which a channels-last
    output convolution reads without a reorder."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              backend: str | None = None) -> torch.Tensor:
    """softmax((q * scale)^T k) over keys, applied to v: q, k, v [B, heads, d, N] (the 1x1 qkv
    conv's output viewed per head) -> [B, heads * d, N] (what the output conv reads). Empty inputs
    (B = 0 or N = 0) give an empty output on every backend."""
    return dispatch("attention", q, k, v, scale, backend, _triton, _sdpa)


def dispatch(op, q, k, v, scale, backend, triton, composite):
    """attention's and linear_attention's backends: the reference, ``triton()`` (the op's Triton
    autograd function; heads up to MAX_D[op] wide), the C++ kernel where it takes the inputs, else
    ``composite`` (torch ops, on any device). Under autocast they compute in its dtype, as SDPA and
    matmul do."""
    _checks.heads(q, k, v)
    chosen = _backend.resolve(op, backend, q.device)
    if chosen != "reference":  # the reference's own einsums and matmuls are cast by autocast itself
        q, k, v = (x.to(_common.compute_dtype(x)) for x in (q, k, v))
    if q.numel() == 0:  # no samples or no tokens: an empty output (which the original's reshapes fail on)
        b, h, d, n = q.shape
        # The inputs' sum, so that backward gives each its (empty) gradient.
        return (q + k + v).reshape(b, h * d, n)
    if chosen == "reference":
        return getattr(reference, op)(q, k, v, scale)
    if chosen == "triton" and q.shape[-2] <= MAX_D[op]:
        return triton()(q, k, v, scale)[0]
    if kernel_takes(q, k, v):
        return getattr(torch.ops.ddps, op)(q, k, v, scale)[0]
    return composite(q, k, v, scale)


def _sdpa(q, k, v, scale):
    if token_major(q):  # channels-last qkv conv: SDPA reads the views as they are
        out = F.scaled_dot_product_attention(*(x.transpose(-1, -2) for x in (q, k, v)), scale=scale)
        return heads_output(out)
    out = F.scaled_dot_product_attention(*(x.transpose(-1, -2).contiguous() for x in (q, k, v)), scale=scale)
    return out.transpose(-1, -2).reshape(q.shape[0], -1, q.shape[-1])  # [B, heads * d, N]


def kernel_takes(q, k, v) -> bool:
    """The case of the C++ kernels of attention and linear_attention: token-major views of one
    dtype (float32, bfloat16 or float16), d a multiple of 16 up to 64, on a CPU with AVX-512
    (``_backend.WIDE_CPU_VECTORS``)."""
    d = q.shape[-2]
    return (_backend.WIDE_CPU_VECTORS and q.dtype in _common.LOGIT_DTYPES
            and all(x.dtype == q.dtype and x.stride(-2) == 1 and x.shape == q.shape for x in (q, k, v))
            and d % 16 == 0 and d <= 64 and q.numel() > 0)


@_backend.register_fake("attention")
def _cpu_fake(q, k, v, scale):
    b, h, d, n = q.shape
    return q.new_empty((b, n, h * d)).transpose(1, 2), q.new_empty((b, h, n), dtype=torch.float32)


def _cpu_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


@_backend.register_fake("attention_backward")
def _cpu_backward_fake(grad, q, k, v, out, lse, scale, packed):
    return packed_grads_fake(q, packed)


def packed_grads_fake(q, packed):
    """The C++ backwards' dq, dk, dv (packed: one d(qkv)), laid out token-major."""
    b, h, d, n = q.shape
    if packed:
        return [q.new_empty((b, n, 3 * h * d)).transpose(1, 2)]
    return [q.new_empty((b, n, h, d)).permute(0, 2, 3, 1) for _ in range(3)]


def kernel_backward(grad, q, k, v, outputs, scale, packed):
    """The C++ backward, given the forward's outputs (grad in q's dtype, as the kernel takes it)."""
    out, lse = outputs
    return torch.ops.ddps.attention_backward(as_heads_like(grad.to(q.dtype), q), q, k, v, as_heads_like(out, q), lse,
                                             scale, packed)


def _cpu_backward(ctx, grad, _lse):
    q, k, v, *outputs = ctx.saved_tensors
    return *kernel_backward(grad, q, k, v, outputs, ctx.scale, False), None


_backend.register_autograd("attention", _cpu_backward, _cpu_setup_context)


def _fwd_fake(q, k, v, scale):
    b, h, d, n = q.shape
    return heads_like(q).reshape(b, h * d, n), q.new_empty((b, h, n), dtype=accumulator(q.dtype))


def _bwd_fake(grad, q, k, v, out, lse, scale):
    return heads_like(q), heads_like(q), heads_like(q)


def _triton():
    return _common.triton_autograd("attention", _fwd_fake, _bwd_fake, 3, 0, 1)
