"""The segmentor protocol: ``segmentor(images)`` with images uint8 or float in [0, 255],
[B, 3, H, W] -> ``(features [B, feature_channels, H/4, W/4], logits [B, num_classes, H/4, W/4])``.
The features are the DDPS head's condition (the original uses SegFormer's fused decode-head
features); the logits are the segmentor's own prediction, the baseline DDPS is measured against,
or None for a segmentor without a classifier (``has_classifier`` False: a released DDPS
checkpoint holds none, the original drops SegFormer's).
"""
from __future__ import annotations

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
    # the backbone's levels (a head that fuses them, GSS's): their channels, () where the
    # segmentor does not give them
    level_channels: tuple[int, ...] = ()
    # the parameters (by name) of its decode head and classifier: segmentor.head_lr_mult's
    decode_head_prefixes: tuple[str, ...] = ("classifier.",)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps for images [B, 3, H, W], the first at 1/4 of the image."""
        raise NotImplementedError(f"{type(self).__name__} does not give its backbone's levels")

    def backbone_parameters(self) -> list:
        """What a head that trains the backbone end to end updates (not the segmentor's classifier)."""
        raise NotImplementedError(f"{type(self).__name__} does not give its backbone's levels")

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """The segmentor stage's loss on a batch (images [B, 3, H, W], labels [B, H, W])."""
        return cross_entropy(self(images)[1], labels, ignore_index)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        mean = images.new_tensor(MEAN, dtype=torch.float32)[None, :, None, None]
        std = images.new_tensor(STD, dtype=torch.float32)[None, :, None, None]
        return (images.float() - mean) / std
