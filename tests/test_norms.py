"""ddps.ops.channel_layer_norm and group_norm_film_silu against ddps.reference, forward and
backward."""
import pytest
import torch

from ddps import reference
from ddps.ops import channel_layer_norm, group_norm_film_silu
from denoiser import DENOISER, assert_matches_reference


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("shape", [(2, 256, 9, 7), (1, 3, 1, 1), (3, 64, 16, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channel_layer_norm(backend, shape, dtype):
    x, g = _randn(*shape), _randn(1, shape[1], 1, 1, seed=1)
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    assert_matches_reference(lambda x, g: channel_layer_norm(x, g, backend=backend),
                             lambda x, g: reference.channel_layer_norm(x, g, eps), [x, g], dtype=dtype)


@pytest.mark.parametrize("backend", DENOISER)
@pytest.mark.parametrize("film", [True, False], ids=["film", "no-film"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 9, 7), 8), ((1, 8, 1, 1), 2), ((2, 16, 16, 16), 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_film_silu(backend, film, shape, groups, dtype):
    b, c = shape[:2]
    inputs = [_randn(*shape), _randn(c, seed=1), _randn(c, seed=2)]
    if film:
        inputs += [_randn(b, c, 1, 1, seed=3), _randn(b, c, 1, 1, seed=4)]

    def call(fn, **kw):
        return lambda x, w, bias, *ss: fn(x, w, bias, *(ss or (None, None)), groups, **kw)

    assert_matches_reference(call(group_norm_film_silu, backend=backend), call(reference.group_norm_film_silu),
                             inputs, dtype=dtype)


@pytest.mark.parametrize("backend", DENOISER)
def test_non_contiguous_inputs(backend):
    x = _randn(2, 32, 12, 12)[:, :, ::2, 1::2]
    g = _randn(1, 32, 1, 1)
    torch.testing.assert_close(channel_layer_norm(x, g, backend=backend), reference.channel_layer_norm(x, g))
    w, bias, s = _randn(32), _randn(32), _randn(2, 32, 1, 1)
    torch.testing.assert_close(group_norm_film_silu(x, w, bias, s, s, 4, backend=backend),
                               reference.group_norm_film_silu(x, w, bias, s, s, 4))


def test_bad_input_is_a_clear_error():
    x = _randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="g must have C=8 elements"):
        channel_layer_norm(x, torch.ones(1, 4, 1, 1))
    with pytest.raises(TypeError, match="x must be float32"):
        channel_layer_norm(x.long(), torch.ones(1, 8, 1, 1))
    w = torch.ones(8)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        group_norm_film_silu(x, w, w, None, None, 3)
    with pytest.raises(ValueError, match="given together"):
        group_norm_film_silu(x, w, w, torch.ones(2, 8, 1, 1), None, 4)
    with pytest.raises(ValueError, match=r"scale and shift must be \[B, C, 1"):
        group_norm_film_silu(x, w, w, torch.ones(2, 4, 1, 1), torch.ones(2, 4, 1, 1), 4)
