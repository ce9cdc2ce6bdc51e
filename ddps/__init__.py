"""ddps: fast DDPS (denoising diffusion semantic segmentation with mask prior modeling).

``ddps.reference`` reproduces the original implementation bitwise; ``ddps.ops`` holds the fused
kernels; ``ddps.nn`` the drop-in modules; ``ddps.backends()`` says which kernels can run here.
"""
from . import nn, ops, reference, schedule
from ._backend import backends
from .schedule import DiffusionSchedule

__version__ = "0.1.0"
__all__ = ["DiffusionSchedule", "backends", "nn", "ops", "reference", "schedule"]
