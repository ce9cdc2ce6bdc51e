"""DALL-E's dVAE (ddps.nn.dvae): the logit-Laplace pixel mapping, the architecture's data flow
written out in the test, the decode lookup against the released one-hot convolution, and the
explicit conversion of the released pickles."""
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.dalle import released_pickles, small_dvae

from ddps import maskige
from ddps.nn.dvae import DalleDVAE, load_released, map_pixels, unmap_pixels
from ddps.nn.gss import FrozenFeatureConditioning, GSSHead


_small = small_dvae


def test_logit_laplace_mapping_is_the_formula():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(map_pixels(x), 0.8 * x + 0.1)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x)
    assert torch.equal(unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(unmap_pixels(torch.tensor([0.3])), torch.tensor([0.25]))


def _block(block, x, kernels):
    # id_path(x) + (conv_4 relu conv_3 relu conv_2 relu conv_1 relu x) / layers^2, written out
    y = x
    for i, k in enumerate(kernels):
        conv = getattr(block.res_path, f"conv_{i + 1}")
        assert conv.kernel_size == (k, k)
        y = F.conv2d(y.relu(), conv.weight, conv.bias, padding=k // 2)
    skip = x if isinstance(block.id_path, nn.Identity) else F.conv2d(x, block.id_path.weight, block.id_path.bias)
    return skip + y / (4 * 1) ** 2  # GROUPS x blocks_per_group layers


def test_encoder_and_decoder_compute_dalles_data_flow():
    model = _small()
    m = torch.rand(2, 3, 16, 24)
    x = F.conv2d(map_pixels(m), model.encoder.blocks.input.weight, model.encoder.blocks.input.bias, padding=3)
    for g in range(4):
        group = getattr(model.encoder.blocks, f"group_{g + 1}")
        x = _block(group.block_1, x, (3, 3, 3, 1))
        assert x.shape[1] == 8 * 2 ** g
        if g < 3:
            x = F.max_pool2d(x, 2)
    out = model.encoder.blocks.output.conv
    logits = F.conv2d(x.relu(), out.weight, out.bias)
    assert logits.shape == (2, 16, 2, 3)
    assert torch.allclose(model.logits(m), logits, atol=1e-6)
    assert torch.equal(model.encode(m), model.logits(m).argmax(1))

    codes = torch.randint(0, 16, (2, 2, 3))
    one_hot = F.one_hot(codes, 16).movedim(-1, 1).float()
    x = F.conv2d(one_hot, model.decoder.blocks.input.weight, model.decoder.blocks.input.bias)  # as released
    for g in range(4):
        group = getattr(model.decoder.blocks, f"group_{g + 1}")
        x = _block(group.block_1, x, (1, 3, 3, 3))
        assert x.shape[1] == 8 * 2 ** (3 - g)
        if g < 3:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
    out = model.decoder.blocks.output.conv
    x = F.conv2d(x.relu(), out.weight, out.bias)
    assert x.shape == (2, 6, 16, 24)  # three means, three log-scales
    expected = ((torch.sigmoid(x[:, :3]) - 0.1) / 0.8).clamp(0, 1)
    assert torch.allclose(model.decode(codes), expected, atol=1e-6)


def test_block_widths_and_shortcuts_are_dalles():
    keys = set(DalleDVAE().state_dict())
    model = DalleDVAE(codes=16, hidden=8)
    for part, kernels in (("encoder", (3, 3, 3, 1)), ("decoder", (1, 3, 3, 3))):
        for g in range(1, 5):
            for b in (1, 2):
                block = getattr(getattr(getattr(model, part).blocks, f"group_{g}"), f"block_{b}")
                convs = [getattr(block.res_path, f"conv_{i}") for i in range(1, 5)]
                cout = convs[-1].out_channels
                assert [c.out_channels for c in convs] == [cout // 4] * 3 + [cout]
                assert [c.kernel_size[0] for c in convs] == list(kernels)
                assert [c.padding[0] for c in convs] == [k // 2 for k in kernels]
                # a 1x1 convolution on the shortcut only where the width changes, as released
                assert isinstance(block.id_path, nn.Identity) == (convs[0].in_channels == cout)
    assert "encoder.blocks.group_1.block_1.id_path.weight" not in keys
    assert "encoder.blocks.group_2.block_1.id_path.weight" in keys
    assert "decoder.blocks.group_1.block_1.id_path.weight" in keys and \
        "decoder.blocks.group_1.block_2.id_path.weight" not in keys


def test_released_sizes():
    model = DalleDVAE()
    assert model.encoder.blocks.output.conv.out_channels == 8192
    assert model.decoder.blocks.input.weight.shape == (128, 8192, 1, 1)
    assert model.encoder.blocks.group_4.block_2.res_path.conv_4.weight.shape == (2048, 512, 1, 1)
    assert model.decoder.blocks.group_1.block_1.id_path.weight.shape == (2048, 128, 1, 1)
    assert model.decoder.blocks.output.conv.weight.shape == (6, 256, 1, 1)


def test_bad_input_is_named():
    model = _small()
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model.decode(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match="missing"):
        model.load_weights({})


def test_released_pickles_convert_to_the_same_model(tmp_path, monkeypatch):
    model = _small()
    encoder_pkl, decoder_pkl = released_pickles(model, tmp_path, monkeypatch)
    tensors = load_released(encoder_pkl, decoder_pkl)
    assert set(tensors) == set(model.state_dict())
    loaded = _small(seed=1)
    loaded.load_weights(tensors)
    m = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.encode(m), model.encode(m))
    assert torch.equal(loaded.decode(model.encode(m)), model.decode(model.encode(m)))


def test_a_file_without_a_module_is_named(tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=f"{path}: holds a dict, not DALL-E's encoder"):
        load_released(path, path)


def test_a_pickle_naming_anything_else_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))
    path = tmp_path / "encoder.pkl"
    torch.save(Payload(), path)
    with pytest.raises(pickle.UnpicklingError, match=r"the file names (__builtin__|builtins)\.print"):
        load_released(path, path)


def test_gss_head_on_the_dvae_keeps_it_frozen():
    head = GSSHead(5, _small(), maskige.palette(5), FrozenFeatureConditioning(8, 16, 5, dim=16)).train()
    assert head.prior_parameters() == []  # GSS's dVAE is not trained: no prior stage
    before = {k: v.clone() for k, v in head.vq.state_dict().items()}
    labels = torch.randint(0, 5, (2, 16, 24))
    head.loss(torch.randn(2, 8, 4, 6), labels).backward()
    assert all(p.grad is None for p in head.vq.parameters())
    assert all(torch.equal(v, before[k]) for k, v in head.vq.state_dict().items())
    scores, _ = head.eval().sample(torch.randn(2, 8, 4, 6))
    assert scores.shape == (2, 5, 16, 24)
    assert head.reconstruct(labels).shape == labels.shape
