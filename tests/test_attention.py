"""ddps.ops.attention and linear_attention against ddps.reference, forward and backward."""
import pytest
import torch

from ddps import reference
from ddps.ops import attention, linear_attention
from ddps.ops.attention import token_major
from denoiser import DENOISER, assert_matches_reference

SHAPES = [(2, 4, 32, 64), (1, 1, 32, 1), (2, 4, 32, 77), (1, 4, 8, 130)]  # [B, heads, d, N]
IDS = [f"B{b}h{h}d{d}N{n}" for b, h, d, n in SHAPES]
OPS = [(attention, reference.attention), (linear_attention, reference.linear_attention)]
OP_IDS = ["attention", "linear_attention"]


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matches_reference_fp32(backend, op, ref, shape):
    scale = shape[2] ** -0.5
    assert_matches_reference(lambda q, k, v: op(q, k, v, scale, backend=backend), lambda q, k, v: ref(q, k, v, scale),
                             _qkv(shape))


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(backend, op, ref, dtype):
    assert_matches_reference(lambda q, k, v: op(q, k, v, 32 ** -0.5, backend=backend),
                             lambda q, k, v: ref(q, k, v, 32 ** -0.5), _qkv((2, 4, 32, 96)), dtype=dtype)


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
def test_non_contiguous_inputs(backend, op, ref):
    # The qkv conv's output split per head is a strided view, as are slices.
    q, k, v = (x[:, :, :, ::2] for x in _qkv((2, 4, 32, 90)))
    assert not q.is_contiguous()
    torch.testing.assert_close(op(q, k, v, 0.2, backend=backend), ref(q, k, v, 0.2), rtol=1e-5, atol=1e-6)


def _token_major(q, k, v):
    """The three as views of one token-major [B, 3 * heads * d, N] tensor, as a channels-last
    qkv conv gives them (a differentiable copy)."""
    b, h, d, n = q.shape
    qkv = torch.cat((q, k, v), dim=1).reshape(b, 3 * h * d, n).transpose(1, 2).contiguous().transpose(1, 2)
    views = [x.reshape(b, h, d, n) for x in qkv.chunk(3, dim=1)]
    assert token_major(views[0])
    return views


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 32, 77), (3, 2, 8, 64)], ids=["B2h4d32N77", "B3h2d8N64"])
def test_token_major_views(backend, op, ref, dtype, shape):
    scale = shape[2] ** -0.5

    def fused(q, k, v):
        out = op(*_token_major(q, k, v), scale, backend=backend)
        assert out.shape == (shape[0], shape[1] * shape[2], shape[3]) and out.stride(1) == 1  # token-major
        return out

    assert_matches_reference(fused, lambda q, k, v: ref(q, k, v, scale), _qkv(shape), dtype=dtype)


@pytest.mark.parametrize("op", [attention, linear_attention], ids=OP_IDS)
def test_bad_input_is_a_clear_error(op):
    q, k, v = _qkv((1, 2, 8, 5))
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 8, 4\)"):
        op(q, k[..., :4], v, 1.0)
    with pytest.raises(ValueError, match=r"q must be \[B, heads, d, N\]"):
        op(q[0], k[0], v[0], 1.0)
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        op(q, k, v.half(), 1.0)
    with pytest.raises(TypeError, match="q must be float32"):
        op(q.long(), k, v, 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        op(q, k, v, 1.0, backend="gpu")
