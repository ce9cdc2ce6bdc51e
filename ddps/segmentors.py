"""Segmentors behind one protocol: ``segmentor(images)`` with images uint8 or float in [0, 255],
[B, 3, H, W] -> ``(features [B, feature_channels, H/4, W/4], logits [B, num_classes, H/4, W/4])``.
The features are the DDPS head's condition (the original uses SegFormer's fused decode-head
features); the logits are the segmentor's own prediction, the baseline DDPS is measured against,
or None for a segmentor without a classifier (``has_classifier`` False: a released DDPS
checkpoint holds none, the original drops SegFormer's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics in [0, 255], as the original's Normalize
STD = (58.395, 57.12, 57.375)


def check_images(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    return images


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The segmentor's training loss: its 1/4 logits upsampled (bilinear) to the labels."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


class Segmentor(nn.Module):
    num_classes: int
    feature_channels: int
    has_classifier = True

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """The segmentor stage's loss on a batch (images [B, 3, H, W], labels [B, H, W])."""
        return cross_entropy(self(images)[1], labels, ignore_index)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        mean = images.new_tensor(MEAN, dtype=torch.float32)[None, :, None, None]
        std = images.new_tensor(STD, dtype=torch.float32)[None, :, None, None]
        return (images.float() - mean) / std


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: per-sample statistics make a data-parallel run compute what
    # a single process with the same global batch computes.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True))


class CompactSegmentor(Segmentor):
    """A small CNN (two stride-2 stages, then 3x3 blocks of dilation 2 and 4 at 1/4 resolution): a
    fast baseline whose receptive field (55 pixels) is smaller than the larger objects it labels.
    The dilations widen that field from 23 pixels at no cost, so the segmentor converges to a
    stronger base within the demo's budget."""

    def __init__(self, num_classes: int, channels: int = 32):
        super().__init__()
        self.num_classes, self.feature_channels = num_classes, channels
        self.features = nn.Sequential(_block(3, channels // 2, 2), _block(channels // 2, channels, 2),
                                      _block(channels, channels, dilation=2), _block(channels, channels, dilation=4))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor):
        features = self.features(self.normalize(images))
        return features, self.classifier(features)


class SegFormerSegmentor(Segmentor):
    """Hugging Face transformers' SegformerForSemanticSegmentation (optional dependency). Its decode
    head's fused features (after linear_fuse, batch norm and activation) are the condition, read
    through a forward hook on the head's activation. A checkpoint with one label fewer than
    ``num_classes`` (the 150 ADE20K classes, for the original's 151 with 0 = other) keeps its
    classifier, and class 0 gets a constant low logit; any other label count gets a new classifier."""

    def __init__(self, num_classes: int, pretrained: str | None = None, config=None):
        super().__init__()
        try:
            from transformers import SegformerConfig, SegformerForSemanticSegmentation
        except ImportError:
            raise ImportError("segmentor.type=segformer needs the transformers package: "
                              "pip install 'ddps[segformer]'") from None
        self.prepend_other = False
        if pretrained is not None:
            labels = SegformerConfig.from_pretrained(pretrained).num_labels
            self.prepend_other = labels == num_classes - 1
            self.model = SegformerForSemanticSegmentation.from_pretrained(
                pretrained, num_labels=labels if self.prepend_other else num_classes, ignore_mismatched_sizes=True)
        else:
            self.model = SegformerForSemanticSegmentation(config or SegformerConfig(num_labels=num_classes))
        self.num_classes = num_classes
        self.feature_channels = self.model.config.decoder_hidden_size
        self._features = None
        self.model.decode_head.activation.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._features = output

    def forward(self, images: torch.Tensor):
        logits = self.model(pixel_values=self.normalize(images)).logits
        features, self._features = self._features, None
        return features, _prepend_other(logits) if self.prepend_other else logits


def _prepend_other(logits: torch.Tensor) -> torch.Tensor:
    """Class 0 (the original's "other") for a classifier without it: a constant low logit, finite
    so that interpolation never mixes in inf - inf."""
    return torch.cat([logits.new_full((logits.shape[0], 1, *logits.shape[2:]), -1e4), logits], 1)


