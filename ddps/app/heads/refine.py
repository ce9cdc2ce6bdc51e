"""``head.kind: refine``: the control that separates the mask prior from the capacity
(``ddps.nn.RefinementHead``): DDPS's network, with DDPS's keys, trained without diffusion."""
from __future__ import annotations

from ...nn import RefinementHead
from ..schema import HEADS
from .ddps import arguments, check


def build(cfg, num_classes: int, ignore_index: int, cond_channels: int, for_training: bool) -> RefinementHead:
    return RefinementHead(**arguments(cfg, num_classes, ignore_index, cond_channels, for_training))


HEADS.register("refine", build, check=check)
