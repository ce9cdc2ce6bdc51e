"""ddps.ops.conv3x3 (Winograd F(2x2, 3x3) on CPU) against F.conv2d, forward and backward."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ddps.ops import conv3x3
from ddps.ops.conv3x3 import bf16_dot, winograd_shape, winograd_weight
from helpers.denoiser import BF16_DOT, DENOISER, assert_matches_reference, bf16_ulp
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
    # dtype: the kernel loads them as float, sums in float32 and rounds the output once (with
    # bfloat16 products, test_bf16_products_round_each_transform_once, the transforms once too,
    # whose errors average out over the sums), so against a float64 convolution of the rounded
    # inputs it is off by about that one rounding; the gradients
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


# Winograd F(2x2, 3x3)'s transforms, written out here: B^T, G and A^T.
_BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
_GT = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
_AT = [[1, 1, 1, 0], [0, 1, -1, -1]]


def _winograd_emulated(x, weight, bias, round_v=True, round_u=True):
    """conv3x3 as the bfloat16 products compute it, in float64 but for the roundings: V = B^T d B
    and U = G w G^T in float32, each rounded to bfloat16 (unless told not to), their products
    summed exactly, then A^T M A + bias."""
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _GT, _AT))
    b, c, h, w = x.shape
    th, tw = -(-h // 2), -(-w // 2)
    padded = F.pad(x.float(), (1, 2 * tw - w + 1, 1, 2 * th - h + 1))
    tiles = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # [B, C, th, tw, 4, 4]
    v = (bt.float() @ tiles @ bt.float().T)
    u = g.float() @ weight.float() @ g.float().T  # [Cout, Cin, 4, 4]
    v, u = (t.bfloat16() if r else t for t, r in ((v, round_v), (u, round_u)))
    m = torch.einsum("bcijuv,kcuv->bkijuv", v.double(), u.double())
    y = (at @ m @ at.T).permute(0, 1, 2, 4, 3, 5).reshape(b, -1, 2 * th, 2 * tw)[:, :, :h, :w]
    return y + bias.double()[None, :, None, None]


@BF16_DOT
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_products_round_each_transform_once(shape):
    # On a CPU with AVX512-BF16 the products take V and U each rounded once to bfloat16 and sum
    # them in float32: the output is the exact sum of those rounded operands, rounded to bfloat16,
    # but where float32's summation moved it across a rounding boundary (within one bfloat16 step).
    x, weight, bias = (t.bfloat16() for t in _inputs(*shape))
    out = conv3x3(x.contiguous(memory_format=CL), weight, bias, backend="cpu").double()
    exact = _winograd_emulated(x, weight, bias)
    assert (out - exact).abs().max() <= 1.0001 * bf16_ulp(exact).max()
    assert ((out - exact).abs() <= bf16_ulp(exact)).all()
    assert (out != exact.bfloat16().double()).double().mean() <= 0.01
    # the same checks tell the roundings apart (but on one pixel, where V is x itself, rounding nothing)
    for unrounded in (dict(round_v=False), dict(round_u=False)) if min(shape[3:]) > 1 else ():
        other = _winograd_emulated(x, weight, bias, **unrounded)
        assert not ((out - other).abs() <= bf16_ulp(other)).all(), unrounded


def _weight_grad_emulated(x, grad, rounded=True):
    """conv3x3_weight_grad's dU [16, Cin, Cout] in float64: the sum over tiles of V[k]^T M[k], V =
    B^T d B and M = A g A^T (g a 2 x 2 block of grad) each rounded to bfloat16 (or not); and the
    size of the terms summed."""
    bt, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _AT))
    b, c, h, w = x.shape
    th, tw = -(-h // 2), -(-w // 2)
    v = bt @ F.pad(x.double(), (1, 2 * tw - w + 1, 1, 2 * th - h + 1)).unfold(2, 4, 2).unfold(3, 4, 2) @ bt.T
    m = at.T @ F.pad(grad.double(), (0, 2 * tw - w, 0, 2 * th - h)).unfold(2, 2, 2).unfold(3, 2, 2) @ at
    if rounded:
        v, m = v.bfloat16().double(), m.bfloat16().double()
    du = torch.einsum("bcijuv,bkijuv->uvck", v, m).reshape(16, c, -1)
    return du, torch.einsum("bcijuv,bkijuv->uvck", v.abs(), m.abs()).reshape(16, c, -1)


@BF16_DOT
@pytest.mark.parametrize("shape", [(1, 32, 40, 6, 10), (1, 16, 33, 30, 30), (2, 24, 20, 7, 9)], ids=str)
def test_bf16_weight_gradient_rounds_each_transform_once(shape):
    # bfloat16 activations: the weight gradient's products take V and M each rounded once to
    # bfloat16, pairs of tiles per instruction, summed in float32 (225 tiles: two chunks, the
    # second of an odd count). Against the emulation: within float32's sums (measured 2^-23.3 of
    # the terms' size); without the roundings it is 2^-10 to 2^-8 off.
    x = _inputs(*shape)[0].bfloat16().contiguous(memory_format=CL)
    grad = _randn(shape[0], shape[2], *shape[3:], seed=5).bfloat16().contiguous(memory_format=CL)
    du = torch.ops.ddps.conv3x3_weight_grad(grad, x).double()
    exact, terms = _weight_grad_emulated(x, grad)
    assert ((du - exact).abs() <= 2.0 ** -20 * terms).all()
    exact, terms = _weight_grad_emulated(x, grad, rounded=False)
    assert not ((du - exact).abs() <= 2.0 ** -20 * terms).all()


@BF16_DOT
def test_bf16_products_same_bits_for_any_thread_count():
    x, weight, bias = (t.bfloat16() for t in _inputs(2, 32, 40, 30, 26))
    x = x.contiguous(memory_format=CL)
    grad = _randn(2, 40, 30, 26, seed=3).bfloat16().contiguous(memory_format=CL)
    assert_thread_count_invariant(lambda: torch.cat([conv3x3(x, weight, bias, backend="cpu").flatten().float(),
                                                     torch.ops.ddps.conv3x3_weight_grad(grad, x).flatten()]))


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


@CPU_KERNEL
def test_bf16_products_only_on_a_cpu_that_has_them():
    # Chosen from cpuid at run time: on this CPU as /proc/cpuinfo says; with DDPS_BF16_DOT=0 (how a
    # CPU without them looks to the choice) winograd_weight keeps float32 operands, and the kernel
    # refuses bfloat16 ones instead of running instructions the CPU may lack.
    assert bf16_dot() == ("avx512_bf16" in _cpu_flags())
    script = (
        "import torch\n"
        "from ddps.ops import conv3x3\n"
        "from ddps.ops.conv3x3 import bf16_dot, winograd_weight\n"
        "w = torch.randn(8, 6, 3, 3).bfloat16()\n"
        "x = torch.randn(1, 6, 5, 5).bfloat16().contiguous(memory_format=torch.channels_last)\n"
        "u = winograd_weight(w)\n"
        "assert not bf16_dot() and u.dtype == torch.float32 and u.shape == (16, 1, 6, 32), u.shape\n"
        "conv3x3(x, w, None, backend='cpu')\n"
        "pairs = torch.zeros(16, 1, 3, 64, dtype=torch.bfloat16)\n"
        "try:\n"
        "    torch.ops.ddps.conv3x3(x, w, pairs, None)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs a CPU with AVX512-BF16' in str(e), e\n"
        "    print('refused')\n")
    env = {**os.environ, "DDPS_BF16_DOT": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_winograd_shape_is_the_transforms(dtype):
    # 32-column panels of Cout; under bfloat16 products, Cin in pairs of 64 interleaved columns
    pairs = dtype == torch.bfloat16 and bf16_dot()
    for cout, cin in [(1, 1), (32, 2), (33, 5), (65, 4), (64, 3)]:
        weight = torch.zeros(cout, cin, 3, 3, dtype=dtype)
        expected = (16, (cout + 31) // 32, (cin + 1) // 2, 64) if pairs else (16, (cout + 31) // 32, cin, 32)
        assert winograd_shape(weight) == expected == tuple(winograd_weight(weight).shape), (cout, cin)


@BF16_DOT
def test_bf16_weight_layout():
    # Input channels in pairs, each 32-column panel's row holding (channel 2i, channel 2i + 1) per column
    weight = _randn(40, 5, 3, 3).bfloat16()
    u = winograd_weight(weight)
    assert u.dtype == torch.bfloat16 and u.shape == (16, 2, 3, 64)
    full = torch.einsum("pu,kcuv,qv->pqck", torch.tensor(_GT).float(), weight.float(), torch.tensor(_GT).float())
    full = full.reshape(16, 5, 40).bfloat16()
    for k, panel, pair, column in [(0, 0, 0, 0), (5, 1, 2, 7), (15, 0, 1, 31), (9, 1, 0, 3)]:
        cout = 32 * panel + column
        for half in (0, 1):
            cin = 2 * pair + half
            expected = full[k, cin, cout] if cin < 5 and cout < 40 else 0
            assert u[k, panel, pair, 2 * column + half] == expected, (k, panel, pair, column, half)
