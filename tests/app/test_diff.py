"""The diffusion-feature segmentor (DIFF, ddps.nn.diff) with the tiny random Stable-Diffusion-shaped
model: shapes per stride, the hooked features against a recomputation by hand, determinism, which
parts train, IPKL's branch, the frozen model's loading and checkpointing, config errors, and the
recipe end to end (both stages, eval.json, the head stage on cached features = on live ones)."""
import json
import sys

import pytest
import torch
from torch.nn import functional as F

from ddps.app import config
from ddps.app.checkpoint import load_weights
from ddps.app.segmentors import build_segmentor
from ddps.app.stages import FeatureCache
from helpers.app import pretrained_folder, run_cli

TINY = ["segmentor.type=diffusion-features", "segmentor.diff.timesteps=[50,25,10]", "segmentor.diff.save_steps=[1,2]",
        "segmentor.diff.projection=[16,16,32]", "segmentor.diff.projection_x4=16", "segmentor.channels=16"]
PROMPTS = "segmentor.diff.class_prompts=['', 'a disc', 'a square', 'a triangle', 'a ring', 'a cross']"


def build(*overrides, seed=0):
    cfg = config.load(None, [*TINY, *overrides])
    torch.manual_seed(seed)
    return build_segmentor(cfg, 6)


def images(b=2, h=64, w=64, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_channels_per_stride():
    seg = build().eval()
    with torch.no_grad():
        levels = seg.backbone.features(seg.backbone.encode(images()))
    # latent 8 x 8; up blocks 3, 2, 1 at 8, 4, 2 (image strides 8, 16, 32)
    assert [tuple(x.shape[-2:]) for x in levels] == [(8, 8), (4, 4), (2, 2)]
    # per block 2 resnets + 2 transformer blocks, each kept at 2 steps: 16-wide blocks 3, 2, 32-wide block 1
    assert [x.shape[1] for x in levels] == seg.backbone.channels() == [4 * 16 * 2, 4 * 16 * 2, 4 * 32 * 2]
    with torch.no_grad():
        features, logits = seg(images())
        assert features.shape == (2, 16, 16, 16) and logits.shape == (2, 6, 16, 16)
        features, logits = seg(images(h=50, w=70))  # padded to 64 x 128, cropped back to ceil(H/4)
        assert features.shape == (2, 16, 13, 18) and logits.shape == (2, 6, 13, 18)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        seg(torch.zeros(2, 1, 64, 64))


def test_hooked_features_equal_a_recomputation_by_hand():
    """One DDIM inversion step by its formula, then at step 1 (t = 10) the residual branch of up
    block 3's first ResNet (conv2's output, before the skip) and the output of its second
    transformer block, recomputed from their inputs, against the backbone's kept maps (the step from
    t = 0 draws no noise: eta_range is open at 10)."""
    seg = build("segmentor.diff.save_steps=[1]").eval()
    bb = seg.backbone
    unet, a = bb.unet, bb.alphas
    x = images()
    with torch.no_grad():
        latents = bb.encode(x)
        kept = bb.features(latents)[0]
        emb = bb.prompts[:1].repeat(2, 1, 1)
        e = unet(latents, 0, encoder_hidden_states=emb).sample
        x1 = a[10].sqrt() * (latents - (1 - a[0]).sqrt() * e) / a[0].sqrt() + (1 - a[10]).sqrt() * e
        inputs = {}
        resnet = unet.up_blocks[3].resnets[0]
        attention = unet.up_blocks[3].attentions[1]
        hooks = [resnet.register_forward_pre_hook(lambda m, args: inputs.setdefault("resnet", args)),
                 attention.register_forward_pre_hook(lambda m, args, kw: inputs.setdefault("attention", (args, kw)),
                                                     with_kwargs=True)]
        unet(x1, 10, encoder_hidden_states=emb)
        for h in hooks:
            h.remove()
        h, temb = inputs["resnet"]
        r = resnet
        y = r.conv1(r.nonlinearity(r.norm1(h))) + r.time_emb_proj(r.nonlinearity(temb))[:, :, None, None]
        branch = r.conv2(r.nonlinearity(r.norm2(y)))
        args, kw = inputs["attention"]
        hidden = args[0] if args else kw["hidden_states"]
        b, c, hh, ww = hidden.shape
        tokens = attention.proj_in(attention.norm(hidden).permute(0, 2, 3, 1).reshape(b, hh * ww, c))
        block = attention.transformer_blocks[0](tokens, encoder_hidden_states=emb)
        block = block.reshape(b, hh, ww, -1).permute(0, 3, 1, 2)
    width = r.conv2.out_channels
    # the finest level: resnets (3, 0), (3, 1), then transformer blocks (3, 0), (3, 1), one step each
    torch.testing.assert_close(kept[:, :width], branch, rtol=1e-5, atol=1e-5)
    # DIFF's sum over its two runs of the empty prompt: twice the block's output
    torch.testing.assert_close(kept[:, 3 * width:4 * width], 2 * block, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kept[:, :width], kept[:, width:2 * width])


def _seeded(seg, seed, x=None):
    torch.manual_seed(seed)
    with torch.no_grad():
        return seg(images() if x is None else x)


def test_same_seed_same_model_and_output():
    """Same seed, same weights; same RNG state, same outputs. DIFF's features are random (a draw
    from the VAE's posterior), so the RNG state moves them; ddps's deviations (the posterior's
    mean, eta 0) make them a function of the image."""
    a, b, c = build(seed=0).eval(), build(seed=0).eval(), build(seed=1).eval()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())  # another seed, other weights
    fa, la = _seeded(a, 5)
    fb, lb = _seeded(b, 5)
    fc, _ = _seeded(c, 5)
    assert torch.equal(fa, fb) and torch.equal(la, lb) and torch.equal(fa, _seeded(a, 5)[0])
    assert not torch.allclose(fa, fc) and not torch.allclose(fa, _seeded(a, 6)[0])
    fixed = build("segmentor.diff.latent=mean", "segmentor.diff.eta=0").eval()
    assert torch.equal(_seeded(fixed, 5)[0], _seeded(fixed, 6)[0])


