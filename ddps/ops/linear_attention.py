"""linear_attention: the original LinearAttention core (SPEC §4).

Backends: ``triton`` (kernels/linear_attention.py: a streaming pass for the d x d context and one
for the output; backward likewise; float32 inside, any layout the three share), ``cpu`` and
``reference`` (``ddps.reference.linear_attention``). Differentiable on all three.

``cpu``: on CPUs with AVX-512, float32, bfloat16 or float16 views of a channels-last conv's output
(token-major, d a multiple of 16 up to 64: the fused UNet's case; float32 inside) go to the C++
kernel (csrc/linear_attention/: one pass over the tokens for the d x d context, one for the
output, in memory order), and the output comes back token-major.
Everything else runs the same math in torch ops, with the scalings q * scale and v / N folded into
the d x d context and batched matmuls instead of einsum, sample by sample on views of an NCHW qkv
(on token-major views torch's softmax over strided tokens and the matmuls' copies make that
slower than the reference, hence the kernel).
"""
from __future__ import annotations

import torch

from .. import _backend
from ..kernels._layout import as_heads_like, block_d, heads_like, token_major
from . import _common
from .attention import IMPLEMENTED as ATTENTION_BACKENDS, dispatch, heads_output, packed_grads_fake

IMPLEMENTED = _backend.implements("linear_attention", ATTENTION_BACKENDS)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     backend: str | None = None) -> torch.Tensor:
    """q softmax over d, k softmax over tokens, context = k v^T / N, out = context^T q * scale:
    q, k, v [B, heads, d, N] -> [B, heads * d, N]. Empty inputs (B = 0 or N = 0) give an empty
    output on every backend."""
    return dispatch("linear_attention", q, k, v, scale, backend, _triton, _composite)


def _composite(q, k, v, scale):
    if token_major(q):
        return _linear_attention_tokens(q, k, v, scale)
    if q.shape[0] > 1 and not all(x.is_contiguous() for x in (q, k, v)):
        # Views of an NCHW qkv tensor: each sample's [h, d, N] is contiguous, the batch is not, and
        # softmax and matmul would copy all of q, k and v first. Sample by sample, one copy of the
        # output instead: 2.5x faster at [4, 4, 32, 16384] (AVX2 EPYC).
        return torch.cat([_composite(*(x[i:i + 1] for x in (q, k, v)), scale) for i in range(q.shape[0])])
    context = torch.matmul(k.softmax(dim=-1), v.transpose(-1, -2)) * (scale / q.shape[-1])  # [B, h, d, e]
    out = torch.matmul(context.transpose(-1, -2), q.softmax(dim=-2))  # [B, h, e, N]
    return out.reshape(q.shape[0], -1, q.shape[-1])


def _linear_attention_tokens(q, k, v, scale):
    """The same on token-major views (channels-last qkv), without transposing copies of the
    inputs; the output comes back token-major."""
    q, k, v = (x.permute(0, 3, 1, 2) for x in (q, k, v))  # [B, N, h, d]
    # exp(k - max) is normalised in the d x d context instead of over the [N, d] tensor; the
    # shift is a constant for autograd, as inside softmax.
    k_exp = (k - k.detach().amax(dim=1, keepdim=True)).exp()
    norm = (scale / q.shape[1] / k_exp.sum(dim=1)).unsqueeze(-1)  # [B, h, d, 1]
    # One sample at a time: [h, d, N] and [h, N, e] views of a sample are strided batches that
    # matmul takes as they are; batched over [B, h] they would be copied first.
    out = []
    for qb, kb, vb, nb in zip(q, k_exp, v, norm):
        context = torch.matmul(kb.permute(1, 2, 0), vb.transpose(0, 1)) * nb  # [h, d, e]
        out.append(torch.matmul(qb.softmax(dim=-1).transpose(0, 1), context))  # [h, N, e]
    return heads_output(torch.stack(out))


@_backend.register_fake("linear_attention")
def _cpu_fake(q, k, v, scale):
    b, h, d, n = q.shape
    stats = q.new_empty((b, h, d), dtype=torch.float32)
    return (q.new_empty((b, n, h * d)).transpose(1, 2), q.new_empty((b, h, d, d), dtype=torch.float32), stats,
            stats.clone())


@_backend.register_fake("linear_attention_backward")
def _cpu_backward_fake(grad, q, k, v, context, kmax, ksum, scale, packed):
    return packed_grads_fake(q, packed)


def _cpu_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def kernel_backward(grad, q, k, v, outputs, scale, packed):
    """The C++ backward, given the forward's outputs (out itself is not read). grad goes in as
    heads * d channels contiguous per token, in q's dtype: the output's layout, which is
    heads_like(q)'s for the views the kernel takes."""
    _out, context, kmax, ksum = outputs
    return torch.ops.ddps.linear_attention_backward(as_heads_like(grad.to(q.dtype), q).reshape(grad.shape), q, k, v,
                                                    context, kmax, ksum, scale, packed)


def _cpu_backward(ctx, grad, _context, _kmax, _ksum):
    q, k, v, *outputs = ctx.saved_tensors
    return *kernel_backward(grad, q, k, v, outputs, ctx.scale, False), None


_backend.register_autograd("linear_attention", _cpu_backward, _cpu_setup_context)


def _fwd_fake(q, k, v, scale):
    b, h, d, n = q.shape
    padded = block_d(d)
    return (heads_like(q).reshape(b, h * d, n), q.new_empty((b * h, padded, padded), dtype=torch.float32),
            q.new_empty((b * h, padded), dtype=torch.float32))


def _bwd_fake(grad, q, k, v, context, lse, scale):
    return heads_like(q), heads_like(q), heads_like(q)


def _triton():
    return _common.triton_autograd("linear_attention", _fwd_fake, _bwd_fake, 3, 1, 1)
