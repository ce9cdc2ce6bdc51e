"""attention and linear_attention on the qkv convolution's whole output [B, 3 * heads * d, H, W]
(q, k, v its three chunks) -> [B, heads * d, H, W]: what the Attention and LinearAttention modules
call. The same ops; in the C++ kernels' case (channels-last qkv) the gradient comes back
as one tensor in qkv's layout, where autograd would otherwise concatenate dq, dk and dv (a copy of
the whole gradient) into a contiguous tensor that the channels-last convolution's backward then
reorders (a second copy)."""
from __future__ import annotations

import torch

from .. import _backend
from ._common import compute_dtype
from .attention import attention, kernel_backward as attention_backward, kernel_takes, merge_heads, \
    split_heads
from .linear_attention import kernel_backward as linear_attention_backward, linear_attention

# op -> (the op, its C++ backward given the forward's outputs)
_OPS = {"attention": (attention, attention_backward),
        "linear_attention": (linear_attention, linear_attention_backward)}


def attention_qkv(qkv: torch.Tensor, heads: int, scale: float, backend: str | None = None) -> torch.Tensor:
    """attention(q, k, v, scale) on qkv [B, 3 * heads * d, H, W] -> [B, heads * d, H, W]."""
    return _on_qkv("attention", qkv, heads, scale, backend)


def linear_attention_qkv(qkv: torch.Tensor, heads: int, scale: float, backend: str | None = None) -> torch.Tensor:
    """linear_attention(q, k, v, scale) on qkv [B, 3 * heads * d, H, W] -> [B, heads * d, H, W]."""
    return _on_qkv("linear_attention", qkv, heads, scale, backend)


def _on_qkv(op, qkv, heads, scale, backend):
    if qkv.dim() != 4 or heads < 1 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"{op}_qkv: qkv must be [B, 3 * heads * d, H, W] with heads={heads}, "
                         f"got shape {tuple(qkv.shape)}")
    q, k, v = split_heads(qkv, heads)
    h, w = qkv.shape[-2:]
    if kernel_takes(q, k, v) and compute_dtype(qkv) == qkv.dtype:
        # Views of one tensor: nothing for the op's input checks to catch. (Where autocast would
        # cast them, the op does that first.)
        backend = _backend.resolve(op, backend, qkv.device)
        if backend == "cpu":
            return merge_heads(_Packed.apply(qkv, heads, scale, op), h, w)
    return merge_heads(_OPS[op][0](q, k, v, scale, backend=backend), h, w)


class _Packed(torch.autograd.Function):
    """An op's C++ kernel with qkv itself as the differentiable input (the kernel writes d(qkv))."""

    @staticmethod
    def forward(ctx, qkv, heads, scale, op):
        outputs = getattr(torch.ops.ddps, op)(*split_heads(qkv, heads), scale)
        ctx.save_for_backward(qkv, *outputs)
        ctx.heads, ctx.scale, ctx.op = heads, scale, op
        return outputs[0]

    @staticmethod
    def backward(ctx, grad):
        qkv, *outputs = ctx.saved_tensors
        dqkv, = _OPS[ctx.op][1](grad, *split_heads(qkv, ctx.heads), outputs, ctx.scale, True)
        return merge_heads(dqkv, *qkv.shape[-2:]), None, None, None
