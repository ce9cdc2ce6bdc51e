"""ddps.ops.linear_attention against ddps.reference, forward and backward (the checks it shares
with attention in helpers/attention.py), and its C++ kernel's registration."""
import pytest
import torch

from ddps.ops import linear_attention
from helpers.attention import AttentionOpChecks, as_token_major, cpu_kernel, qkv_inputs


class TestLinearAttention(AttentionOpChecks):
    op = staticmethod(linear_attention)
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
