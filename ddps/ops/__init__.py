"""Fused DDPS ops. Each op takes ``backend=None`` (see ``ddps.backends()``) and, where it samples,
``generator=None``."""
from .q_sample import q_sample

__all__ = ["q_sample"]
