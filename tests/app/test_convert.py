import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddps.app import checkpoint, config
from ddps.app.cli import main
from ddps.app.model import build_head, load_run
from ddps.app.mmseg import mmseg_segformer
from ddps.app.segmentors.segformer import MMSegSegFormer, OriginalSegFormerHead, SegFormerSegmentor
from helpers.app import B0_DEPTHS, B0_HEADS, B0_WIDTHS, CHANNELS, PATCH, SR, mmseg_b0_state


def mmseg_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """mmseg's MixVisionTransformer and the original's SegFormer head, as their code computes them
    (nn.MultiheadAttention on (tokens, batch, C), 1x1 convolutions in MixFFN, LayerNorm eps 1e-6,
    BatchNorm with running statistics), straight from an mmseg state dict: the fused features."""
    def ln(t, prefix):
        return F.layer_norm(t, t.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-6)

    def nchw(t, hw):
        return t.transpose(1, 2).reshape(t.shape[0], -1, *hw)

    def conv_bn_relu(t, prefix):
        t = F.conv2d(t, state[f"{prefix}.conv.weight"])
        return F.relu(F.batch_norm(t, state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"],
                                   state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"], False, 0.0, 1e-5))

    levels = []
    for i, c in enumerate(B0_WIDTHS):
        stage = f"backbone.layers.{i}"
        x = F.conv2d(x, state[f"{stage}.0.projection.weight"], state[f"{stage}.0.projection.bias"],
                     stride=4 if i == 0 else 2, padding=PATCH[i] // 2)
        hw = x.shape[-2:]
        x = ln(x.flatten(2).transpose(1, 2), f"{stage}.0.norm")
        for j in range(B0_DEPTHS[i]):
            layer = f"{stage}.1.{j}"
            y = ln(x, f"{layer}.norm1")
            kv = y
            if SR[i] > 1:
                kv = F.conv2d(nchw(y, hw), state[f"{layer}.attn.sr.weight"], state[f"{layer}.attn.sr.bias"],
                              stride=SR[i])
                kv = ln(kv.flatten(2).transpose(1, 2), f"{layer}.attn.norm")
            mha = torch.nn.MultiheadAttention(c, B0_HEADS[i], bias=True).to(x.dtype)
            mha.load_state_dict({k: state[f"{layer}.attn.attn.{k}"] for k in mha.state_dict()})
            x = x + mha(y.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1))[0].transpose(0, 1)
            y = nchw(ln(x, f"{layer}.norm2"), hw)
            y = F.conv2d(y, state[f"{layer}.ffn.layers.0.weight"], state[f"{layer}.ffn.layers.0.bias"])
            y = F.gelu(F.conv2d(y, state[f"{layer}.ffn.layers.1.weight"], state[f"{layer}.ffn.layers.1.bias"],
                                padding=1, groups=y.shape[1]))
            y = F.conv2d(y, state[f"{layer}.ffn.layers.4.weight"], state[f"{layer}.ffn.layers.4.bias"])
            x = x + y.flatten(2).transpose(1, 2)
        x = ln(x, f"{stage}.2")
        levels.append(nchw(x, hw))
        x = levels[-1]
    size = levels[0].shape[-2:]
    outs = [F.interpolate(conv_bn_relu(t, f"decode_head.convs.{i}"), size=size, mode="bilinear", align_corners=False)
            for i, t in enumerate(levels)]
    return conv_bn_relu(torch.cat(outs, 1), "decode_head.fusion_conv")


def smoke_cfg():
    return config.load(config.find("synthetic-smoke"))


def ddps_checkpoint(gen: torch.Generator) -> dict:
    """A whole original DDPS checkpoint at B0 size: MiT backbone, SegFormer head, the DDPS head of
    the synthetic-smoke config (K = 6 + 1 for ignored pixels) and its EMA buffers."""
    state = mmseg_b0_state(gen)
    head = build_head(smoke_cfg(), CHANNELS, for_training=True)
    for key, value in head.state_dict().items():
        state["decode_head." + key] = value.clone()
        if key.startswith(("unet.", "conv_seg_new.")):
            state["decode_head.ema_" + key.replace(".", "_")] = value.clone() + 1
    return {"state_dict": state, "meta": {"mmseg_version": "0.30.0", "iter": 160000}}


def test_mit_mapping_computes_what_mmseg_computes():
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    state = mmseg_b0_state(gen)
    seg_keys, tensors, read = mmseg_segformer(state)
    assert seg_keys == {"type": "segformer-mmseg", "variant": "b0", "channels": CHANNELS, "classifier_classes": None}
    assert read == set(state)  # every key of the backbone and the SegFormer head is converted
    seg = MMSegSegFormer(6, "b0", CHANNELS)
    seg.load_state_dict(tensors)  # strict: every parameter and buffer comes from the checkpoint
    seg = seg.double().eval()
    x = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    levels = seg.backbone(pixel_values=x, output_hidden_states=True).hidden_states
    # float64, so that a wrong LayerNorm eps (transformers' 1e-5) or a swapped key/value shows
    state64 = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    torch.testing.assert_close(seg.decode(levels), mmseg_reference(state64, x), rtol=1e-9, atol=1e-9)
    features, logits = seg.float()(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert features.shape == (2, CHANNELS, 16, 24) and logits is None and (features >= 0).all()


def test_original_head_against_a_hand_built_mmseg_head():
    # the head alone, tiny and by hand: two levels, ConvModule = conv (no bias) -> BN -> ReLU
    gen = torch.Generator().manual_seed(1)
    head = OriginalSegFormerHead((3, 5), 4).eval()
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(4, generator=gen))
            module.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
            module.weight.data.copy_(torch.randn(4, generator=gen))
    levels = [torch.randn(1, 3, 4, 6, generator=gen), torch.randn(1, 5, 2, 3, generator=gen)]

    def by_hand(module, x):
        bn = module.bn
        y = torch.einsum("oc,bchw->bohw", module.conv.weight[:, :, 0, 0], x)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
        return (y * bn.weight[:, None, None] + bn.bias[:, None, None]).clamp(min=0)

    a = by_hand(head.convs[0], levels[0])
    b = F.interpolate(by_hand(head.convs[1], levels[1]), size=(4, 6), mode="bilinear", align_corners=False)
    expected = by_hand(head.fusion_conv, torch.cat([a, b], 1))
    torch.testing.assert_close(head(levels), expected)
    assert [k for k in head.state_dict() if k.startswith("convs.0.")] == [
        "convs.0.conv.weight", "convs.0.bn.weight", "convs.0.bn.bias", "convs.0.bn.running_mean",
        "convs.0.bn.running_var", "convs.0.bn.num_batches_tracked"]  # mmseg's names


def test_convert_whole_checkpoint_into_a_run(tmp_path, capsys):
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(2)
    ckpt = ddps_checkpoint(gen)
    torch.save(ckpt, tmp_path / "orig.pth")
    run = tmp_path / "run"
    assert main(["convert", str(tmp_path / "orig.pth"), "--config", "synthetic-smoke", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "MiT-B0" in out and f"ddps eval --run {run}" in out and "left out" not in out
    tensors = checkpoint.load_weights(run / "model.safetensors")
    state = ckpt["state_dict"]
    for key, value in build_head(smoke_cfg(), CHANNELS, for_training=True).state_dict().items():
        assert torch.equal(tensors["head." + key], state["decode_head." + key]), key
        if key.startswith("unet."):
            assert torch.equal(tensors["ema." + key], state["decode_head.ema_" + key.replace(".", "_")]), key
    cfg, segmentor, head = load_run(run)
    assert (cfg.segmentor.type, cfg.segmentor.variant, cfg.segmentor.channels) == ("segformer-mmseg", "b0", CHANNELS)
    # the converted segmentor computes what mmseg computes from the original weights
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    features, logits = segmentor(images)
    torch.testing.assert_close(features, mmseg_reference(state, segmentor.normalize(images)), rtol=1e-4, atol=1e-4)
    # ddps eval and segment use the run directly; without a classifier there is no segmentor row
    assert main(["eval", "--run", str(run), "--limit", "2", "--panels", str(tmp_path / "panels")]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert "base" not in report and set(report["ddps"]["steps"]) == {"0", "5", "9"}
    assert "segmentor" not in capsys.readouterr().out.split("wrote")[0]
    assert main(["eval", "--run", str(run), "--base-only"]) == 2
    assert "no classifier of its own" in capsys.readouterr().err
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    assert main(["segment", "--run", str(run), "--out", str(tmp_path / "masks"), str(tmp_path / "photo.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["legend.png", "photo.png"]
    # a new DDPS head trained on the converted segmentor, as the README says
    assert main(["train", "--config", "synthetic-smoke", "--out", str(tmp_path / "new"), "segmentor.type=segformer-mmseg",
                 "segmentor.variant=b0", f"segmentor.channels={CHANNELS}",
                 f"segmentor.checkpoint={run / 'model.safetensors'}", "train.iters=2", "eval.panels=0"]) == 0
    trained = checkpoint.load_weights(tmp_path / "new" / "model.safetensors")
    assert all(torch.equal(trained[k], tensors[k]) for k in tensors if k.startswith("segmentor."))
    # a second convert into the same run would overwrite it
    assert main(["convert", str(tmp_path / "orig.pth"), "--config", "synthetic-smoke", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_convert_with_the_segformer_classifier(tmp_path, capsys):
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(3)
    ckpt = ddps_checkpoint(gen)
    torch.save(ckpt, tmp_path / "orig.pth")
    # the original SegFormer checkpoint: the same backbone and head, plus its 5-class classifier
    # (one fewer than the 6 classes: class 0 is prepended)
    segformer = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("backbone.", "decode_head.convs.",
                                                                                "decode_head.fusion_conv."))}
    segformer["decode_head.conv_seg.weight"] = torch.randn(5, CHANNELS, 1, 1, generator=gen)
    segformer["decode_head.conv_seg.bias"] = torch.randn(5, generator=gen)
    torch.save({"state_dict": segformer}, tmp_path / "segformer.pth")
    run = tmp_path / "run"
    args = ["convert", str(tmp_path / "orig.pth"), "--config", "synthetic-smoke", "--out", str(run)]
    assert main([*args, "--segformer", str(tmp_path / "segformer.pth")]) == 0
    assert "classifier of 5 classes" in capsys.readouterr().out
    _, segmentor, _ = load_run(run)
    features, logits = segmentor(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert logits.shape == (1, 6, 16, 16) and (logits[:, 0] == -1e4).all()
    expected = F.conv2d(features, segformer["decode_head.conv_seg.weight"], segformer["decode_head.conv_seg.bias"])
    torch.testing.assert_close(logits[:, 1:], expected)
    assert main(["eval", "--run", str(run), "--limit", "1", "--base-only"]) == 0
    assert "base" in json.loads((run / "eval.json").read_text())
    # a SegFormer checkpoint whose head is not the DDPS checkpoint's: its classifier would read
    # features it was not trained on
    segformer["decode_head.fusion_conv.conv.weight"] = segformer["decode_head.fusion_conv.conv.weight"] + 1
    torch.save({"state_dict": segformer}, tmp_path / "other.pth")
    args[-1] = str(tmp_path / "run2")
    assert main([*args, "--segformer", str(tmp_path / "other.pth")]) == 2
    assert "decode_head.fusion_conv.conv.weight" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_convert_refuses_unsafe_and_wrong_files(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": {"x": Payload()}}))
    args = ["--config", "synthetic-smoke", "--out", str(tmp_path / "run")]
    assert main(["convert", str(tmp_path / "evil.pth"), *args]) == 2
    captured = capsys.readouterr()
    assert "not loadable with torch.load(weights_only=True)" in captured.err and "unpickled!" not in captured.out
    assert "weights_only=False" not in captured.err  # torch's advice, not for a CLI user
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    assert main(["convert", str(tmp_path / "random.pth"), *args]) == 2
    err = capsys.readouterr().err
    assert "not loadable" in err and "weights_only=False" not in err and "Traceback" not in err
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(4)
    whole = ddps_checkpoint(gen)
    for drop, message in [("decode_head.unet.init_conv.weight", "decode_head.unet.init_conv.weight"),
                          ("backbone.layers.1.1.0.attn.attn.in_proj_weight", "backbone.layers.1.1.0.attn.attn"),
                          ("decode_head.fusion_conv.conv.weight", "decode_head.fusion_conv.conv.weight")]:
        ckpt = {"state_dict": {k: v for k, v in whole["state_dict"].items() if k != drop}}
        torch.save(ckpt, tmp_path / "partial.pth")
        assert main(["convert", str(tmp_path / "partial.pth"), *args]) == 2
        assert message in capsys.readouterr().err, drop
    # a head-only state dict (what ddps convert used to take): no backbone to run it with
    head_only = {k: v for k, v in whole["state_dict"].items() if not k.startswith("backbone.")}
    torch.save({"state_dict": head_only}, tmp_path / "head_only.pth")
    assert main(["convert", str(tmp_path / "head_only.pth"), *args]) == 2
    assert "no MiT backbone" in capsys.readouterr().err
    # a head of other sizes: the shapes do not fit the config
    torch.save(whole, tmp_path / "orig.pth")
    assert main(["convert", str(tmp_path / "orig.pth"), *args, "head.dim=32"]) == 2
    assert "size mismatch" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.pth"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def tiny_segformer_config(num_labels):
    transformers = pytest.importorskip("transformers")
    return transformers.SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1],
                                        sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
                                        num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=24, num_labels=num_labels)


def test_segformer_adapter_gives_fused_features(tmp_path):
    seg = SegFormerSegmentor(5, config=tiny_segformer_config(5)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    features, logits = seg(images)
    assert features.shape == (2, 24, 16, 16) and logits.shape == (2, 5, 16, 16)
    assert (features >= 0).all()  # after the decode head's ReLU
    # the logits are the classifier applied to exactly these features
    torch.testing.assert_close(seg.model.decode_head.classifier(features), logits)
    # a checkpoint with one label fewer keeps its classifier; class 0 ("other") gets a low logit
    seg.model.save_pretrained(tmp_path / "sf")
    other = SegFormerSegmentor(6, pretrained=str(tmp_path / "sf")).eval()
    f2, l2 = other(images)
    assert l2.shape == (2, 6, 16, 16) and (l2[:, 0] == -1e4).all()
    torch.testing.assert_close(l2[:, 1:], logits)
    torch.testing.assert_close(f2, features)


def test_convert_reads_no_dataset(tmp_path, capsys):
    # The README's command: the ade20k config names no data.root, which convert never reads.
    assert main(["convert", str(tmp_path / "missing.pth"), "--config", "ade20k", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "data.root" not in err


def test_convert_dalle_writes_the_released_dvae_as_safetensors(tmp_path, monkeypatch, capsys):
    from helpers.dalle import released_pickles, small_dvae

    from ddps.app import checkpoint
    from ddps.nn import dvae
    model = small_dvae()
    encoder, decoder = released_pickles(model, tmp_path, monkeypatch)
    out = tmp_path / "weights" / "dvae.safetensors"
    args = ["convert", "--dalle", str(encoder), str(decoder), "--out", str(out)]
    assert main(args) == 2  # not the released sizes: refused, nothing written
    assert "dVAE weights do not fit" in capsys.readouterr().err and not out.exists()
    small = small_dvae(seed=1)
    monkeypatch.setattr(dvae, "DalleDVAE", lambda: small)  # the sizes --dalle checks against
    assert main(args) == 0
    assert f"head.gss.dalle_weights={out}" in capsys.readouterr().out
    assert {k: v.tolist() for k, v in checkpoint.load_weights(out).items()} == \
        {k: v.tolist() for k, v in dvae.load_released(encoder, decoder).items()}
    assert main(args) == 2 and "exists; choose another file" in capsys.readouterr().err
    assert main(["convert", "x.pth", "--dalle", "a.pkl", str(decoder), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint: not read with --dalle" in err and "--dalle: a.pkl does not exist" in err
