"""Mask heads on a segmentor's features, by ``head.kind``; each is a plug-in
(``ddps.app.schema.HEADS``) in one module that builds one of ``ddps.nn``'s heads from a config:
``ddps`` (DDPS), ``refine`` (the refinement control), ``gss`` (GSS)."""
from ..schema import HEADS
from . import ddps, refine, gss  # noqa: F401  (each registers its head, in this order)

__all__ = ["build_head"]


def build_head(cfg, num_classes: int, ignore_index: int, cond_channels: int, for_training: bool):
    """The head of the config for a dataset of ``num_classes`` classes and ``ignore_index``, on
    features of ``cond_channels`` channels. ``for_training``: the head as trained (a DDPS head's
    training schedule, head.num_timesteps) rather than as sampled (eval.*; the original trains with
    T = 100 and samples with T = 20)."""
    return HEADS[cfg.head.kind].build(cfg, num_classes, ignore_index, cond_channels, for_training)
