"""DIFF (Ji et al., "Diffusion Features to Bridge Domain Gap for Semantic Segmentation") behind the
segmentor protocol: a frozen Stable-Diffusion UNet, VAE and text encoder (diffusers, transformers)
as the backbone, a trainable aggregation and top-down fusion of its features, and a decode head.

What DIFF computes, and where this module differs:
- the image in [-1, 1] is VAE-encoded and scaled by the VAE's scaling factor (0.18215 for SD 2.1):
  a draw from the posterior, as DIFF (``latent=mean``, a deviation, takes its mean);
- DDIM inversion with an empty prompt over a fixed timestep list (DIFF's 37 for SD 2.1): step i
  runs the UNet at t_(i-1) (t_(-1) = 0) and moves the latent to t_i; at the chosen steps the
  residual branch of each captured up-block ResNet (``conv2``'s output, before the skip is added)
  and each captured up-block transformer block's output are kept (forward hooks), the latter
  summed over the prompts the UNet ran with, the empty prompt twice: DIFF runs the UNet on two
  copies of it, so even without IPKL its transformer maps are twice one run's
  (``prompt_features=mean``, a deviation, averages over the prompts once each). Steps after the
  last kept one change no feature and are not run. ``eta`` (DIFF's: 1) adds DIFF's stochastic term
  (drawn from the global RNG) for ``eta_range[0] < t < eta_range[1]``; with ``latent=mean`` and
  ``eta=0`` the features are a function of the image (same image, same features; they can be cached);
- per output stride the kept maps are concatenated over channels and projected by a bottleneck
  block with GroupNorm; the strides are fused top-down (deconvolution, add, residual block) into a
  pyramid from 1/4 to the coarsest stride. DIFF aggregates the UNet's 1/64 maps and then drops them:
  the default layer selection here skips them, and a selection that includes them fuses them;
- the decode head is DAFormer's as DIFF configures it (per level a linear embedding, upsampling to
  1/4, concatenation, depthwise-separable ASPP with dilations 1, 6, 12, 18 and BN, a 3x3
  bottleneck; dropout 0.1 before the classifier) or, as an option, ddps's lighter all-MLP head
  (a 1x1 fusion with GroupNorm, no dropout); its fused 1/4 features are the DDPS head's condition;
- IPKL (training only): a conditional branch runs the inversion with the empty prompt plus one
  prompt per ground-truth class present (classifier-free guidance, each class's latent update
  applied under its mask, the updates averaged). The loss is the cross-entropy of both branches
  plus a weighted MSE between their logits.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import DATASETS, SEGMENTORS, ConfigError, option
from .base import Segmentor, check_images, cross_entropy
from .diffusion_backbone import DiffusionBackbone, pretrained_models, tiny_models


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels)


class Bottleneck(nn.Module):
    """detectron2's bottleneck block with GroupNorm (1x1, 3x3, 1x1; a projected shortcut), DIFF's
    per-stride projection of the concatenated maps."""

    def __init__(self, cin: int, cout: int, groups: int = 16):
        super().__init__()
        mid = max(cout // 4, 1)
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), _gn(mid, groups), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), _gn(mid, groups), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), _gn(cout, groups))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _gn(cout, groups))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _gn(channels, groups), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), _gn(channels, groups))

    def forward(self, x):
        return F.relu(self.body(x) + x)


class Fusion(nn.Module):
    """DIFF's top-down fusion: each level GroupNorm-ed, then from the coarsest down
    x = ResBlock(deconv(x) + level), and a last deconvolution to 1/4. Returns the pyramid fine to
    coarse: [1/4, then the input levels]."""

    def __init__(self, channels: list[int], x4: int, groups: int = 32):
        super().__init__()
        self.norms = nn.ModuleList(_gn(c, groups) for c in channels)  # fine to coarse
        targets = channels[:-1][::-1] + [x4]
        sources = channels[::-1]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(s, t, 4, 2, 1) for s, t in zip(sources, targets))
        self.blocks = nn.ModuleList(ResBlock(t, groups) for t in targets)

    def forward(self, levels):
        levels = [norm(x) for norm, x in zip(self.norms, levels)]
        x = levels[-1]
        for i, (up, block) in enumerate(zip(self.ups, self.blocks)):
            x = up(x)
            finer = len(levels) - 2 - i
            if finer >= 0:
                x = x + levels[finer]
            x = block(x)
        return [x, *levels]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    """mmcv's ConvModule with BN and ReLU (no bias: the norm has one)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeparableASPP(nn.Module):
    """DAFormer's fusion as DIFF configures it: depthwise-separable ASPP without image pooling (per
    dilation d a branch: for d = 1 a 1x1 convolution, else a 3x3 depthwise convolution dilated by d
    then a 1x1 one, each with BN and ReLU), the branches concatenated, then a 3x3 bottleneck with
    BN and ReLU."""

    def __init__(self, cin: int, channels: int, dilations):
        super().__init__()
        self.dilations = tuple(dilations)
        self.branches = nn.ModuleList(
            _conv_bn_relu(cin, channels) if d == 1
            else nn.Sequential(_conv_bn_relu(cin, cin, 3, d, groups=cin), _conv_bn_relu(cin, channels))
            for d in self.dilations)
        self.bottleneck = _conv_bn_relu(channels * len(self.dilations), channels, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], 1))