def test_stochastic_inversion_draws_from_the_global_rng():
    """eta > 0: DIFF's noise term inside eta_range, from the global RNG (seeded per step by the
    trainer), so the same seed gives the same features and eta = 0 none of that noise."""
    plain = build().eval()
    noisy = build("segmentor.diff.eta=1.0", "segmentor.diff.eta_range=[-1,1000]").eval()
    with torch.no_grad():
        latents = plain.backbone.encode(images())
        deterministic = plain.backbone.features(latents)
        runs = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            runs.append(noisy.backbone.features(latents))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.allclose(runs[0][0], runs[2][0]) and not torch.allclose(runs[0][0], deterministic[0])


def test_gradients_reach_only_the_trainable_parts():
    seg = build("segmentor.diff.ipkl=true", PROMPTS)
    seg.train()
    assert not seg.backbone.training and not seg.backbone.unet.training  # no dropout in the frozen model
    labels = torch.randint(0, 6, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    loss = seg.loss(images(), labels, 255)
    loss.backward()
    for name, p in seg.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ipkl_branch():
    """The conditional branch: no prompt for classes without one (class 0, ignored pixels), so a
    ground truth of those alone gives the unconditional features; a prompted class changes them.
    The loss is both branches' cross-entropy plus the weighted MSE of their logits."""
    seg = build("segmentor.diff.ipkl=true", "segmentor.diff.ipkl_weight=0.5", PROMPTS).eval()
    bb = seg.backbone
    with torch.no_grad():
        torch.manual_seed(11)
        latents = bb.encode(images())  # the loss below draws the same latents from the same state
        plain = bb.features(latents)
        unprompted = torch.zeros(2, 8, 8, dtype=torch.long)
        unprompted[0, :4] = 255
        same = bb.features(latents, unprompted)
        prompted = unprompted.clone()
        prompted[1, 2:6, 2:6] = 3
        guided = bb.features(latents, prompted)
    assert all(torch.equal(p, s) for p, s in zip(plain, same))
    assert not torch.allclose(plain[0], guided[0])
    labels = F.interpolate(prompted[:, None].float(), scale_factor=8, mode="nearest")[:, 0].long()
    with torch.no_grad():
        _, lu = seg._decode(plain, (64, 64))
        _, lc = seg._decode(guided, (64, 64))
        expected = (F.cross_entropy(F.interpolate(lu, size=(64, 64), mode="bilinear"), labels, ignore_index=255)
                    + F.cross_entropy(F.interpolate(lc, size=(64, 64), mode="bilinear"), labels, ignore_index=255)
                    + 0.5 * F.mse_loss(lc, lu))
        torch.manual_seed(11)
        torch.testing.assert_close(seg.loss(images(), labels, 255), expected)


def test_pretrained_model_loads_through_diffusers_and_stays_out_of_checkpoints(tmp_path):
    unet = pretrained_folder(tmp_path)
    seg = build(f"segmentor.pretrained={tmp_path}").eval()
    assert torch.equal(seg.backbone.unet.conv_in.weight, unet.conv_in.weight)
    state = seg.state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    other = build(f"segmentor.pretrained={tmp_path}", seed=1).eval()
    other.load_state_dict(state)
    assert torch.equal(_seeded(seg, 0)[1], _seeded(other, 0)[1])
    # the tiny random model (no weights to reload) is saved with the segmentor
    assert any(k.startswith("backbone.unet.") for k in build().state_dict())
    with pytest.raises(ValueError, match="segmentor.pretrained"):
        build(f"segmentor.pretrained={tmp_path / 'missing'}")


@pytest.mark.parametrize("overrides, message", [
    (["segmentor.diff.ipkl=true"], "class_prompts"),
    (["segmentor.diff.projection=[16,0,32]"], "projection"),
    (["segmentor.diff.resnets=[[3]]"], "pairs"),
    (["segmentor.diff.dtype=half"], "dtype"),
    (["segmentor.diff.head=aspp"], r"segmentor.diff.head"),
    (["segmentor.diff.dilations=[1,0]"], r"segmentor.diff.dilations"),
    (["train.cache_features=true", "segmentor.diff.eta=0"], r"features are random \(segmentor.diff.latent=sample"),
    (["train.cache_features=true", "segmentor.diff.latent=mean"], r"segmentor.diff.eta=1.0\)"),
    (["segmentor.diff.latent=mode"], "segmentor.diff.latent"),
    (["segmentor.diff.prompt_features=max"], "segmentor.diff.prompt_features"),
])
def test_config_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, [*TINY, *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["segmentor.diff.save_steps=[3]"], r"save_steps: \[3\]"),
    (["segmentor.diff.timesteps=[10,10]"], "timesteps"),
    (["segmentor.diff.timesteps=[10,1000]"], "timesteps"),
    (["segmentor.diff.resnets=[[3,5]]"], r"resnets: \[3, 5\] is not a layer"),
    (["segmentor.diff.resnets=[[2,0]]", "segmentor.diff.attentions=[]"], "include the finest"),
    (["segmentor.diff.resnets=[[3,0],[1,0]]", "segmentor.diff.attentions=[]"], "consecutive"),
    (["segmentor.diff.projection=[16,16]"], "projection"),
])
def test_layer_selection_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build(*overrides)


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    with pytest.raises(ImportError, match=r"ddps\[diff\]"):
        build()


