"""ddps.ops.group_norm_film_silu (the ResnetBlock's Block epilogue) against ddps.reference,
forward and backward, on every backend and layout."""
import pytest
import torch

from ddps import reference
from ddps.ops import group_norm_film_silu
from helpers.denoiser import DENOISER, assert_matches_reference, device_of, on
from helpers.sampling import assert_thread_count_invariant


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _norm_inputs(shape, film, offset=0.0):
    b, c = shape[:2]
    inputs = [_randn(*shape) + offset, _randn(c, seed=1), _randn(c, seed=2)]
    return inputs + ([_randn(b, c, 1, 1, seed=3), _randn(b, c, 1, 1, seed=4)] if film else [])


def _with_groups(fn, groups, memory_format=torch.contiguous_format, **kw):
    return lambda x, w, bias, *ss: fn(x.contiguous(memory_format=memory_format), w, bias, *(ss or (None, None)),
                                      groups, **kw)


# channels_last float32 is the C++ kernel's case (16-channel vectors, 256-pixel chunks, sums over
# blocks of 128 channels kept in registers: the shapes cover a partial vector, one pixel, several
# chunks, whole blocks and a block plus leftover channels); the rest runs torch's kernels.
@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("film", [True, False], ids=["film", "no-film"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 9, 7), 8), ((1, 8, 1, 1), 2), ((2, 16, 16, 16), 4),
                                          ((2, 24, 17, 19), 8), ((2, 160, 9, 7), 8), ((1, 256, 20, 18), 8)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_group_norm_film_silu(backend, film, shape, groups, dtype, memory_format):
    assert_matches_reference(_with_groups(group_norm_film_silu, groups, memory_format, backend=backend),
                             _with_groups(reference.group_norm_film_silu, groups), _norm_inputs(shape, film),
                             dtype=dtype, device=device_of(backend))