class DecodeHead(nn.Module):
    """Per level a 1x1 projection to ``channels`` (DAFormer's and SegFormer's linear embedding),
    bilinear upsampling to the finest level, concatenation, then ``fuse``: the 1/4 features.

    ``kind``: ``daformer`` (DIFF's: :class:`SeparableASPP` over the concatenation) or ``mlp``
    (ddps's lighter deviation: a 1x1 convolution with GroupNorm and ReLU)."""

    def __init__(self, in_channels: list[int], channels: int, kind: str, dilations):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        cat = channels * len(in_channels)
        if kind == "daformer":
            self.fuse = SeparableASPP(cat, channels, dilations)
        elif kind == "mlp":
            self.fuse = nn.Sequential(nn.Conv2d(cat, channels, 1, bias=False), _gn(channels, 8), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"segmentor.diff.head: {kind!r}: expected daformer or mlp")

    def forward(self, levels):
        size = levels[0].shape[-2:]
        outs = [F.interpolate(p(x), size=size, mode="bilinear", align_corners=False) if i else p(x)
                for i, (p, x) in enumerate(zip(self.proj, levels))]
        return self.fuse(torch.cat(outs, 1))


class DIFFSegmentor(Segmentor):
    """The DIFF segmentor: the frozen :class:`DiffusionBackbone`, a bottleneck per stride, the
    top-down fusion and a :class:`DecodeHead` (``channels``: the features' width, the DDPS head's
    condition) with a 1x1 classifier. Images of any size are padded (bottom, right) to the UNet's
    multiple and the outputs cropped back to ceil(H/4) x ceil(W/4).

    Only the aggregation, fusion, decode head and classifier train. The state dict leaves out the
    frozen models when they come from ``pretrained`` (reloaded from there), and holds them when
    they are the random tiny ones."""

    decode_head_prefixes = ("decode.", "classifier.")

    def __init__(self, num_classes: int, channels: int, diff, pretrained: str | None = None, dtype=torch.float32):
        super().__init__()
        models = pretrained_models(pretrained, dtype) if pretrained else tiny_models(dtype)
        self.pretrained = pretrained
        self.backbone = DiffusionBackbone(models, diff.timesteps, diff.save_steps, diff.resnets, diff.attentions,
                                          diff.eta, diff.eta_range, diff.guidance_scale, diff.class_prompts,
                                          diff.latent, diff.prompt_features)
        widths = self.backbone.channels()
        if len(diff.projection) < len(widths):
            raise ValueError(f"segmentor.diff.projection: {diff.projection} gives {len(diff.projection)} widths for "
                             f"{len(widths)} captured strides (fine to coarse)")
        proj = list(diff.projection[:len(widths)])
        self.aggregate = nn.ModuleList(Bottleneck(c, p) for c, p in zip(widths, proj))
        self.fusion = Fusion(proj, diff.projection_x4)
        self.decode = DecodeHead([diff.projection_x4, *proj], channels, diff.head, diff.dilations)
        # mmseg's decode heads drop channels before their classifier (DIFF: 0.1); ddps's MLP head never did
        self.dropout = nn.Dropout2d(0.1) if diff.head == "daformer" else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes, self.feature_channels = num_classes, channels
        self.ipkl, self.ipkl_weight = diff.ipkl, diff.ipkl_weight

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.pretrained:
            prefix = kwargs.get("prefix", "") + "backbone."
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.pretrained:
            state_dict = {**{f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}, **state_dict}
        return super().load_state_dict(state_dict, strict, assign)

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        m = self.backbone.multiple
        h, w = images.shape[-2:]
        return F.pad(images.float(), (0, -w % m, 0, -h % m))

    def _decode(self, levels, size):
        levels = [agg(x) for agg, x in zip(self.aggregate, levels)]
        features = self.decode(self.fusion(levels))[..., :(size[0] + 3) // 4, :(size[1] + 3) // 4]
        return features, self.classifier(self.dropout(features))

    def forward(self, images: torch.Tensor):
        x = self._pad(check_images(images))
        with torch.no_grad():
            levels = self.backbone.features(self.backbone.encode(x))
        return self._decode(levels, images.shape[-2:])

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        if not self.ipkl:
            return super().loss(images, labels, ignore_index)
        x = self._pad(check_images(images))
        with torch.no_grad():
            latents = self.backbone.encode(x)
            # the ground truth at the latent's resolution (nearest), padding ignored
            padded = F.pad(labels, (0, x.shape[-1] - labels.shape[-1], 0, x.shape[-2] - labels.shape[-2]), value=-1)
            small = F.interpolate(padded[:, None].float(), size=latents.shape[-2:], mode="nearest")[:, 0].long()
            plain = self.backbone.features(latents)
            guided = self.backbone.features(latents, small)
        _, logits = self._decode(plain, images.shape[-2:])
        _, logits_c = self._decode(guided, images.shape[-2:])
        return (cross_entropy(logits, labels, ignore_index) + cross_entropy(logits_c, labels, ignore_index)
                + self.ipkl_weight * F.mse_loss(logits_c, logits))


@dataclass
class DiffOptions:
    # the defaults are DIFF's for Stable Diffusion 2.1
    timesteps: list[int] = option([
        160, 139, 121, 105, 91, 80, 69, 60, 52, 45, 40, 34, 30, 26, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
        10, 9, 8, 7, 6, 5, 4, 3, 2, 1], minimum=0)
    save_steps: list[int] = option([33, 29, 25, 22, 18, 14, 11, 7, 3], minimum=0)  # inversion steps kept
    # [up block, index] pairs of resnets (null: all but the first block's) and of transformer blocks (null: likewise)
    resnets: list[list[int]] | None = option(None, minimum=0)
    attentions: list[list[int]] | None = option(None, minimum=0)
    # widths per captured stride, fine to coarse
    projection: list[int] = option([512, 1024, 2048, 2048], minimum=1)
    projection_x4: int = option(256, minimum=1)  # the 1/4 level of the fused pyramid
    head: str = option("daformer", choices=("daformer", "mlp"))  # decode head: DIFF's DAFormer head | ddps's MLP
    dilations: list[int] = option([1, 6, 12, 18], minimum=1)  # the DAFormer head's ASPP branches
    eta: float = option(1.0, minimum=0)  # DDIM inversion noise for eta_range[0] < t < eta_range[1] (0: ddps's deviation)
    eta_range: list[float] = option([10.0, 250.0], length=2, unbounded=True)
    # the frozen model's: auto (float16 on cuda, else float32) | float32 | float16 | bfloat16
    dtype: str = option("auto", choices=("auto", "float32", "float16", "bfloat16"))
    ipkl: bool = False             # train with IPKL's class-prompted branch too
    ipkl_weight: float = option(1.0, minimum=0)  # IPKL: weight of the MSE between the two branches' logits
    guidance_scale: float = option(5.0, unbounded=True)  # IPKL: the class prompts' classifier-free guidance
    class_prompts: list[str] = option([])  # IPKL: one per class ("": none)
    latent: str = option("sample", choices=("sample", "mean"))  # the VAE posterior's draw | its mean (a deviation)
    # the transformer features over the prompts: DIFF's sum (the empty prompt twice) | their mean (a deviation)
    prompt_features: str = option("sum", choices=("sum", "mean"))


@dataclass
class Options:
    diff: DiffOptions = dataclasses.field(default_factory=DiffOptions)


def _check(cfg) -> None:
    # the timesteps and layers are checked against the model itself when it is built
    d = cfg.segmentor.diff
    for key in ("resnets", "attentions"):
        pairs = getattr(d, key)
        if pairs is not None and any(len(p) != 2 for p in pairs):
            raise ConfigError(f"segmentor.diff.{key}: {pairs}: expected [up block, index] pairs")
    if cfg.train.cache_features and (d.latent == "sample" or d.eta > 0):
        raise ConfigError("train.cache_features: the cache keeps one output per image, but these features are random "
                          f"(segmentor.diff.latent={d.latent}, segmentor.diff.eta={d.eta}): set "
                          "segmentor.diff.latent=mean and segmentor.diff.eta=0 (ddps's deviations), or leave the cache off")
    if d.ipkl:
        k, _ = DATASETS[cfg.data.dataset].classes(cfg)
        if len(d.class_prompts) != k or not any(d.class_prompts):
            raise ConfigError(f"segmentor.diff.class_prompts: IPKL needs one prompt per class ({k}, \"\" for none, "
                              f"at least one given), got {len(d.class_prompts)}")


def _build(cfg, num_classes: int) -> DIFFSegmentor:
    seg = cfg.segmentor
    dtype = seg.diff.dtype
    if dtype == "auto":  # DIFF runs the frozen model in fp16 on the GPU
        dtype = "float16" if cfg.device.startswith("cuda") else "float32"
    return DIFFSegmentor(num_classes, seg.channels, seg.diff, seg.pretrained, getattr(torch, dtype))


SEGMENTORS.register("diffusion-features", _build, Options, _check, source_file="unet/config.json")