def test_feature_cache_serves_what_the_segmentor_computed():
    """Each image's outputs computed alone (a function of the image, whatever batch it came in),
    then served; they agree with a batched pass to float rounding."""
    seg = build("segmentor.diff.latent=mean", "segmentor.diff.eta=0").eval()
    cache = FeatureCache(seg, torch.device("cpu"))
    x = images(b=4)
    with torch.no_grad():
        alone = [seg(x[i:i + 1]) for i in range(4)]
        batched = seg(x)
        first = cache(x)
        again = cache(x[[2, 0]])
        mixed = cache(torch.cat([x[:1], images(b=1, seed=9)]))
    assert all(torch.equal(first[0][i], alone[i][0][0]) and torch.equal(first[1][i], alone[i][1][0]) for i in range(4))
    assert torch.equal(again[0], first[0][[2, 0]]) and torch.equal(again[1], first[1][[2, 0]])
    torch.testing.assert_close(first[0], batched[0], rtol=1e-4, atol=1e-4)
    assert cache.hits == 3 and cache.served == 8 and len(cache.store) == 5 and mixed[0].shape[0] == 2


def test_recipe_trains_both_stages_and_caches_the_head_stage(tmp_path, capsys):
    """synthetic-diff.yaml cut down: the segmentor stage (IPKL) lowers its loss, the head stage
    trains on cached segmentor outputs, eval.json is written and `ddps eval` reproduces it from the
    saved run. A head stage on live features from the same segmentor, on images without
    augmentation, trains the same head: the cached stage's images went without it too."""
    small = ["--config", "synthetic-diff", "data.scale=[64,64]", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
             "segmentor.iters=30", "segmentor.lr_steps=[]", "train.iters=12", "train.warmup_iters=2",
             "train.lr_steps=[]", "train.log_interval=3", "segmentor.eval_interval=0", "eval.panels=0",
             "train.progress=false"]
    cached = tmp_path / "cached"
    result = run_cli(capsys, "train", "--out", str(cached), *small)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (cached / "metrics.jsonl").read_text().splitlines()]
    seg_losses = [r["loss"] for r in records if r["stage"] == "segmentor" and "loss" in r]
    assert seg_losses[-1] < 0.8 * seg_losses[0], seg_losses
    head = [r for r in records if r["stage"] == "head"]
    # 16 images, 8 per step: from the third step on every image is served from the cache
    assert head[-1]["cache_hit_rate"] == pytest.approx((12 - 2) / 12)
    report = json.loads((cached / "eval.json").read_text())
    assert {"base", "ddps"} <= set(report)
    again = run_cli(capsys, "eval", "--run", str(cached), "--json", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again.json").read_text())["ddps"]["final"] == report["ddps"]["final"]

    live = tmp_path / "live"
    # without the cache, the head stage takes data's augmentation: turned off here, as the cache does
    result = run_cli(capsys, "train", "--out", str(live), *small, "train.cache_features=false", "data.flip_prob=0",
                     "data.photometric=false", f"segmentor.checkpoint={cached / 'model.safetensors'}")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_weights(cached / "model.safetensors"), load_weights(live / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("segmentor."))
    for key in (k for k in a if k.startswith("head.") and a[k].is_floating_point()):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("device, dtype, tolerance", [
    ("cpu", "bfloat16", 0.06),
    pytest.param("cuda", "float16", 0.01, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
])
def test_frozen_model_in_half_precision(device, dtype, tolerance):
    """The frozen model in bf16 / fp16 (segmentor.diff.dtype; auto = fp16 on CUDA), the trainable
    parts in fp32: with the same weights, the kept maps are the fp32 model's to within the half
    type's rounding (bf16 keeps 8 significant bits, fp16 11; measured on the CPU: 3.7-4.6 % and
    0.4-0.5 % relative error after two UNet steps)."""
    full = build(f"device={device}").to(device).eval()
    half = build(f"device={device}", f"segmentor.diff.dtype={dtype}").to(device).eval()
    assert half.backbone.unet.dtype == getattr(torch, dtype) and half.classifier.weight.dtype == torch.float32
    half.load_state_dict(full.state_dict())  # the tiny model's weights too, rounded to the half type
    with torch.no_grad():
        latents = full.backbone.encode(images().to(device))
        exact, rounded = full.backbone.features(latents), half.backbone.features(latents)
        features, _ = half(images().to(device))
    for a, b in zip(rounded, exact):
        assert a.dtype == torch.float32 and (a - b).norm() / b.norm() < tolerance
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


def _bn_relu(bn, x):
    """BatchNorm in eval mode with its running statistics, then ReLU: by its formula."""
    shape = (1, -1, 1, 1)
    y = (x - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt()
    return (y * bn.weight.view(shape) + bn.bias.view(shape)).relu()


def _randomise_norms(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.running_mean.shape, generator=g)
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5


def test_daformer_head_computes_its_formula():
    """DAFormer's head as DIFF configures it, recomputed here from its weights: per level a linear
    embedding, bilinear upsampling to the finest level, concatenation; per dilation d a branch (d = 1:
    1x1 conv; else a 3x3 depthwise conv dilated by d, padded by d, then 1x1), each conv followed by
    BN and ReLU; the branches concatenated; a 3x3 bottleneck with BN and ReLU."""
    from ddps.app.segmentors.diff import DecodeHead
    torch.manual_seed(0)
    head = DecodeHead([4, 6, 8], 5, "daformer", (1, 2, 3)).eval()
    _randomise_norms(head)
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, c, s, s + 1, generator=g) for c, s in ((4, 12), (6, 6), (8, 3))]
    embedded = []
    for proj, x in zip(head.proj, levels):
        y = torch.einsum("oc,bchw->bohw", proj.weight[:, :, 0, 0], x) + proj.bias.view(1, -1, 1, 1)
        embedded.append(F.interpolate(y, size=(12, 13), mode="bilinear", align_corners=False))
    x = torch.cat(embedded, 1)
    assert x.shape[1] == 15
    outs = []
    for d, branch in zip((1, 2, 3), head.fuse.branches):
        if d == 1:
            outs.append(_bn_relu(branch[1], F.conv2d(x, branch[0].weight)))
        else:
            depthwise, pointwise = branch
            y = _bn_relu(depthwise[1], F.conv2d(x, depthwise[0].weight, padding=d, dilation=d, groups=15))
            outs.append(_bn_relu(pointwise[1], F.conv2d(y, pointwise[0].weight)))
    bottleneck = head.fuse.bottleneck
    expected = _bn_relu(bottleneck[1], F.conv2d(torch.cat(outs, 1), bottleneck[0].weight, padding=1))
    with torch.no_grad():
        torch.testing.assert_close(head(levels), expected, rtol=1e-5, atol=1e-5)


def test_decode_head_default_is_diffs_and_mlp_stays_an_option():
    """DIFF's defaults: the DAFormer head, ASPP dilations 1, 6, 12, 18, no bias before BN, dropout
    0.1 before the classifier (channel-wise, as mmseg's); segmentor.diff.head=mlp keeps ddps's
    MLP head without dropout, with the same features' shape."""
    seg = build()
    assert seg.decode.fuse.dilations == (1, 6, 12, 18)
    convs = [branch[0][0] if d > 1 else branch[0] for d, branch in zip((1, 6, 12, 18), seg.decode.fuse.branches)]
    assert [c.dilation for c in convs] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert [c.padding for c in convs] == [(0, 0), (6, 6), (12, 12), (18, 18)]
    assert [c.groups for c in convs] == [1, 64, 64, 64]  # 4 levels of 16 channels, depthwise
    assert all(c.bias is None for c in convs)
    assert isinstance(seg.dropout, torch.nn.Dropout2d) and seg.dropout.p == 0.1
    assert [n.num_groups for n in seg.fusion.norms] == [16, 16, 32]  # DIFF's GroupNorm: gcd(width, 32)
    mlp = build("segmentor.diff.head=mlp").eval()
    assert isinstance(mlp.dropout, torch.nn.Identity) and not hasattr(mlp.decode.fuse, "branches")
    with torch.no_grad():
        features, logits = mlp(images())
    assert features.shape == (2, 16, 16, 16) and logits.shape == (2, 6, 16, 16)
    seg.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = seg(images())[1]
        torch.manual_seed(1)
        b = seg(images())[1]
    assert not torch.allclose(a, b)  # dropout draws in training


def test_mlp_head_computes_its_formula():
    """ddps's MLP head (segmentor.diff.head=mlp), recomputed: the same embedding and upsampling as
    DAFormer's, then a 1x1 convolution without bias, GroupNorm (gcd(channels, 8) groups), ReLU."""
    from ddps.app.segmentors.diff import DecodeHead
    torch.manual_seed(0)
    head = DecodeHead([4, 6], 12, "mlp", ()).eval()
    _randomise_norms(head)
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)]
    x = torch.cat([F.conv2d(levels[0], head.proj[0].weight, head.proj[0].bias),
                   F.interpolate(F.conv2d(levels[1], head.proj[1].weight, head.proj[1].bias), size=(8, 8),
                                 mode="bilinear", align_corners=False)], 1)
    conv, norm, _ = head.fuse
    assert conv.bias is None and norm.num_groups == 4
    expected = F.group_norm(F.conv2d(x, conv.weight), 4, norm.weight, norm.bias, norm.eps).relu()
    with torch.no_grad():
        torch.testing.assert_close(head(levels), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"segmentor.diff.head: 'aspp': expected daformer or mlp"):
        DecodeHead([4], 4, "aspp", ())


