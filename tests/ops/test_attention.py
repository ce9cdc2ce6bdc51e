"""ddps.ops.attention against ddps.reference, forward and backward (the checks it shares with
linear_attention in helpers/attention.py), and its C++ kernel's registration."""
import pytest
import torch

from ddps.kernels._layout import as_heads_like
from ddps.ops import attention
from helpers.attention import AttentionOpChecks, as_token_major, cpu_kernel, qkv_inputs


class TestAttention(AttentionOpChecks):
    op = staticmethod(attention)
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
