"""``segformer``: Hugging Face transformers' SegFormer; ``segformer-mmseg``: the released DDPS
models' own segmentor (mmseg's MiT backbone and the original's SegFormer head), as ``ddps
convert`` writes it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import SEGMENTORS, ConfigError, option
from .base import Segmentor


class SegFormerSegmentor(Segmentor):
    """Hugging Face transformers' SegformerForSemanticSegmentation (optional dependency). Its decode
    head's fused features (after linear_fuse, batch norm and activation) are the condition, read
    through a forward hook on the head's activation. A checkpoint with one label fewer than
    ``num_classes`` (the 150 ADE20K classes, for the original's 151 with 0 = other) keeps its
    classifier, and class 0 gets a constant low logit; any other label count gets a new classifier."""

    decode_head_prefixes = ("model.decode_head.",)

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

    decode_head_prefixes = ("decode.", "classifier.")

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


@dataclass
class MMSegOptions:
    variant: str = option("b2", choices=tuple(MIT_VARIANTS))  # the MiT backbone
    classifier_classes: int | None = option(None, minimum=1)  # the classes of its own classifier (null: none)


def _check_mmseg(cfg) -> None:
    s = cfg.segmentor
    if s.classifier_classes is None and s.iters > 0 and not s.checkpoint:
        raise ConfigError("segmentor.iters: a segformer-mmseg segmentor without a classifier "
                          "(segmentor.classifier_classes: null) cannot be trained; set segmentor.checkpoint to a "
                          "converted run's model.safetensors, or segmentor.iters=0")


SEGMENTORS.register("segformer", lambda cfg, num_classes: SegFormerSegmentor(num_classes, cfg.segmentor.pretrained),
                    source_file="config.json")
SEGMENTORS.register("segformer-mmseg", lambda cfg, num_classes: MMSegSegFormer(
    num_classes, cfg.segmentor.variant, cfg.segmentor.channels, cfg.segmentor.classifier_classes),
    MMSegOptions, _check_mmseg)
