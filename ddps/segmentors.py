"""Segmentors behind one protocol: ``segmentor(images)`` with images uint8 or float in [0, 255],
[B, 3, H, W] -> ``(features [B, feature_channels, H/4, W/4], logits [B, num_classes, H/4, W/4])``.
The features are the DDPS head's condition (the original uses SegFormer's fused decode-head
features); the logits are the segmentor's own prediction, the baseline DDPS is measured against.
"""
from __future__ import annotations

import torch
from torch import nn

MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics in [0, 255], as the original's Normalize
STD = (58.395, 57.12, 57.375)


class Segmentor(nn.Module):
    num_classes: int
    feature_channels: int

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        mean = images.new_tensor(MEAN, dtype=torch.float32)[None, :, None, None]
        std = images.new_tensor(STD, dtype=torch.float32)[None, :, None, None]
        return (images.float() - mean) / std


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: per-sample statistics make a data-parallel run compute what
    # a single process with the same global batch computes.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class CompactSegmentor(Segmentor):
    """A small CNN (two stride-2 stages and two more 3x3 blocks at 1/4 resolution): a fast
    baseline whose receptive field (about 27 pixels) is small next to the objects it labels."""

    def __init__(self, num_classes: int, channels: int = 32):
        super().__init__()
        self.num_classes, self.feature_channels = num_classes, channels
        self.features = nn.Sequential(_block(3, channels // 2, 2), _block(channels // 2, channels, 2),
                                      _block(channels, channels), _block(channels, channels))
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
        if self.prepend_other:  # finite, so that interpolation never mixes in inf - inf
            logits = torch.cat([logits.new_full((logits.shape[0], 1, *logits.shape[2:]), -1e4), logits], 1)
        return features, logits


def build_segmentor(cfg, num_classes: int) -> Segmentor:
    seg = cfg.segmentor
    if seg.type == "compact":
        return CompactSegmentor(num_classes, seg.channels)
    return SegFormerSegmentor(num_classes, seg.pretrained)
