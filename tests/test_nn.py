"""The denoiser modules against the original's golden outputs and state-dict layout."""
import json

import pytest
import torch

import ddps
from conftest import FIXTURES


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
    with pytest.raises(ValueError, match="backend='fused'"):
        ddps.nn.UNet(dim=8, out_dim=8, channels=5, dim_mults=(1,), backend="fused")
    with pytest.raises(ValueError, match="multiples of resnet_block_groups"):
        ddps.nn.UNet(dim=12, out_dim=8, channels=5, dim_mults=(1,))
