"""ddps.ops.attention against ddps.reference, forward and backward (the checks it shares with
linear_attention in helpers/attention.py), its C++ kernel's registration, and the kernel's
bfloat16 products on a CPU with AVX512-BF16."""
import pytest
import torch

from ddps.kernels._layout import as_heads_like
from ddps.ops import attention
from helpers.attention import AttentionOpChecks, as_token_major, cpu_kernel, qkv_inputs


def _emulated(q, k, v, scale, rounded=True):
    """The bfloat16 products' attention in float64: exact scores of the bfloat16 inputs, the
    softmax's numerators P (rounded once to bfloat16 for their products with v, or not), over the
    unrounded numerators' sum; and the size of the terms summed per output (for a bound on the
    float32 sums' error where the output cancels). The kernel's output is this rounded to bfloat16
    on 99.76-100% of the elements at KERNEL_SHAPES (unrounded numerators: 59-72%), measured."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bhdn,bhdm->bhnm", q, k) * scale
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = p.bfloat16().double() if rounded else p
    total = p.sum(-1)[:, :, None, :]
    out = torch.einsum("bhnm,bhdm->bhdn", weights, v) / total
    terms = torch.einsum("bhnm,bhdm->bhdn", weights, v.abs()) / total
    b, h, d, n = out.shape
    return out.reshape(b, h * d, n), terms.reshape(b, h * d, n)


class TestAttention(AttentionOpChecks):
    op = staticmethod(attention)
    emulated = staticmethod(_emulated)
    # query blocks of 12 rows (6 for d > 32) with the last one partial, key blocks of 32 and a
    # last vector of N % 16 keys (its backward is torch's, from the kernel's output and lse)
    KERNEL_SHAPES = [(1, 2, 16, 3), (2, 1, 48, 37), (1, 3, 64, 130), (1, 4, 32, 1030)]
    THREADS_N = 300


@cpu_kernel
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_opcheck(packed, dtype):
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in as_token_major(*qkv_inputs((2, 2, 32, 40))))
    torch.library.opcheck(torch.ops.ddps.attention.default, (q, k, v, 0.3))
    out, lse = torch.ops.ddps.attention(q, k, v, 0.3)
    grad = torch.randn_like(out.detach())
    torch.library.opcheck(torch.ops.ddps.attention_backward.default,
                          (as_heads_like(grad, q), q.detach(), k.detach(), v.detach(), as_heads_like(out.detach(), q),
                           lse.detach(), 0.3, packed))


def test_gradient_layout_copied_only_where_it_differs():
    # A token-major gradient whose only odd stride is a one-sample batch's is used in place; the
    # same strides at B = 2 address other elements, and the gradient is copied to q's layout.
    for b, in_place in ((1, True), (2, False)):
        q = torch.randn(b, 300, 2, 32).permute(0, 2, 3, 1)  # [B, heads, d, N], token-major
        grad = torch.randn(b + 1, 300, 2, 32).permute(0, 2, 3, 1)[:b]
        grad = grad.as_strided(grad.shape, (grad.stride(0) + 7, *grad.stride()[1:]))  # another batch stride
        got = as_heads_like(grad, q)
        assert (got.data_ptr() == grad.data_ptr()) == in_place
        assert got.stride()[1:] == q.stride()[1:]
        assert torch.equal(got, grad)
