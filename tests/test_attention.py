"""ddps.ops.attention and linear_attention (and their _qkv entries) against ddps.reference, forward and
backward."""
import pytest
import torch

from ddps import reference
from ddps.ops import attention, attention_qkv, linear_attention, linear_attention_qkv
from ddps.kernels._layout import as_heads_like
from ddps.ops import qkv as qkv_module
from ddps.ops.attention import kernel_takes, token_major
from denoiser import DENOISER, assert_matches_reference, device_of, on
from sampling import assert_thread_count_invariant

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
                             _qkv(shape), device=device_of(backend))


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(backend, op, ref, dtype):
    assert_matches_reference(lambda q, k, v: op(q, k, v, 32 ** -0.5, backend=backend),
                             lambda q, k, v: ref(q, k, v, 32 ** -0.5), _qkv((2, 4, 32, 96)), dtype=dtype,
                             device=device_of(backend))


@pytest.mark.parametrize("backend", [b for b in DENOISER if device_of(b) == "cpu"])
@pytest.mark.parametrize("op", [attention_qkv, linear_attention_qkv], ids=["attention_qkv", "linear_attention_qkv"])
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


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
def test_non_contiguous_inputs(backend, op, ref):
    # The qkv conv's output split per head is a strided view, as are slices.
    qkv = _qkv((2, 4, 32, 90))
    q, k, v = (x[:, :, :, ::2] for x in on(backend, *qkv))  # sliced where the kernel runs
    assert not q.is_contiguous()
    torch.testing.assert_close(op(q, k, v, 0.2, backend=backend).cpu(), ref(*(x[:, :, :, ::2] for x in qkv), 0.2),
                               rtol=1e-5, atol=1e-6)


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

    assert_matches_reference(fused, lambda q, k, v: ref(q, k, v, scale), _qkv(shape), dtype=dtype,
                             device=device_of(backend))


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


# The C++ kernels of attention and linear_attention (cpu backend: token-major views, d = 16k <= 64),
# tested on any CPU: the backend dispatches to them only where torch reports AVX-512.
def cpu_kernel(test):
    return pytest.mark.skipif("cpu" not in DENOISER, reason="needs the compiled extension")(
        pytest.mark.usefixtures("kernel_dispatch")(test))


LOW = [torch.bfloat16, torch.float16]


# attention: query blocks of 12 rows (6 for d > 32) with the last one partial, key blocks of 32
# and a last vector of N % 16 keys (its backward is torch's, from the kernel's output and lse);
# linear_attention: N > 1024 spans several of the kernel's token ranges (summed in a fixed order).
KERNEL_CASES = ([(attention, reference.attention, s) for s in [(1, 2, 16, 3), (2, 1, 48, 37), (1, 3, 64, 130),
                                                                 (1, 4, 32, 1030)]]
                + [(linear_attention, reference.linear_attention, s)
                   for s in [(1, 2, 16, 2500), (2, 1, 48, 1030), (1, 3, 64, 17)]])


@cpu_kernel
@pytest.mark.parametrize("op,ref,shape", KERNEL_CASES,
                         ids=[f"{op.__name__}-d{s[2]}N{s[3]}" for op, _, s in KERNEL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_kernels_over_blocks(op, ref, shape, dtype):
    # bfloat16 and float16: float32 inside and one rounding of each output, within twice the error
    # of the reference computed in that dtype (measured: 0.2-0.7 of it).
    scale = shape[2] ** -0.5

    def kernel(q, k, v):
        views = _token_major(q, k, v)
        assert kernel_takes(*views)
        out = op(*views, scale, backend="cpu")
        assert out.dtype == dtype
        return out

    assert_matches_reference(kernel, lambda q, k, v: ref(q, k, v, scale), _qkv(shape), dtype=dtype)


@cpu_kernel
@pytest.mark.parametrize("op", ["attention", "linear_attention"])
def test_kernel_bad_input_is_a_clear_error(op):
    # The ops' own checks stop these first; the kernels check them again for direct callers.
    q, k, v = _token_major(*_qkv((1, 2, 16, 5)))
    with pytest.raises(RuntimeError, match="views of one dtype"):
        getattr(torch.ops.ddps, op)(q, k.bfloat16(), v, 0.3)
    with pytest.raises(RuntimeError, match="activations must be float32, bfloat16 or float16, got Double"):
        getattr(torch.ops.ddps, op)(q.double(), k.double(), v.double(), 0.3)


@cpu_kernel
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernel_opcheck(packed, dtype):
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in _token_major(*_qkv((2, 2, 32, 40))))
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


@cpu_kernel
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attention_kernel_opcheck(packed, dtype):
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in _token_major(*_qkv((2, 2, 32, 40))))
    torch.library.opcheck(torch.ops.ddps.linear_attention.default, (q, k, v, 0.3))
    out, *saved = (t.detach() for t in torch.ops.ddps.linear_attention(q, k, v, 0.3))
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.ddps.linear_attention_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), *saved, 0.3, packed))


