"""ddps.ops.linear_attention against ddps.reference, forward and backward (the checks it shares
with attention in helpers/attention.py), its C++ kernel's registration, and the kernel's
bfloat16 products on a CPU with AVX512-BF16."""
import pytest
import torch

from ddps.ops import linear_attention
from helpers.attention import AttentionOpChecks, as_token_major, cpu_kernel, qkv_inputs


def _emulated(q, k, v, scale, rounded=True):
    """The bfloat16 products' linear attention in float64: k's coefficients exp(k - max over
    tokens) rounded once to bfloat16 for their products with v (their sums unrounded), the scaled
    context and q's softmax over d each rounded once for their product (or none of it rounded);
    and the size of the terms summed per output. The kernel's output is this rounded to bfloat16 on
    99.99-100% of the elements at KERNEL_SHAPES and [1, 4, 32, 16384], within 0.5-0.68 bfloat16
    steps of the terms (none of the roundings: 59-77%), measured."""
    q, k, v = (t.double() for t in (q, k, v))
    once = (lambda t: t.bfloat16().double()) if rounded else (lambda t: t)
    coef = torch.exp(k - k.amax(-1, keepdim=True))
    context = torch.einsum("bhdn,bhen->bhde", once(coef), v) * scale / k.shape[-1] / coef.sum(-1)[..., None]
    weights, context = once(torch.softmax(q, dim=2)), once(context)
    out = torch.einsum("bhdn,bhde->bhen", weights, context)
    terms = torch.einsum("bhdn,bhde->bhen", weights, context.abs())
    b, h, d, n = out.shape
    return out.reshape(b, h * d, n), terms.reshape(b, h * d, n)


class TestLinearAttention(AttentionOpChecks):
    op = staticmethod(linear_attention)
    emulated = staticmethod(_emulated)
    # N > 1024 spans several of the kernel's token ranges (summed in a fixed order)
    KERNEL_SHAPES = [(1, 2, 16, 2500), (2, 1, 48, 1030), (1, 3, 64, 17)]
    THREADS_N = 2100


@cpu_kernel
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_opcheck(packed, dtype):
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in as_token_major(*qkv_inputs((2, 2, 32, 40))))
    torch.library.opcheck(torch.ops.ddps.linear_attention.default, (q, k, v, 0.3))
    out, *saved = (t.detach() for t in torch.ops.ddps.linear_attention(q, k, v, 0.3))
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.ddps.linear_attention_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), *saved, 0.3, packed))
