"""ddps.ops.conv3x3 (Winograd F(2x2, 3x3) on CPU) against F.conv2d, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from ddps.ops import conv3x3
from ddps.ops.conv3x3 import winograd_weight
from helpers.denoiser import DENOISER, assert_matches_reference
from helpers.sampling import assert_thread_count_invariant

CPU_KERNEL = pytest.mark.skipif("cpu" not in DENOISER, reason="needs the compiled extension")
CL = torch.channels_last


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _inputs(b, cin, cout, h, w, bias=True):
    x = _randn(b, cin, h, w).contiguous(memory_format=CL)
    weight = _randn(cout, cin, 3, 3, seed=1) / (9 * cin) ** 0.5
    return [x, weight] + ([_randn(cout, seed=2)] if bias else [])


def _reference(x, weight, bias=None):
    return F.conv2d(x, weight, bias, padding=1)


# The kernel works on 48-tile chunks of 2x2 tiles, 12-tile register blocks, 16-channel vectors and
# 32-column panels of Cout: the shapes cover odd H and W (a cropped last tile row and column), one
# pixel, partial vectors and panels, chunks that span samples, and the UNet's 256 channels.
SHAPES = [(2, 5, 7, 9, 11), (1, 3, 4, 1, 1), (1, 40, 33, 6, 8), (3, 16, 64, 10, 7), (1, 256, 256, 16, 16)]


@CPU_KERNEL
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv3x3_matches_reference(shape, bias):
    # Forward and the gradients of x, weight and bias against a float64 convolution: within
    # 1e-5 of the largest value, as every denoiser op (F.conv2d in float32 is within ~2e-6 here).
    def fused(x, weight, b=None):
        return conv3x3(x.contiguous(memory_format=CL), weight, b, backend="cpu")

    assert_matches_reference(fused, _reference, _inputs(*shape, bias=bias))


@CPU_KERNEL
def test_conv3x3_is_no_less_accurate_than_the_direct_convolution():
    x, weight, bias = _inputs(1, 256, 256, 32, 32)
    oracle = _reference(x.double(), weight.double(), bias.double())
    winograd = (conv3x3(x, weight, bias, backend="cpu").double() - oracle).abs().max()
    direct = (_reference(x, weight, bias).double() - oracle).abs().max()
    assert winograd <= direct


@CPU_KERNEL
def test_conv3x3_takes_the_kernel_for_channels_last_activations():
    x, weight, bias = _inputs(2, 8, 8, 6, 6)
    kept = winograd_weight(weight)
    fast = conv3x3(x, weight, bias, winograd=kept, backend="cpu")
    assert fast.is_contiguous(memory_format=CL)
    assert torch.equal(fast, conv3x3(x, weight, bias, backend="cpu"))  # a kept transform is the same
    assert not torch.equal(fast, _reference(x, weight, bias))  # Winograd: other roundings
    # Contiguous activations, mixed dtypes outside autocast and the reference backend: F.conv2d itself.
    contiguous = x.contiguous()
    assert torch.equal(conv3x3(contiguous, weight, bias, backend="cpu"), _reference(contiguous, weight, bias))
    assert torch.equal(conv3x3(x, weight, bias, backend="reference"), _reference(x, weight, bias))
    with pytest.raises(RuntimeError):  # F.conv2d's own error for a bfloat16 x and a float32 weight
        conv3x3(x.bfloat16(), weight, bias, backend="cpu")


# One rounding of the float32 result: within a unit in the last place of the largest value.
HALF_TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


@CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "half-inputs"])
def test_conv3x3_half_precision(dtype, autocast):
    # Autocast's conv2d (x, weight and bias rounded to dtype, output in dtype), or inputs already in
    # dtype: the kernel loads them as float, sums in float32 and rounds the output once, so against
    # a float64 convolution of the rounded inputs it is off by that one rounding; the gradients
    # (with respect to the float32 leaves under autocast) within bf16 / fp16 sums' rounding.
    x, weight, bias = _inputs(2, 24, 40, 9, 10)
    leaves = [t.to(dtype=torch.float32 if autocast else dtype).requires_grad_() for t in (x, weight, bias)]
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = conv3x3(*leaves, backend="cpu")
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    rounded = [t.detach().to(dtype).double().requires_grad_() for t in (x, weight, bias)]
    exact = _reference(*rounded)
    assert (out.double() - exact).abs().max() <= HALF_TOLERANCE[dtype] * exact.abs().max()
    grad = _randn(*out.shape, seed=4).to(dtype).contiguous(memory_format=CL)
    out.backward(grad)
    exact.backward(grad.double())
    for leaf, ref in zip(leaves, rounded):
        assert leaf.grad.dtype == leaf.dtype
        assert (leaf.grad.double() - ref.grad).abs().max() <= 4 * HALF_TOLERANCE[dtype] * ref.grad.abs().max()


@CPU_KERNEL
def test_conv3x3_same_bits_for_any_thread_count():
    x, weight, bias = _inputs(2, 32, 40, 30, 26)  # 2 x 15 x 13 tiles: eight chunks

    def draw():
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        out = conv3x3(*leaves, backend="cpu")
        out.backward(torch.ones_like(out))
        return torch.cat([t.flatten() for t in (out.detach(), *(leaf.grad for leaf in leaves))])
    assert_thread_count_invariant(draw)


@CPU_KERNEL
def test_conv3x3_kernel_opcheck():
    x, weight, bias = (t.detach().requires_grad_() for t in _inputs(2, 8, 40, 5, 6))
    torch.library.opcheck(torch.ops.ddps.conv3x3.default, (x, weight, winograd_weight(weight), bias))
    grad = _randn(2, 40, 5, 6, seed=3).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.ddps.conv3x3_weight_grad.default, (grad, x.detach()))
    half = x.detach().bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.ddps.conv3x3.default, (half, weight.detach().bfloat16().requires_grad_(),
                                                           winograd_weight(weight.bfloat16()), bias))
    torch.library.opcheck(torch.ops.ddps.conv3x3_weight_grad.default, (grad.bfloat16(), half.detach()))


def test_conv3x3_bad_input():
    x, weight, bias = _inputs(1, 4, 8, 5, 5)
    with pytest.raises(ValueError, match=r"weight \[Cout, Cin, 3, 3\]"):
        conv3x3(x, weight[:, :3], bias)
    with pytest.raises(ValueError, match=r"weight \[Cout, Cin, 3, 3\]"):
        conv3x3(x, weight[..., :2], bias)
    with pytest.raises(ValueError, match="bias must be"):
        conv3x3(x, weight, bias[:4])
    with pytest.raises(TypeError, match="x"):
        conv3x3(x.long(), weight, bias)
    if "cpu" in DENOISER:
        with pytest.raises(ValueError, match="winograd must be"):
            conv3x3(x, weight, bias, winograd=winograd_weight(weight[:, :2]), backend="cpu")


def test_conv3x3_keeps_its_default_under_a_process_wide_triton_or_cuda(monkeypatch):
    x, weight, bias = _inputs(1, 8, 8, 4, 4)
    default = conv3x3(x, weight, bias)
    for name in ("triton", "cuda"):
        monkeypatch.setenv("DDPS_BACKEND", name)
        assert torch.equal(conv3x3(x, weight, bias), default)
    monkeypatch.setenv("DDPS_BACKEND", "reference")
    assert torch.equal(conv3x3(x, weight, bias), _reference(x, weight, bias))
