"""Segmentors behind one protocol (``base.Segmentor``): ``segmentor(images)`` -> (features at 1/4
of the image, the DDPS head's condition; logits or None). Each is a plug-in
(``ddps.app.schema.SEGMENTORS``) in one module: ``compact``, ``segformer`` (``segformer`` and
``segformer-mmseg``), ``diff`` (``diffusion-features``, DIFF)."""
from ..schema import SEGMENTORS
from . import compact, segformer, diff  # noqa: F401  (each registers its segmentors, in this order)
from .base import Segmentor

__all__ = ["Segmentor", "build_segmentor"]


def build_segmentor(cfg, num_classes: int) -> Segmentor:
    """The segmentor of the config (segmentor.type) for ``num_classes`` classes."""
    return SEGMENTORS[cfg.segmentor.type].build(cfg, num_classes)