@pytest.mark.parametrize("backend", DENOISER)
def test_group_norm_film_silu_large_mean(backend):
    # Mean 300 against a spread of 1: float32 itself loses digits there (the reference run in
    # float32 is off by 1.2e-4 relative in dweight, 4e-5 in dx), hence rtol 1e-4; statistics that
    # cancelled catastrophically would miss it by orders of magnitude.
    assert_matches_reference(_with_groups(group_norm_film_silu, 4, torch.channels_last, backend=backend),
                             _with_groups(reference.group_norm_film_silu, 4),
                             _norm_inputs((2, 32, 20, 20), True, offset=300.0), rtol=1e-4, device=device_of(backend))


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_group_norm_film_silu_nan_and_infinities_spread_over_their_group(backend, memory_format):
    x, w, bias, scale, shift = _norm_inputs((2, 32, 8, 8), True)
    x[0, 3, 2, 2], x[1, 21, 1, 1], x[1, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    expected = reference.group_norm_film_silu(x, w, bias, scale, shift, 4)
    got = group_norm_film_silu(*on(backend, x.contiguous(memory_format=memory_format), w, bias, scale, shift), 4,
                               backend=backend).cpu()
    assert expected.isnan().sum() == 3 * 8 * 64  # the three groups, whole
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got[~expected.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_group_norm_film_silu_infinite_shift_as_reference(backend, memory_format):
    # silu(inf) = inf and silu(-inf) = NaN in torch (-inf times sigmoid(-inf) = 0), and both make
    # their channel's gradients NaN: the kernel's exp must give exp(-inf) = 0 and exp(inf) = inf.
    inputs = _norm_inputs((2, 32, 8, 8), True)
    inputs[4][0, 5], inputs[4][1, 9] = -float("inf"), float("inf")

    def run(fn, memory_format=torch.contiguous_format, device="cpu", **kw):
        leaves = [t.detach().to(device).requires_grad_() for t in inputs]
        x, *rest = leaves
        out = fn(x.contiguous(memory_format=memory_format), *rest, 4, **kw)
        out.backward(_randn(*out.shape, seed=5).to(device))
        return [t.cpu() for t in (out.detach(), *(t.grad for t in leaves))]
    expected = run(reference.group_norm_film_silu)
    got = run(group_norm_film_silu, memory_format, device_of(backend), backend=backend)
    assert expected[0].isnan().sum() == 64 and expected[0].isinf().sum() == 64
    for g, e in zip(got, expected):
        assert torch.equal(g.isnan(), e.isnan())
        torch.testing.assert_close(g, e, equal_nan=True)


@pytest.mark.skipif(not DENOISER, reason="needs the compiled extension")
def test_group_norm_film_silu_kernel_is_thread_count_invariant():
    x, w, bias, scale, shift = _norm_inputs((2, 176, 40, 40), True)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()

    def draw():
        y = group_norm_film_silu(x, w, bias, scale, shift, 8, backend="cpu")
        dx, = torch.autograd.grad(y, x, y.detach())
        return torch.cat([y.detach().flatten(), dx.flatten()])

    assert_thread_count_invariant(draw)


@pytest.mark.skipif(not DENOISER, reason="needs the compiled extension")
@pytest.mark.parametrize("film", [True, False], ids=["film", "no-film"])
def test_group_norm_film_silu_opcheck(film):
    x, w, bias, *ss = _norm_inputs((2, 16, 5, 6), film)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    ss = [s.reshape(2, 16).requires_grad_() for s in ss] or [None, None]
    torch.library.opcheck(torch.ops.ddps.group_norm_film_silu.default,
                          (x, w.requires_grad_(), bias.requires_grad_(), *ss, 4, 1e-5))
    # bfloat16 activations (float32 parameters, statistics and parameter gradients).
    torch.library.opcheck(torch.ops.ddps.group_norm_film_silu.default,
                          (x.detach().bfloat16().requires_grad_(), w, bias, *ss, 4, 1e-5))


@pytest.mark.parametrize("backend", DENOISER)
def test_non_contiguous_inputs(backend):
    x, w, bias, s = _randn(2, 32, 12, 12), _randn(32), _randn(32), _randn(2, 32, 1, 1)
    sliced = on(backend, x)[0][:, :, ::2, 1::2]  # sliced where the kernel runs
    torch.testing.assert_close(group_norm_film_silu(sliced, *on(backend, w, bias, s, s), 4, backend=backend).cpu(),
                               reference.group_norm_film_silu(x[:, :, ::2, 1::2], w, bias, s, s, 4))


def test_bad_input_is_a_clear_error():
    x, w = _randn(2, 8, 3, 3), torch.ones(8)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        group_norm_film_silu(x, w, w, None, None, 3)
    with pytest.raises(ValueError, match="given together"):
        group_norm_film_silu(x, w, w, torch.ones(2, 8, 1, 1), None, 4)
    with pytest.raises(ValueError, match=r"scale and shift must be \[B, C, 1"):
        group_norm_film_silu(x, w, w, torch.ones(2, 4, 1, 1), torch.ones(2, 4, 1, 1), 4)
    with pytest.raises(ValueError, match=r"scale and shift must be \[B, C, 1"):
        group_norm_film_silu(x, w, w, torch.ones(2, 8, 3, 3), torch.ones(2, 8, 3, 3), 4)
    with pytest.raises(ValueError, match=r"weight must be \[C=8\] for x of shape \(2, 8, 3, 3\), got \(4,\)"):
        group_norm_film_silu(x, w[:4], w, None, None, 4)
    with pytest.raises(ValueError, match=r"bias must be \[C=8\]"):
        group_norm_film_silu(x, w, w.reshape(1, 8), None, None, 4)
    with pytest.raises(TypeError, match="weight must be float32"):
        group_norm_film_silu(x, w.long(), w, None, None, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, C, \*spatial\], got shape \(8,\)"):
        group_norm_film_silu(torch.ones(8), w, w, None, None, 4)
