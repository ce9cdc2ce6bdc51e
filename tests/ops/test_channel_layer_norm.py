"""ddps.ops.channel_layer_norm against ddps.reference, forward and backward, on every backend and
layout."""
import pytest
import torch

from ddps import reference
from ddps.ops import channel_layer_norm
from helpers.denoiser import DENOISER, assert_matches_reference, device_of, on
from helpers.sampling import assert_thread_count_invariant


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# cpu: two paths, by whether the channels are contiguous. NCHW goes to the C++ kernel (tiles of
# 512 pixels in 16-lane vectors): the shapes cover one pixel, a partial vector, one whole tile and
# two tiles of which the second ends in a partial vector.
@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("shape", [(2, 256, 9, 7), (1, 3, 1, 1), (3, 64, 16, 16), (2, 20, 23, 31)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
def test_channel_layer_norm(backend, shape, dtype, layout):
    x, g = _randn(*shape), _randn(1, shape[1], 1, 1, seed=1)
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    assert_matches_reference(lambda x, g: channel_layer_norm(x.contiguous(memory_format=layout), g, backend=backend),
                             lambda x, g: reference.channel_layer_norm(x, g, eps), [x, g], dtype=dtype,
                             device=device_of(backend))


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("shape", [(2, 5, 700), (1, 1, 3, 4, 5), (2, 4, 1), (3, 5)], ids=str)
def test_channel_layer_norm_other_ranks(backend, shape):
    # [B, C, *spatial] of any rank; C = 1 normalises every pixel to 0. (The reference's default
    # eps is float64's in the oracle: the float32 one is passed.)
    g = _randn(1, shape[1], *(1,) * (len(shape) - 2), seed=1)
    assert_matches_reference(lambda x, g: channel_layer_norm(x, g, backend=backend),
                             lambda x, g: reference.channel_layer_norm(x, g, 1e-5), [_randn(*shape), g],
                             device=device_of(backend))


@pytest.mark.parametrize("backend", DENOISER)
def test_channel_layer_norm_large_mean(backend):
    # Mean 300 against a spread of 1 (see test_group_norm_film_silu_large_mean): statistics that
    # cancelled catastrophically would miss by orders of magnitude.
    assert_matches_reference(lambda x, g: channel_layer_norm(x, g, backend=backend),
                             lambda x, g: reference.channel_layer_norm(x, g, 1e-5),
                             [_randn(2, 64, 20, 30) + 300.0, _randn(1, 64, 1, 1, seed=1)], rtol=1e-4,
                             device=device_of(backend))


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
def test_channel_layer_norm_non_finite_as_reference(backend, layout):
    # A NaN or an infinity makes its pixel's statistics, hence the pixel's every channel, NaN.
    x, g = _randn(1, 8, 3, 5), _randn(1, 8, 1, 1, seed=1)
    x[0, 2, 1, 1], x[0, 3, 2, 2], x[0, 0, 0, 0] = float("nan"), float("inf"), -float("inf")
    got = channel_layer_norm(*on(backend, x.contiguous(memory_format=layout), g), backend=backend).cpu()
    expected = reference.channel_layer_norm(x, g)
    assert expected.isnan().sum() == 24
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.skipif(not DENOISER, reason="needs the compiled extension")
def test_channel_layer_norm_kernel_runs_on_nchw_and_is_thread_count_invariant():
    x, g = _randn(2, 48, 30, 40).requires_grad_(), _randn(1, 48, 1, 1, seed=1).requires_grad_()

    def draw():
        with torch.profiler.profile() as prof:
            y = channel_layer_norm(x, g, backend="cpu")
            dx, dg = torch.autograd.grad(y, (x, g), y.detach())
        assert {"ddps::channel_layer_norm", "ddps::channel_layer_norm_backward"} <= {e.name for e in prof.events()}
        return torch.cat([t.flatten() for t in (y.detach(), dx, dg)])

    assert_thread_count_invariant(draw)


@pytest.mark.parametrize("backend", DENOISER + ["reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
def test_channel_layer_norm_dtype_is_the_result_rounded_once(backend, dtype, layout):
    # A half-precision x with the float32 gain gives float32 (the reference's result type, as under
    # autocast); dtype= gives that result rounded once to dtype, as a convolution's autocast cast
    # of it would be. The CPU's channels-last path computes it with torch's mixed-precision
    # layer_norm (float32 inside, its own order of sums): one step of dtype off on a few elements
    # (or float32's rounding of the largest value off, where x - mean cancels to near zero).
    x, g = _randn(2, 64, 9, 7).to(dtype).contiguous(memory_format=layout), _randn(1, 64, 1, 1, seed=1)
    x, g = on(backend, x, g)
    wide = channel_layer_norm(x, g, backend=backend)
    got = channel_layer_norm(x, g, backend=backend, dtype=dtype)
    assert wide.dtype == torch.float32 and got.dtype == dtype and got.is_contiguous(memory_format=layout)
    exact = wide.to(dtype)
    if backend == "cpu" and layout == torch.channels_last:
        bits = 8 if dtype == torch.bfloat16 else 11
        step = 2.0 ** (torch.frexp(exact.float().abs().clamp_min(1e-30))[1].double() - bits)
        float32_error = 2.0 ** -20 * wide.abs().max().item()
        assert ((got.double() - exact.double()).abs() <= step.to(got.device) + float32_error).all()
        assert (got != exact).double().mean() <= 1e-3
    else:
        assert torch.equal(got, exact)


def test_channel_layer_norm_dtype_makes_no_float32_copy_on_the_cpu():
    # The point of dtype= on the fused UNet's channels-last activations: no float32 x or output.
    x = _randn(1, 64, 16, 16).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(record_shapes=True) as prof:
        channel_layer_norm(x, _randn(1, 64, 1, 1, seed=1), backend="cpu", dtype=torch.bfloat16)
    assert not {"aten::_to_copy", "aten::copy_"} & {e.name for e in prof.events() if e.input_shapes[:1] == [[1, 64, 16, 16]]}
    assert "aten::native_layer_norm" in {e.name for e in prof.events()}


@pytest.mark.parametrize("backend", DENOISER + ["reference"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
def test_channel_layer_norm_explicit_eps(backend, layout):
    # A large eps, so that one taken by dtype instead (1e-5 here) would be far off.
    x, g = _randn(2, 16, 5, 6), _randn(1, 16, 1, 1, seed=1)
    for dtype in (None, torch.float32):
        got = channel_layer_norm(*on(backend, x.contiguous(memory_format=layout), g), eps=0.5, backend=backend,
                                 dtype=dtype)
        torch.testing.assert_close(got.cpu(), reference.channel_layer_norm(x, g, 0.5))


def test_channel_layer_norm_dtype_keeps_gradients():
    # The channels-last half-precision path (torch's layer_norm) stays differentiable.
    x = _randn(2, 16, 5, 6).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = _randn(1, 16, 1, 1, seed=1).requires_grad_()
    grad = _randn(2, 16, 5, 6, seed=2)
    expected = torch.autograd.grad((channel_layer_norm(x, g, backend="reference") * grad).sum(), (x, g))
    got = torch.autograd.grad((channel_layer_norm(x, g, dtype=torch.bfloat16).float() * grad).sum(), (x, g))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05 * b.float().abs().max().item())


@pytest.mark.skipif(not DENOISER, reason="needs the compiled extension")
def test_channel_layer_norm_opcheck():
    x, g = _randn(2, 16, 5, 6).requires_grad_(), _randn(16).requires_grad_()
    torch.library.opcheck(torch.ops.ddps.channel_layer_norm.default, (x, g, 1e-5))
    # bfloat16 activations (float32 gain, statistics and gain gradient).
    torch.library.opcheck(torch.ops.ddps.channel_layer_norm.default, (x.detach().bfloat16().requires_grad_(), g, 1e-3))


@pytest.mark.parametrize("backend", DENOISER)
def test_non_contiguous_inputs(backend):
    x, g = _randn(2, 32, 12, 12), _randn(1, 32, 1, 1)
    sliced = on(backend, x)[0][:, :, ::2, 1::2]  # sliced where the kernel runs
    torch.testing.assert_close(channel_layer_norm(sliced, *on(backend, g), backend=backend).cpu(),
                               reference.channel_layer_norm(x[:, :, ::2, 1::2], g))


def test_bad_input_is_a_clear_error():
    x = _randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="g must have C=8 elements"):
        channel_layer_norm(x, torch.ones(1, 4, 1, 1))
    with pytest.raises(TypeError, match="x must be float32"):
        channel_layer_norm(x.long(), torch.ones(1, 8, 1, 1))
    with pytest.raises(ValueError, match=r"x must be \[B, C, \*spatial\], got shape \(8,\)"):
        channel_layer_norm(torch.ones(8), torch.ones(8))
    with pytest.raises(TypeError, match="g must be float32"):
        channel_layer_norm(x, torch.ones(1, 8, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype or None, got torch.int32"):
        channel_layer_norm(x, torch.ones(1, 8, 1, 1), dtype=torch.int32)