# mmseg's MixVisionTransformer variants (mit_b0..b5): stage widths embed_dims * num_heads[i] with
# num_heads (1, 2, 5, 8), and the transformer layers per stage.
MIT_VARIANTS = {"b0": (32, (2, 2, 2, 2)), "b1": (64, (2, 2, 2, 2)), "b2": (64, (3, 4, 6, 3)),
                "b3": (64, (3, 4, 18, 3)), "b4": (64, (3, 8, 27, 3)), "b5": (64, (3, 6, 40, 3))}
MIT_HEADS = (1, 2, 5, 8)


def mit_config(variant: str):
    """transformers' SegformerConfig of an mmseg MiT variant."""
    try:
        from transformers import SegformerConfig
    except ImportError:
        raise ImportError("segmentor.type=segformer-mmseg needs the transformers package: "
                          "pip install 'ddps[segformer]'") from None
    embed, depths = MIT_VARIANTS[variant]
    return SegformerConfig(depths=list(depths), hidden_sizes=[embed * h for h in MIT_HEADS],
                           num_attention_heads=list(MIT_HEADS), sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3],
                           strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.0)


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule as the original's SegFormer head builds it (1x1 conv without bias, batch
    norm, ReLU), with its state-dict names (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class OriginalSegFormerHead(nn.Module):
    """The original's SegFormer decode head up to its fused features: per level a ConvBNReLU,
    bilinear resize to level 0 (align_corners False), concatenation, a fusion ConvBNReLU."""

    def __init__(self, in_channels, channels: int):
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels)
        self.fusion_conv = ConvBNReLU(channels * len(in_channels), channels)

    def forward(self, levels):
        size = levels[0].shape[-2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.convs, levels)]
        return self.fusion_conv(torch.cat(outs, 1))


class MMSegSegFormer(Segmentor):
    """The segmentor of the released DDPS checkpoints: mmseg's MiT backbone (run by transformers'
    SegformerModel, every LayerNorm at mmseg's eps 1e-6) and the original's SegFormer head, whose
    fused features are the condition. ``classifier_classes``: the output classes of the original
    SegFormer's classifier (``conv_seg``), None for none; ``num_classes - 1`` gets class 0 as
    :class:`SegFormerSegmentor` does."""

    def __init__(self, num_classes: int, variant: str, channels: int, classifier_classes: int | None = None):
        super().__init__()
        if classifier_classes not in (None, num_classes, num_classes - 1):
            raise ValueError(f"segmentor.classifier_classes: {classifier_classes} classes for {num_classes} "
                             f"(expected {num_classes}, or {num_classes - 1} without class 0)")
        config = mit_config(variant)
        from transformers import SegformerModel

        self.backbone = SegformerModel(config)
        for module in self.backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = 1e-6
        self.decode = OriginalSegFormerHead(config.hidden_sizes, channels)
        self.num_classes, self.feature_channels = num_classes, channels
        self.has_classifier = classifier_classes is not None
        self.classifier = nn.Conv2d(channels, classifier_classes, 1) if self.has_classifier else None
        self.prepend_other = classifier_classes == num_classes - 1

    def forward(self, images: torch.Tensor):
        levels = self.backbone(pixel_values=self.normalize(images), output_hidden_states=True).hidden_states
        features = self.decode(levels)
        if self.classifier is None:
            return features, None
        logits = self.classifier(features)
        return features, _prepend_other(logits) if self.prepend_other else logits


def build_segmentor(cfg, num_classes: int) -> Segmentor:
    seg = cfg.segmentor
    if seg.type == "diffusion-features":
        from .nn.diff import DIFFSegmentor
        dtype = seg.diff.dtype
        if dtype == "auto":  # DIFF runs the frozen model in fp16 on the GPU
            dtype = "float16" if cfg.device.startswith("cuda") else "float32"
        return DIFFSegmentor(num_classes, seg.channels, seg.diff, seg.pretrained, getattr(torch, dtype))
    if seg.type == "compact":
        return CompactSegmentor(num_classes, seg.channels)
    if seg.type == "segformer-mmseg":
        return MMSegSegFormer(num_classes, seg.variant, seg.channels, seg.classifier_classes)
    return SegFormerSegmentor(num_classes, seg.pretrained)