def test_encode_is_the_vae_latent_scaled():
    """Images in [0, 255] to [-1, 1], the VAE's posterior (a draw from the global RNG, or its mean
    with latent=mean), times the VAE's scaling factor."""
    drawn = build().backbone
    mean = build("segmentor.diff.latent=mean").backbone
    x = images()
    with torch.no_grad():
        posterior = drawn.vae.encode(x.float() / 127.5 - 1).latent_dist
        torch.manual_seed(3)
        expected = posterior.sample() * drawn.vae.config.scaling_factor
        torch.manual_seed(3)
        torch.testing.assert_close(drawn.encode(x), expected)
        torch.testing.assert_close(mean.encode(x), posterior.mean * mean.vae.config.scaling_factor)
    assert drawn.vae.config.scaling_factor != 1


def test_top_down_fusion_computes_its_formula():
    """DIFF's fusion, recomputed here: each level GroupNorm-ed; from the coarsest, x = ResBlock(
    deconv(x) + the next finer level), where ResBlock(y) = ReLU(y + GN(conv(ReLU(GN(conv(y)))))); a
    last deconvolution and ResBlock to 1/4; returns [1/4, the normalised levels]."""
    from ddps.app.segmentors.diff import Fusion
    torch.manual_seed(0)
    fusion = Fusion([8, 16, 16], 8, groups=4).eval()
    _randomise_norms(fusion)
    g = torch.Generator().manual_seed(2)
    levels = [torch.randn(2, c, s, s, generator=g) for c, s in ((8, 8), (16, 4), (16, 2))]
    normed = [F.group_norm(x, 4, n.weight, n.bias, n.eps) for n, x in zip(fusion.norms, levels)]

    def res(block, y):
        c1, n1, _, c2, n2 = block.body
        h = F.group_norm(F.conv2d(y, c1.weight, c1.bias, padding=1), 4, n1.weight, n1.bias).relu()
        return (y + F.group_norm(F.conv2d(h, c2.weight, c2.bias, padding=1), 4, n2.weight, n2.bias)).relu()

    def deconv(up, y):
        return F.conv_transpose2d(y, up.weight, up.bias, stride=2, padding=1)

    x = res(fusion.blocks[0], deconv(fusion.ups[0], normed[2]) + normed[1])
    x = res(fusion.blocks[1], deconv(fusion.ups[1], x) + normed[0])
    x = res(fusion.blocks[2], deconv(fusion.ups[2], x))
    with torch.no_grad():
        out = fusion(levels)
    assert [tuple(y.shape) for y in out] == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
    torch.testing.assert_close(out[0], x, rtol=1e-5, atol=1e-5)
    for a, b in zip(out[1:], normed):
        torch.testing.assert_close(a, b)


