"""``compact``: a small CNN for the synthetic data."""
from __future__ import annotations

import torch
from torch import nn

from ..schema import SEGMENTORS
from .base import Segmentor


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
        self.level_channels = (channels, channels // 2, channels, channels)
        self.features = nn.Sequential(_block(3, channels // 2, 2), _block(channels // 2, channels, 2),
                                      _block(channels, channels, dilation=2), _block(channels, channels, dilation=4))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor):
        features = self.features(self.normalize(images))
        return features, self.classifier(features)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output: the first 1/4 one, then the 1/2 one, then the dilated blocks'
        (the order GSS gives a backbone's stages: 1/4 first)."""
        x, outs = self.normalize(images), []
        for block in self.features:
            x = block(x)
            outs.append(x)
        return [outs[1], outs[0], outs[2], outs[3]]

    def backbone_parameters(self) -> list:
        return list(self.features.parameters())


SEGMENTORS.register("compact", lambda cfg, num_classes: CompactSegmentor(num_classes, cfg.segmentor.channels),
                   levels=True)
