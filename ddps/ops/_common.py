"""Pieces every sampling op shares: input checks and the seed drawn from a torch generator."""
from __future__ import annotations

import torch

from .. import _checks
from ..schedule import DiffusionSchedule


def check_schedule(schedule, device: torch.device) -> DiffusionSchedule:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"schedule must be a ddps.schedule.DiffusionSchedule, got {type(schedule).__name__}")
    _checks.same_device(schedule.att, "schedule", device, "x0")
    return schedule


def draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A 62-bit Philox seed from ``generator`` (the default CPU generator when None), as a CPU
    int64 scalar tensor: the same generator state gives the same seed, hence the same samples on
    every backend."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device, generator=generator).cpu()