@cpu_kernel
@pytest.mark.parametrize("op,n", [(attention, 300), (linear_attention, 2100)], ids=OP_IDS)
def test_kernels_same_bits_for_any_thread_count(op, n):
    # Forward and backward; linear_attention's N spans several token ranges.
    q, k, v = _qkv((2, 4, 32, n))

    def draw():
        views = [x.detach().requires_grad_() for x in _token_major(q, k, v)]
        out = op(*views, 0.2, backend="cpu")
        out.backward(torch.ones_like(out))
        return torch.cat([t.flatten() for t in (out.detach(), *(x.grad for x in views))])
    assert_thread_count_invariant(draw)


NAN, INF = float("nan"), float("inf")
# (tensor, value) pairs put into q, k or v, in one token, at channels 5 and 9. NaN and inf spoil
# rows, heads or channels of the output, through softmaxes and contractions; -inf gives a zero
# weight (exp(-inf) = 0 exactly), which times inf in the same token's v is NaN in the reference.
NON_FINITE = {"q nan": [(0, NAN)], "k nan": [(1, NAN)], "v nan": [(2, NAN)], "q inf": [(0, INF)],
              "k inf": [(1, INF)], "q -inf, v inf": [(0, -INF), (2, INF)], "k -inf, v inf": [(1, -INF), (2, INF)]}


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("op", [attention, linear_attention], ids=OP_IDS)
@pytest.mark.parametrize("spoil", NON_FINITE.values(), ids=NON_FINITE.keys())
def test_non_finite_inputs_as_reference(op, spoil, backend):
    q, k, v = _qkv((1, 2, 32, 50))
    for (tensor, value), channel in zip(spoil, (5, 9)):
        (q, k, v)[tensor][0, 1, channel, 7] = value
    got = op(*_token_major(*on(backend, q, k, v)), 0.2, backend=backend).cpu()
    expected = getattr(reference, op.__name__)(q, k, v, 0.2)
    assert not expected.isfinite().all()
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, equal_nan=True)


# attention_qkv, linear_attention_qkv: the same ops on the qkv convolution's whole output (what the
# Attention and LinearAttention modules call).
QKV_OPS = [(attention_qkv, attention), (linear_attention_qkv, linear_attention)]
QKV_IDS = ["attention_qkv", "linear_attention_qkv"]
_PACKED_APPLY = qkv_module._Packed.apply


def _split_reference(op, qkv, heads, scale):
    b, _, h, w = qkv.shape
    q, k, v = (x.reshape(b, heads, -1, h * w) for x in qkv.chunk(3, dim=1))
    return getattr(reference, op.__name__)(q, k, v, scale).reshape(b, -1, h, w)


@pytest.mark.parametrize("backend", DENOISER + ["reference"])
@pytest.mark.parametrize("op_qkv,op", QKV_OPS, ids=QKV_IDS)
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("shape,heads", [((2, 3 * 4 * 32, 9, 7), 4), ((1, 3 * 2 * 16, 41, 30), 2)],
                         ids=["B2h4d32", "B1h2d16N1230"])
def test_qkv_matches_reference(backend, op_qkv, op, layout, shape, heads):
    scale = 0.2

    def fused(qkv):
        out = op_qkv(qkv.contiguous(memory_format=layout), heads, scale, backend=backend)
        assert out.shape == (shape[0], shape[1] // 3, *shape[2:])
        return out

    assert_matches_reference(fused, lambda qkv: _split_reference(op, qkv, heads, scale), [torch.randn(shape)],
                             device=device_of(backend))


@cpu_kernel
@pytest.mark.parametrize("op_qkv,op", QKV_OPS, ids=QKV_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_is_the_kernel_with_one_gradient(op_qkv, op, dtype, monkeypatch):
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
def test_qkv_bad_input_is_a_clear_error(op_qkv):
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
    q, k, v = (x.detach().requires_grad_() for x in on(backend, *_qkv((batch, 2, 16, side * side))))
    for out, leaves, shape in ((op(q, k, v, 0.3, backend=backend), (q, k, v), (batch, 32, side * side)),
                               (op_qkv(qkv, 2, 0.3, backend=backend), (qkv,), (batch, 32, side, side))):
        assert out.shape == shape
        out.sum().backward()
        assert all(x.grad is not None and x.grad.shape == x.shape for x in leaves)