class _Reads(dict):
    """A state dict that remembers which keys were read, so that none goes unconverted unnoticed."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _mit_layer(state: _Reads, prefix: str, target: str) -> dict:
    """One transformer layer of mmseg's MiT in transformers' names: nn.MultiheadAttention's packed
    in-projection splits into query, key and value; MixFFN's 1x1 convolutions become linears."""
    out = {}
    for p in ("weight", "bias"):
        q, k, v = state[f"{prefix}attn.attn.in_proj_{p}"].chunk(3)
        out.update({f"{target}attention.self.query.{p}": q, f"{target}attention.self.key.{p}": k,
                    f"{target}attention.self.value.{p}": v})
        for index, name in ((0, "dense1"), (4, "dense2")):
            value = state[f"{prefix}ffn.layers.{index}.{p}"]
            out[f"{target}mlp.{name}.{p}"] = value.flatten(1) if p == "weight" else value
    renamed = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.attn.out_proj": "attention.output.dense",
               "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
               "ffn.layers.1": "mlp.dwconv.dwconv"}
    for old, new in renamed.items():
        for p in ("weight", "bias"):
            if f"{prefix}{old}.{p}" in state:  # sr and its norm only where the stage reduces
                out[f"{target}{new}.{p}"] = state[f"{prefix}{old}.{p}"]
    return out


def mmseg_segformer(state: dict) -> tuple[dict, dict, set]:
    """(segmentor config keys, MMSegSegFormer state dict, keys read) of an original mmseg
    checkpoint's ``backbone.*`` (MixVisionTransformer) and ``decode_head.{convs,fusion_conv,
    conv_seg}.*``. The MiT variant is read from the stage widths and depths; a checkpoint that is
    none of b0..b5, or misses a key, is a ValueError."""
    state = _Reads(state)
    widths, depths = [], []
    while f"backbone.layers.{len(widths)}.0.projection.weight" in state:
        i = len(widths)
        widths.append(dict.__getitem__(state, f"backbone.layers.{i}.0.projection.weight").shape[0])
        depths.append(len({k.split(".")[4] for k in state if k.startswith(f"backbone.layers.{i}.1.")}))
    if not widths:
        raise ValueError("no MiT backbone (backbone.layers.0.0.projection.weight): ddps convert needs the whole "
                         "SegFormer DDPS checkpoint, backbone included")
    variant = next((name for name, (embed, d) in MIT_VARIANTS.items()
                    if widths == [embed * h for h in MIT_HEADS] and tuple(depths) == d), None)
    if variant is None:
        raise ValueError(f"backbone: stage widths {widths} and depths {depths} are none of mmseg's MiT b0..b5 "
                         "(is this a SegFormer DDPS checkpoint?)")
    tensors, target = {}, "backbone.encoder."
    try:
        for i, depth in enumerate(depths):
            stage = f"backbone.layers.{i}."
            for p in ("weight", "bias"):
                tensors[f"{target}patch_embeddings.{i}.proj.{p}"] = state[f"{stage}0.projection.{p}"]
                tensors[f"{target}patch_embeddings.{i}.layer_norm.{p}"] = state[f"{stage}0.norm.{p}"]
                tensors[f"{target}layer_norm.{i}.{p}"] = state[f"{stage}2.{p}"]
            for j in range(depth):
                tensors.update(_mit_layer(state, f"{stage}1.{j}.", f"{target}block.{i}.{j}."))
        tensors["decode.fusion_conv.conv.weight"] = state["decode_head.fusion_conv.conv.weight"]
    except KeyError as e:
        raise ValueError(f"{e.args[0]} is missing: not a whole SegFormer DDPS checkpoint") from None
    for key in list(state):
        if key.startswith(("decode_head.convs.", "decode_head.fusion_conv.")):
            tensors["decode." + key[len("decode_head."):]] = state[key]
        elif key.startswith("decode_head.conv_seg."):
            tensors["classifier." + key.rsplit(".", 1)[1]] = state[key]
    classifier = tensors.get("classifier.weight")
    config = {"type": "segformer-mmseg", "variant": variant,
              "channels": tensors["decode.fusion_conv.conv.weight"].shape[0],
              "classifier_classes": None if classifier is None else classifier.shape[0]}
    return config, tensors, state.read
