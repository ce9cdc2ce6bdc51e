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
@pytest.mark.parametrize("shape", [(2, 5, 700), (1, 1, 3, 4, 5), (2, 4, 1)], ids=str)
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