def _ddim_by_formula(x, e, a, an, eta, noise):
    """DIFF's inversion step (get_xt_next), in float64: x0 = (x - sqrt(1 - a) e) / sqrt(a),
    c1 = eta sqrt((1 - an / a)(1 - an) / (1 - a)), c2 = sqrt(max(1 - an - c1^2, 1e-10)),
    x' = sqrt(an) x0 + c1 noise + c2 e."""
    x, e, noise, a, an = (v.double() for v in (x, e, noise, a, an))
    x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
    c1 = eta * ((1 - an / a) * (1 - an) / (1 - a)).sqrt()
    c2 = (1 - an - c1 ** 2).clamp_min(1e-10).sqrt()
    return (an.sqrt() * x0 + c1 * noise + c2 * e).float()


@pytest.mark.parametrize("eta, eta_range, t, nt", [
    (0.0, [10, 250], 25, 50),     # deterministic DDIM
    (1.0, [10, 250], 25, 50),     # DIFF's stochastic term inside the range
    (0.7, [10, 250], 105, 121),
    (1.0, [10, 250], 10, 25),     # the range is open: t = 10 takes no noise
    (1.0, [10, 250], 0, 10),
    (1.0, [10, 100], 100, 105),   # and at its top: t = 100 takes none
])
def test_inversion_step_computes_diffs_formula(eta, eta_range, t, nt):
    bb = build(f"segmentor.diff.eta={eta}", f"segmentor.diff.eta_range={eta_range}").backbone
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    torch.manual_seed(7)
    noise = torch.randn_like(e)
    torch.manual_seed(7)
    out = bb._ddim(x, e, t, nt)
    after = torch.randn(1)
    noisy = eta_range[0] < t < eta_range[1]
    if not (eta and noisy):  # no noise, no draw: the global RNG is where it was
        torch.manual_seed(7)
        assert torch.equal(after, torch.randn(1))
    expected = _ddim_by_formula(x, e, bb.alphas[t], bb.alphas[nt], eta if noisy else 0.0, noise)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if eta and noisy:  # the noise term is there and matters
        assert not torch.allclose(out, _ddim_by_formula(x, e, bb.alphas[t], bb.alphas[nt], 0.0, noise), atol=1e-3)


