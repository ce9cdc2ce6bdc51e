"""The Triton denoiser kernels beyond the shared per-op tests (which run them too, through
tests/denoiser.DENOISER): the custom ops' schemas, fakes and autograd, the tiling and split
boundaries, inputs with different strides, determinism, and the fused UNet on them. Here they run
under TRITON_INTERPRET=1 (set by conftest.py when there is no GPU)."""
import importlib

import pytest
import torch

import ddps
from ddps import reference
from ddps.ops import attention, channel_layer_norm, group_norm_film_silu, linear_attention
from helpers.denoiser import assert_matches_reference

pytestmark = pytest.mark.skipif(not ddps.backends()["triton"]["available"],
                                reason=f"triton unavailable: {ddps.backends()['triton']['reason']}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _qkv(shape):
    return [_randn(*shape, seed=i) for i in range(3)]


def _grad(x):
    return x.requires_grad_()


OPCHECK = {
    "attention": lambda: ([_grad(x) for x in _qkv((2, 2, 16, 40))] + [0.25]),
    "linear_attention": lambda: ([_grad(x) for x in _qkv((2, 2, 16, 40))] + [0.25]),
    "channel_layer_norm": lambda: [_grad(_randn(2, 12, 5, 3)), _grad(_randn(12, seed=1)), 1e-5],
    "group_norm_film_silu": lambda: [_grad(_randn(2, 8, 5, 3).contiguous(memory_format=torch.channels_last)),
                                     _grad(_randn(8, seed=1)), _grad(_randn(8, seed=2)), _grad(_randn(2, 8, seed=3)),
                                     _grad(_randn(2, 8, seed=4)), 4, 1e-5],
}


@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck(name):
    module = importlib.import_module(f"ddps.ops.{name}")
    forward = module._triton()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    # AOT dispatch hands the kernels functional tensors, whose storage the interpreter cannot read.
    utils += ("test_aot_dispatch_dynamic",) if DEVICE == "cuda" else ()
    torch.library.opcheck(forward._opoverload, OPCHECK[name](), test_utils=utils)


# Boundaries of the tilings: linear attention's token splits (1024 tokens per split),
# attention's 32-token blocks (16 in float32 with d >= 64), the norms' pixel tiles (several, the last
# partial).
@pytest.mark.parametrize("op,ref,shape", [
    (linear_attention, reference.linear_attention, (1, 2, 32, 2100)),
    (attention, reference.attention, (1, 2, 32, 200)),
    (attention, reference.attention, (1, 1, 64, 70)),
], ids=["linear-3-splits", "attention-4-blocks", "attention-d64"])
def test_attention_tilings(op, ref, shape):
    scale = shape[2] ** -0.5
    assert_matches_reference(lambda q, k, v: op(q, k, v, scale, backend="triton"),
                             lambda q, k, v: ref(q, k, v, scale), _qkv(shape))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_norm_tilings(memory_format):
    x = _randn(2, 16, 48, 50)  # 2400 pixels: 3 tiles per group of 4 channels, 10 of 16 channels x 256
    g, w, bias, scale, shift = _randn(1, 16, 1, 1, seed=1), _randn(16, seed=2), _randn(16, seed=3), \
        _randn(2, 16, 1, 1, seed=4), _randn(2, 16, 1, 1, seed=5)
    fmt = dict(memory_format=memory_format)
    assert_matches_reference(lambda x, g: channel_layer_norm(x.contiguous(**fmt), g, backend="triton"),
                             lambda x, g: reference.channel_layer_norm(x, g, 1e-5), [x, g])
    assert_matches_reference(
        lambda x, *p: group_norm_film_silu(x.contiguous(**fmt), *p, 4, backend="triton"),
        lambda x, *p: reference.group_norm_film_silu(x, *p, 4), [x, w, bias, scale, shift])


@pytest.mark.parametrize("op,ref", [(attention, reference.attention), (linear_attention, reference.linear_attention)],
                         ids=["attention", "linear_attention"])
def test_inputs_with_different_strides(op, ref):
    q, k, v = _qkv((2, 2, 16, 33))
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # token-major, k and v head-major
    out = op(q, k, v, 0.25, backend="triton")
    assert out.stride(1) == 1  # token-major like q
    torch.testing.assert_close(out, ref(q, k, v, 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPCHECK))
def test_same_inputs_give_the_same_bits(name):
    op = getattr(importlib.import_module(f"ddps.ops.{name}"), name)
    runs = []
    for _ in range(2):
        args = OPCHECK[name]()
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name == "group_norm_film_silu":
            args[3], args[4] = args[3][:, :, None, None], args[4][:, :, None, None]
        out = op(*args, backend="triton")
        grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
        runs.append((out.detach(), *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _ops_run(fn) -> set[str]:
    """The ddps custom ops a call runs (its forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name.split("::")[0] + "::" + e.name.split("::")[1] for e in prof.events() if e.name.startswith("ddps")}


def test_fused_unet_on_triton_kernels_matches_reference():
    """backend="triton" reaches every op that has Triton kernels; conv3x3, which has none, takes
    its default (its CPU kernel on CPU tensors, the reference's conv2d on CUDA ones)."""
    torch.manual_seed(0)  # one level: every op once (the interpreter spends about 0.1 s a launch)
    ref = ddps.nn.UNet(dim=16, out_dim=8, channels=5, dim_mults=(1,)).to(DEVICE)
    fused = ddps.nn.UNet(dim=16, out_dim=8, channels=5, dim_mults=(1,), backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x, t = _randn(2, 5, 8, 8), torch.tensor([0, 3], device=DEVICE)
    ref(x, t).square().mean().backward()
    ran = _ops_run(lambda: fused(x, t).square().mean().backward())
    triton = {"attention", "linear_attention", "channel_layer_norm", "group_norm_film_silu"}
    assert {f"ddps_triton::{op}_{way}" for op in triton for way in ("fwd", "bwd")} <= ran
    assert not any(op.startswith("ddps::") and "conv3x3" not in op for op in ran), ran
    assert ("ddps::conv3x3" in ran) == (DEVICE == "cpu")
    with torch.no_grad():
        expected = ref(x, t)
        assert ((fused(x, t) - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        assert ((p_fused.grad - p_ref.grad).abs().max() / p_ref.grad.abs().max()).item() <= 1e-4, name


def test_float64_attention_accumulates_in_float64():
    # Statistics, sums and the saved log-sum-exp in float64 (float32 ones held float64 inputs to
    # float32 accuracy, and did not compile for a GPU).
    leaves = [x.double().requires_grad_() for x in _qkv((1, 2, 32, 70))]
    refs = [x.detach().clone().requires_grad_() for x in leaves]
    out, expected = attention(*leaves, 0.2, backend="triton"), reference.attention(*refs, 0.2)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in [(out, expected), *((x.grad, r.grad) for x, r in zip(leaves, refs))]:
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("op,ref,d", [(attention, reference.attention, 160),
                                      (linear_attention, reference.linear_attention, 80)],
                         ids=["attention-d160", "linear_attention-d80"])
def test_heads_wider_than_the_kernels_take_run_the_composite(op, ref, d):
    from ddps.kernels._layout import MAX_D
    assert d > MAX_D[op.__name__]
    q, k, v = _qkv((1, 2, d, 20))
    torch.testing.assert_close(op(q, k, v, 0.1, backend="triton"), ref(q, k, v, 0.1), rtol=1e-5, atol=1e-6)


def test_float32_attention_follows_torch_tf32_flag():
    from ddps.kernels import attention as kernel
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert kernel._config(32, torch.float32)["PRECISION"] == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kernel._config(32, torch.float32)["PRECISION"] == "tf32"
        assert kernel._config(32, torch.float64)["PRECISION"] == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
