"""Drop-in means drop-in: every fused module of ddps.nn returns what its reference module returns
(shape, dtype and memory format, values within tolerance) for every input the reference takes:
NCHW and channels-last, B = 0, odd sizes, half-precision modules and autocast."""
import itertools

import pytest
import torch

from ddps.nn import unet

# name -> (the module from a backend, the input's channels, extra arguments for batch b)
MODULES = {
    "Attention": (lambda be: unet.Attention(16, backend=be), 16, lambda b: ()),
    "LinearAttention": (lambda be: unet.LinearAttention(16, backend=be), 16, lambda b: ()),
    "LayerNorm": (lambda be: unet.LayerNorm(16, backend=be), 16, lambda b: ()),
    "Conv3x3": (lambda be: unet.Conv3x3(16, 24, backend=be), 16, lambda b: ()),
    "WeightStandardizedConv2d": (lambda be: unet.WeightStandardizedConv2d(16, 24, backend=be), 16, lambda b: ()),
    "Block": (lambda be: unet.Block(16, 24, backend=be), 16, lambda b: ()),
    "ResnetBlock": (lambda be: unet.ResnetBlock(16, 24, time_emb_dim=8, backend=be), 16,
                    lambda b: (torch.randn(b, 8),)),
    # one level: any size; two levels: sizes divisible by 2
    "UNet": (lambda be: unet.UNet(16, 8, 5, dim_mults=(1,), backend=be), 5, lambda b: (torch.randint(0, 10, (b,)),)),
    "UNet-2-levels": (lambda be: unet.UNet(16, 8, 5, dim_mults=(1, 2), backend=be), 5,
                      lambda b: (torch.randint(0, 10, (b,)),)),
}
# how the module and its input are held: (weights' dtype, input's dtype, autocast dtype or None)
PRECISIONS = {"float32": (torch.float32, torch.float32, None),
              "bfloat16-module": (torch.bfloat16, torch.bfloat16, None),
              "float16-module": (torch.float16, torch.float16, None),
              "autocast-bfloat16": (torch.float32, torch.float32, torch.bfloat16)}


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    return "channels-last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def _pair(name: str, weights: torch.dtype):
    build, _, _ = MODULES[name]
    torch.manual_seed(0)
    ref = build("reference").eval()
    fused = build("auto").eval()
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(weights), fused.to(weights)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", MODULES)
def test_fused_module_returns_what_the_reference_returns(name, precision, cpu_dispatch):
    weights, dtype, autocast = PRECISIONS[precision]
    ref, fused = _pair(name, weights)
    exact_ref, _ = _pair(name, torch.float32)
    _, channels, extra = MODULES[name]
    sizes = [(8, 12)] + ([] if name == "UNet-2-levels" else [(7, 5)])
    for b, (h, w), layout in itertools.product((0, 2), sizes, (torch.contiguous_format, torch.channels_last)):
        torch.manual_seed(1)
        x = torch.randn(b, channels, h, w).to(dtype).contiguous(memory_format=layout)
        args = [a.to(dtype) if a.is_floating_point() else a for a in extra(b)]
        with torch.no_grad():
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                try:
                    expected = ref(x, *args)
                except RuntimeError as e:  # what the reference refuses (a half UNet's float32 time embedding)
                    with pytest.raises(RuntimeError, match=str(e).split(",")[0]):
                        fused(x, *args)
                    continue
                got = fused(x, *args)
            exact = exact_ref(x.float(), *(a.float() if a.is_floating_point() else a for a in args))
        case = (b, h, w, _layout(x))
        assert got.shape == expected.shape, case
        assert got.dtype == expected.dtype, case
        assert _layout(got) == _layout(expected), case
        if b == 0:
            continue
        if precision == "float32":
            assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4, case
        else:
            # the flash-attention rule: within twice the reference's own error against float32
            own = (expected.float() - exact).abs().max()
            assert (got.float() - exact).abs().max() <= 2 * own + 1e-2 * exact.abs().max(), case


def test_fused_unet_output_takes_view_like_the_reference():
    # A user's NCHW code calls .view on the output: it must not be channels-last.
    ref, fused = _pair("UNet-2-levels", torch.float32)
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        assert fused(x, t).view(2, -1).shape == ref(x, t).view(2, -1).shape == (2, 8 * 64)
