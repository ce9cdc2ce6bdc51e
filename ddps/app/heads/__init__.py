"""Mask heads on a segmentor's features, by ``head.kind``; each is a plug-in
(``ddps.app.schema.HEADS``) in one module that builds one of ``ddps.nn``'s heads from a config:
``ddps`` (DDPS), ``refine`` (the refinement control), ``gss`` (GSS)."""
from ..schema import HEADS
from . import ddps, refine, gss  # noqa: F401  (each registers its head, in this order)

__all__ = ["build_head"]


def build_head(cfg, num_classes: int, ignore_index: int, cond_channels: int, for_training: bool,
               level_channels: tuple[int, ...] = ()):
    """The head of the config for a dataset of ``num_classes`` classes and ``ignore_index``, on
    features of ``cond_channels`` channels (or, for a head that fuses the backbone's levels, on
    levels of ``level_channels``). ``for_training``: the head as trained (a DDPS head's training
    schedule, head.num_timesteps) rather than as sampled (eval.*; the original trains with T = 100
    and samples with T = 20)."""
    entry = HEADS[cfg.head.kind]
    levels = getattr(entry, "takes_levels", None)
    channels = level_channels if levels is not None and levels(cfg) else cond_channels
    return entry.build(cfg, num_classes, ignore_index, channels, for_training)