def test_class_masked_guided_step_computes_its_formula():
    """IPKL's move from t to nt, recomputed here: the unconditional step on e_u = e[:B] and, per
    prompted class g with mask m_g, the step on e_u + s (e_g - e_u) under m_g; the sum divided by
    1 + the masks' sum (pixels of no prompted class take the unconditional step alone)."""
    bb = build("segmentor.diff.guidance_scale=3.0", "segmentor.diff.eta=0").backbone
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(3 * 2, 4, 8, 8, generator=g)  # unconditional, class a, class b
    m1 = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    m2 = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float() * (1 - m1)
    m2[0, 0, 0, 0], m1[0, 0, 0, 0] = 1.0, 1.0  # a pixel under both masks
    a, an = bb.alphas[25], bb.alphas[50]
    zero = torch.zeros_like(x)
    eu, e1, e2 = e[:2], e[2:4], e[4:]
    plain = _ddim_by_formula(x, eu, a, an, 0.0, zero)
    step1 = _ddim_by_formula(x, eu + 3.0 * (e1 - eu), a, an, 0.0, zero)
    step2 = _ddim_by_formula(x, eu + 3.0 * (e2 - eu), a, an, 0.0, zero)
    expected = (plain + m1 * step1 + m2 * step2) / (1 + m1 + m2)
    torch.testing.assert_close(bb._step(x, e, 25, 50, [m1, m2]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb._step(x, e[:2], 25, 50, []), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb._step(x, e[:4], 25, 50, [m1]), (plain + m1 * step1) / (1 + m1), rtol=1e-5, atol=1e-5)
    outside = (m1 + m2) == 0
    assert outside.any() and torch.allclose(expected.masked_select(outside.expand_as(x)),
                                            plain.masked_select(outside.expand_as(x)))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_transformer_features_over_the_prompts(mode):
    """Per stride and kept step: the ResNet branch of the unconditional run alone; the transformer
    block's output [G*B, h*w, C] over the G prompt groups (the empty prompt first), DIFF's sum with
    the empty prompt twice (2 y_0 + y_1 + ... + y_(G-1)) or the mean (y_0 + ... + y_(G-1)) / G,
    as [B, C, h, w]."""
    bb = build(f"segmentor.diff.prompt_features={mode}", "segmentor.diff.save_steps=[2]",
               "segmentor.diff.resnets=[[3,0]]", "segmentor.diff.attentions=[[3,1]]").backbone
    g = torch.Generator().manual_seed(5)
    b, groups, h, w = 2, 3, 4, 6
    resnet = torch.randn(groups * b, 16, h, w, generator=g)
    attention = torch.randn(groups * b, h * w, 16, generator=g)
    out = bb._assemble({("resnet", 3, 0): [resnet], ("attention", 3, 1): [attention]}, b, (h, w), groups)
    y = [attention[i * b:(i + 1) * b].reshape(b, h, w, 16).permute(0, 3, 1, 2) for i in range(groups)]
    expected = 2 * y[0] + y[1] + y[2] if mode == "sum" else (y[0] + y[1] + y[2]) / 3
    assert len(out) == 1 and out[0].shape == (b, 32, h, w)
    torch.testing.assert_close(out[0][:, :16], resnet[:b])
    torch.testing.assert_close(out[0][:, 16:], expected)
