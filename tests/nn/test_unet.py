"""The denoiser modules against the original's golden outputs and state-dict layout."""
import json

import pytest
import torch

import ddps
from helpers import FIXTURES


def _load(cls, golden):
    module = cls(**golden["config"])
    module.load_state_dict(golden["state_dict"], strict=True)
    return module.eval()


def test_unet_reproduces_original(official):
    golden = official["unet"]
    unet = _load(ddps.nn.UNet, golden)
    with torch.no_grad():
        y = unet(golden["x"], golden["t"])
    assert y.shape == golden["y"].shape
    assert (y - golden["y"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name,cls", [("attention", ddps.nn.Attention), ("linear_attention", ddps.nn.LinearAttention)])
def test_attention_reproduces_original(official, name, cls):
    golden = official[name]
    module = _load(cls, golden)
    with torch.no_grad():
        y = module(golden["x"])
    assert (y - golden["y"]).abs().max() <= 1e-5


def test_unet_ade20k_keys_and_shapes():
    expected = json.loads((FIXTURES / "official_unet_keys_ade20k.json").read_text())
    unet = ddps.nn.UNet(dim=256, out_dim=256, channels=272, dim_mults=(1, 1, 1))
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert shapes == expected
    assert len(shapes) == 218
    assert round(sum(v.numel() for v in unet.state_dict().values()) / 1e6, 1) == 40.8


def test_unet_backward_reaches_every_parameter():
    unet = ddps.nn.UNet(dim=8, out_dim=8, channels=5, dim_mults=(1, 2))
    unet(torch.randn(2, 5, 8, 8), torch.tensor([0, 3])).square().mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("call,match", [
    (lambda u: u(torch.randn(1, 4, 8, 8), torch.tensor([0])), r"x must be \[B, channels=5"),
    (lambda u: u(torch.randn(1, 5, 6, 6), torch.tensor([0])), "divisible by 4"),
    (lambda u: u(torch.randn(2, 5, 8, 8), torch.tensor([0])), r"time must have shape \[2\]"),
])
def test_unet_bad_input(call, match):
    unet = ddps.nn.UNet(dim=8, out_dim=8, channels=5, dim_mults=(1, 1, 1))
    with pytest.raises(ValueError, match=match):
        call(unet)


def test_module_backend_argument_is_validated():
    with pytest.raises(ValueError, match=r"backend='fused' is not a backend; choose one of \('reference', 'auto'"):
        ddps.nn.UNet(dim=8, out_dim=8, channels=5, dim_mults=(1,), backend="fused")
    with pytest.raises(ValueError, match="multiples of resnet_block_groups"):
        ddps.nn.UNet(dim=12, out_dim=8, channels=5, dim_mults=(1,))


def _pair(**config):
    """A reference UNet with seeded random weights and a fused UNet with the same weights."""
    torch.manual_seed(0)
    ref = ddps.nn.UNet(**config)
    fused = ddps.nn.UNet(**config, backend="auto")
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fused_unet_matches_reference_on_fixture(official):
    golden = official["unet"]
    fused = ddps.nn.UNet(**golden["config"], backend="auto")
    fused.load_state_dict(golden["state_dict"], strict=True)
    with torch.no_grad():
        y = fused.eval()(golden["x"], golden["t"])
    assert _relative_error(y, golden["y"]) <= 1e-4


def test_fused_unet_matches_reference_ade20k_config():
    # The ADE20K denoiser (dim 256, 272 input channels, three levels) with random weights, on a
    # 32x32 mask (the layer structure is the same at 128x128).
    ref, fused = (m.eval() for m in _pair(dim=256, out_dim=256, channels=272, dim_mults=(1, 1, 1)))
    x, t = torch.randn(1, 272, 32, 32), torch.tensor([7])
    with torch.no_grad():
        assert _relative_error(fused(x, t), ref(x, t)) <= 1e-4


def test_fused_unet_is_channels_last_with_the_same_state_dict():
    ref, fused = (m.eval() for m in _pair(dim=16, out_dim=8, channels=5, dim_mults=(1, 2)))
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    back = ddps.nn.UNet(dim=16, out_dim=8, channels=5, dim_mults=(1, 2))
    back.load_state_dict(fused.state_dict(), strict=True)
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        # channels-last inside, the reference's NCHW out
        assert fused.forward_native_layout(x, t).is_contiguous(memory_format=torch.channels_last)
        out = fused(x, t)
        assert out.is_contiguous()
        torch.testing.assert_close(back(x, t), ref(x, t), rtol=0, atol=0)
        assert _relative_error(out, ref(x, t)) <= 1e-4


def test_fused_unet_gradients_match_reference():
    ref, fused = _pair(dim=16, out_dim=8, channels=5, dim_mults=(1, 2))
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([0, 3])
    for module in (ref, fused):
        module(x, t).square().mean().backward()
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        assert _relative_error(p_fused.grad, p_ref.grad) <= 1e-4, name


def test_weight_standardization_cache_follows_weight_changes():
    ref, fused = (m.eval() for m in _pair(dim=16, out_dim=8, channels=5, dim_mults=(1, 2)))
    x, t = torch.randn(1, 5, 8, 8), torch.tensor([2])
    with torch.no_grad():
        fused(x, t)
        conv = fused.downs[0][0].block1.proj
        cached = conv._cached[1]
        fused(x, t)
        assert conv._cached[1] is cached  # reused while the weight is unchanged
        for module in (ref, fused):  # an in-place update, as an optimizer step makes
            for p in module.parameters():
                p.mul_(1.01)
        assert conv._cached[1] is cached
        assert _relative_error(fused(x, t), ref(x, t)) <= 1e-4
        assert conv._cached[1] is not cached
    # Training differentiates through the standardisation instead of using the cache.
    fused.train()(x, t).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_fused_unet_under_cpu_autocast_bfloat16(cpu_dispatch):
    # avx512-dispatch: the C++ attention kernels on the bfloat16 qkv convolutions' output.
    ref, fused = (m.eval() for m in _pair(dim=16, out_dim=8, channels=5, dim_mults=(1, 2)))
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        expected = ref(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_ref, low_fused = ref(x, t).float(), fused(x, t).float()
    assert torch.isfinite(low_fused).all()
    # The flash-attention rule at module level: within twice the reference's own bf16 error.
    assert (low_fused - expected).abs().max() <= 2 * (low_ref - expected).abs().max() + 1e-2 * expected.abs().max()


def _autocast_outputs(unet, x, t, modules, grad=False):
    """unet(x, t) under bfloat16 autocast and the outputs of ``modules`` in that call."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in modules]
    try:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen


def test_fused_unet_under_autocast_rounds_what_only_convolutions_read(cpu_dispatch):
    # Without autograd, the up levels' attention blocks and every PreNorm's LayerNorm return
    # autocast's dtype: only convolutions read them, which round them to it anyway, so the output
    # is bit for bit the one of float32 sums (the blocks' flag off; the LayerNorms, computed by
    # another kernel, are tested in test_channel_layer_norm).
    ref, fused = (m.eval() for m in _pair(dim=16, out_dim=8, channels=5, dim_mults=(1, 2, 2)))
    x, t = torch.randn(1, 5, 16, 16), torch.tensor([3])
    # The reference computes as the original: its LayerNorms return float32.
    ref_norms = [m.norm for m in ref.modules() if isinstance(m, ddps.nn.unet.PreNorm)]
    assert {o.dtype for o in _autocast_outputs(ref, x, t, ref_norms)[1]} == {torch.float32}
    ups = [level[2] for level in fused.ups]
    norms = [m.norm for m in fused.modules() if isinstance(m, ddps.nn.unet.PreNorm)]
    assert all(block.read_by_convolutions for block in ups)
    assert not any(m.read_by_convolutions for m in fused.modules()
                   if isinstance(m, ddps.nn.unet.Residual) and not any(m is b for b in ups))
    rounded, seen = _autocast_outputs(fused, x, t, ups + norms)
    assert [o.dtype for o in seen] == [torch.bfloat16] * len(seen)
    for block in ups:
        block.read_by_convolutions = False
    wide, seen = _autocast_outputs(fused, x, t, ups)
    assert [o.dtype for o in seen] == [torch.float32] * len(ups)
    assert torch.equal(rounded, wide)
    # The down levels' are not rounded: their skip reaches a Block whose weight standardisation
    # takes eps by its input's dtype (1e-5 for the float32 the reference's concatenation gives).
    for level in fused.downs:
        level[2].read_by_convolutions = True
    assert not torch.equal(_autocast_outputs(fused, x, t, [])[0], wide)


def test_fused_unet_rounds_nothing_under_autograd():
    # In training the readers' gradients would be summed in bfloat16: the float32 sums stay.
    _, fused = _pair(dim=16, out_dim=8, channels=5, dim_mults=(1, 2))
    norms = [m.norm for m in fused.modules() if isinstance(m, ddps.nn.unet.PreNorm)]
    _, seen = _autocast_outputs(fused.train(), torch.randn(1, 5, 8, 8), torch.tensor([3]),
                                [level[2] for level in fused.ups] + norms, grad=True)
    assert [o.dtype for o in seen] == [torch.float32] * len(seen)


def test_fused_unet_compiles_fullgraph():
    ref, fused = (m.eval() for m in _pair(dim=8, out_dim=8, channels=5, dim_mults=(1, 2)))
    x, t = torch.randn(1, 5, 8, 8), torch.tensor([1])
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert _relative_error(compiled(x, t), ref(x, t)) <= 1e-4


@pytest.mark.parametrize("cls", [ddps.nn.Attention, ddps.nn.LinearAttention], ids=["attention", "linear_attention"])
def test_fused_attention_modules_on_nchw_under_cpu_autocast_bfloat16(cls, cpu_dispatch):
    # NCHW input: matmuls for the 1x1 convolutions (composites) or one conversion to channels-last
    # (kernels); either way bfloat16 out, within the flash-attention rule of the reference's error.
    torch.manual_seed(0)
    ref = cls(32).eval()
    fused = cls(32, backend="auto").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 8, 12)
    with torch.no_grad():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_ref, low_fused = ref(x), fused(x)
    # the reference's dtype (LinearAttention's LayerNorm, with its float32 gain, returns float32)
    assert low_fused.dtype == low_ref.dtype and low_fused.is_contiguous()
    low_ref, low_fused = low_ref.float(), low_fused.float()
    assert (low_fused - expected).abs().max() <= 2 * (low_ref - expected).abs().max() + 1e-2 * expected.abs().max()


@pytest.mark.parametrize("cls", [ddps.nn.Attention, ddps.nn.LinearAttention], ids=["attention", "linear_attention"])
def test_fused_attention_modules_train_under_compile_fullgraph(cls, kernel_dispatch):
    # The C++ kernels' path (channels-last float32, d = 32; d(qkv) one tensor), which CPUs without
    # AVX-512 take only when told to (they are correct there, only slower).
    module = cls(16, backend="auto").to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    results = []
    # A fresh start: after a compile of the same forward at other shapes in this process (the
    # bench's tests) dynamo would make the shapes dynamic, on which Inductor 2.13 fails for the
    # LinearAttention composite's graph (see ddps/bench/cases.py).
    torch._dynamo.reset()
    for fn in (torch.compile(module, fullgraph=True), module):
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, module.to_qkv.weight.grad])
    # Inductor reassociates the float32 sums of the graph around the op (1-2e-5 seen here).
    for got, expected in zip(*results):
        assert _relative_error(got, expected) <= 1e-4


@pytest.mark.parametrize("block", ["LinearAttention", "Attention", "ResnetBlock", "Block"])
def test_fused_blocks_take_any_layout_and_return_the_references(block, cpu_dispatch):
    # avx512-dispatch: C++ attention kernels on channels-last input, x converted once.
    cls = getattr(ddps.nn.unet, block)
    args, extra = {"LinearAttention": ((32,), ()), "Attention": ((32,), ()), "Block": ((32, 48), ()),
                   "ResnetBlock": ((32, 48), ())}[block]
    kwargs = {"time_emb_dim": 16} if block == "ResnetBlock" else {}
    torch.manual_seed(0)
    ref = cls(*args, **kwargs).eval()
    fused = cls(*args, **kwargs, backend="auto").eval()
    fused.load_state_dict(ref.state_dict(), strict=True)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fused.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, 32, 8, 12)
    extra = (torch.randn(2, 16),) if block == "ResnetBlock" else ()
    with torch.no_grad():
        expected = ref(x, *extra)
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = fused(x.contiguous(memory_format=fmt), *extra)
            # the reference's layout: the convolutions keep it, the attention blocks' reshapes return NCHW
            layout = fmt if block in ("ResnetBlock", "Block") else torch.contiguous_format
            assert out.is_contiguous(memory_format=layout), (block, fmt)
            assert _relative_error(out, expected) <= 1e-5, (block, fmt)
    # Gradients flow through the conversions back to an NCHW input.
    leaf = x.clone().requires_grad_()
    fused.train()
    fused(leaf, *extra).square().sum().backward()
    ref_leaf = x.clone().requires_grad_()
    ref.train()
    ref(ref_leaf, *extra).square().sum().backward()
    assert leaf.grad.is_contiguous() and _relative_error(leaf.grad, ref_leaf.grad) <= 1e-4
    # and into every parameter (the attention blocks' 1x1 convolutions run as matmuls on NCHW).
    expected_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert _relative_error(p.grad, expected_grads[name].grad) <= 1e-4, name
