"""ddps.ops.attention_qkv and linear_attention_qkv (ddps/ops/qkv.py): attention and
linear_attention on the qkv convolution's whole output, as the Attention and LinearAttention
modules call them: against the reference, under autocast, the C++ kernels' one-gradient path, bad
and empty input."""
import pytest
import torch

from ddps import reference
from ddps.ops import attention, attention_qkv, linear_attention, linear_attention_qkv
from ddps.ops import qkv as qkv_module
from helpers.attention import cpu_kernel, qkv_inputs
from helpers.denoiser import DENOISER, assert_matches_reference, device_of, on

QKV_OPS = [(attention_qkv, attention), (linear_attention_qkv, linear_attention)]
QKV_IDS = ["attention_qkv", "linear_attention_qkv"]
_PACKED_APPLY = qkv_module._Packed.apply
# [B, 3 * heads * d, H, W], heads: one shape with a partial vector of tokens everywhere, and one of
# 1230 tokens, past linear_attention's C++ token range of 1024 (the Triton interpreter takes a
# smaller one: it spends a minute there on what the shape does not change for it)
SHAPES = {"B2h4d32": ((2, 3 * 4 * 32, 9, 7), 4), "B1h2d16N1230": ((1, 3 * 2 * 16, 41, 30), 2),
          "B1h2d16N143": ((1, 3 * 2 * 16, 13, 11), 2)}
CASES = [(b, s) for b in [*DENOISER, "reference"] for s in SHAPES
         if s != ("B1h2d16N1230" if b == "triton" and device_of(b) == "cpu" else "B1h2d16N143")]


def _split_reference(op, qkv, heads, scale):
    b, _, h, w = qkv.shape
    q, k, v = (x.reshape(b, heads, -1, h * w) for x in qkv.chunk(3, dim=1))
    return getattr(reference, op.__name__)(q, k, v, scale).reshape(b, -1, h, w)


@pytest.mark.parametrize("backend,shape_id", CASES, ids=[f"{b}-{s}" for b, s in CASES])
@pytest.mark.parametrize("op_qkv,op", QKV_OPS, ids=QKV_IDS)
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_matches_reference(backend, shape_id, op_qkv, op, layout):
    shape, heads = SHAPES[shape_id]
    scale = 0.2

    def fused(qkv):
        out = op_qkv(qkv.contiguous(memory_format=layout), heads, scale, backend=backend)
        assert out.shape == (shape[0], shape[1] // 3, *shape[2:])
        return out

    assert_matches_reference(fused, lambda qkv: _split_reference(op, qkv, heads, scale), [torch.randn(shape)],
                             device=device_of(backend))


@pytest.mark.parametrize("backend", [b for b in DENOISER if device_of(b) == "cpu"])
@pytest.mark.parametrize("op", [attention_qkv, linear_attention_qkv], ids=QKV_IDS)
def test_autocast_computes_in_its_dtype(backend, op, cpu_dispatch):
    # As autocast does for SDPA and matmul: float32 inputs are cast to its dtype, the output is in
    # it, as close to the float64 result as the op on inputs already in that dtype (on CPUs with
    # AVX-512 the float32 kernels would otherwise take the float32 qkv).
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * 4 * 32, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(qkv, 4, 0.2, backend=backend)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, op(qkv.bfloat16(), 4, 0.2, backend=backend))
    exact = op(qkv.double(), 4, 0.2, backend="reference")
    assert (out.double() - exact).abs().max() <= 2e-2 * exact.abs().max()


@cpu_kernel
@pytest.mark.parametrize("op_qkv,op", QKV_OPS, ids=QKV_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_with_one_gradient(op_qkv, op, dtype, monkeypatch):
    # Bit for bit the q, k, v entry's results, with d(qkv) and the output both channels-last with
    # a batch stride torch reads as such at B = 1 (else the convolutions around it copy them).
    packed = []
    monkeypatch.setattr(qkv_module._Packed, "apply", lambda *args: packed.append(args) or _PACKED_APPLY(*args))
    qkv = torch.randn(1, 3 * 4 * 32, 20, 30, dtype=dtype).contiguous(memory_format=torch.channels_last)
    qkv.requires_grad_()
    out = op_qkv(qkv, 4, 0.2, backend="cpu")
    assert len(packed) == 1
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    packed_grad, qkv.grad = qkv.grad, None
    q, k, v = (x.reshape(1, 4, 32, 600) for x in qkv.chunk(3, dim=1))
    split = op(q, k, v, 0.2, backend="cpu")
    split.backward(grad_out.reshape(split.shape))
    assert torch.equal(out, split.reshape(out.shape)) and torch.equal(packed_grad, qkv.grad)
    for t in (out, packed_grad):
        c = t.shape[1]
        assert t.stride() == (600 * c, 1, 30 * c, c)


@pytest.mark.parametrize("op_qkv", [op for op, _ in QKV_OPS], ids=QKV_IDS)
def test_bad_input_is_a_clear_error(op_qkv):
    name = op_qkv.__name__
    with pytest.raises(ValueError, match=name + r": qkv must be \[B, 3 \* heads \* d, H, W\] with heads=4, "
                                              r"got shape \(1, 90, 3, 3\)"):
        op_qkv(torch.randn(1, 90, 3, 3), 4, 1.0)
    with pytest.raises(ValueError, match="with heads=2, got shape"):
        op_qkv(torch.randn(1, 96, 9), 2, 1.0)
    with pytest.raises(TypeError, match="q must be float32"):
        op_qkv(torch.ones(1, 96, 3, 3, dtype=torch.long), 2, 1.0)


@pytest.mark.parametrize("backend", ["reference", *DENOISER])
@pytest.mark.parametrize("op_qkv,op", QKV_OPS, ids=QKV_IDS)
@pytest.mark.parametrize("batch,side", [(0, 4), (2, 0)], ids=["no samples", "no tokens"])
def test_empty_input_gives_empty_output(op_qkv, op, batch, side, backend):
    # The original's reshapes fail on these; the ops return the empty result and empty gradients.
    qkv, = on(backend, torch.randn(batch, 3 * 2 * 16, side, side).contiguous(memory_format=torch.channels_last))
    qkv.requires_grad_()
    q, k, v = (x.detach().requires_grad_() for x in on(backend, *qkv_inputs((batch, 2, 16, side * side))))
    for out, leaves, shape in ((op(q, k, v, 0.3, backend=backend), (q, k, v), (batch, 32, side * side)),
                               (op_qkv(qkv, 2, 0.3, backend=backend), (qkv,), (batch, 32, side, side))):
        assert out.shape == shape
        out.sum().backward()
        assert all(x.grad is not None and x.grad.shape == x.shape for x in leaves)
