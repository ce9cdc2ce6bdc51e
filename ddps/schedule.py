"""Noise schedules of the uniform categorical diffusion (VQ-Diffusion style, SPEC §2)."""
from __future__ import annotations

import math

import torch

_ATT_1 = 0.99999  # att at the first (least noisy) level
_ATT_T = 0.000009  # att at the last (noisiest) level
KINDS = ("linear", "cos")


def _cumulative_alphas(num_timesteps: int, kind: str) -> torch.Tensor:
    # Float32 throughout, in the original's exact operation order, so the buffers match bitwise.
    steps = torch.arange(0, num_timesteps)
    if kind == "linear":
        return steps / (num_timesteps - 1) * (_ATT_T - _ATT_1) + _ATT_1
    att = (torch.cos((steps + num_timesteps) * math.pi * 0.5 / num_timesteps) + 1) ** 2
    return att * (_ATT_1 - _ATT_T) + _ATT_T


class DiffusionSchedule:
    """Uniform transition schedule over ``num_classes`` classes and ``num_timesteps`` levels.

    Float32 tensors (noise level s = 0..T-1, plus the identity level T for the cumulative ones):
    ``at, bt`` [T] one-step keep / uniform weights; ``att, btt`` [T + 1] cumulative ones
    (``att[T] = 1, btt[T] = 0``); their logs ``log_at, log_bt, log_cumprod_at, log_cumprod_bt``.
    q(x_s | x_0) = att[s] * onehot(x_0) + btt[s].

    ``keep_threshold`` [T + 1] int64: ``round(att * 2**32)``, the keep probability in the integer
    form the fused samplers compare a 32-bit random word against.
    """

    def __init__(self, num_timesteps: int, num_classes: int, kind: str = "linear"):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int):
            raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not a schedule kind; choose one of {KINDS}")
        min_steps = 2 if kind == "linear" else 1
        if num_timesteps < min_steps:
            raise ValueError(f"num_timesteps={num_timesteps} must be >= {min_steps} for kind={kind!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.num_timesteps = num_timesteps
        self.num_classes = num_classes
        self.kind = kind

        att = torch.cat((torch.tensor([1]), _cumulative_alphas(num_timesteps, kind)))
        self.at = att[1:] / att[:-1]
        self.bt = (1 - self.at) / num_classes
        self.att = torch.cat((att[1:], torch.tensor([1])))
        self.btt = (1 - self.att) / num_classes
        self.log_cumprod_at = torch.log(self.att)
        self.log_cumprod_bt = torch.log(self.btt)
        self.log_at = torch.log(self.at)
        self.log_bt = torch.log(self.bt)
        self.keep_threshold = torch.round(self.att.double() * 2.0**32).long()

    TENSORS = ("at", "bt", "att", "btt", "log_cumprod_at", "log_cumprod_bt", "log_at", "log_bt",
               "keep_threshold")

    @property
    def device(self) -> torch.device:
        return self.att.device

    def to(self, device) -> "DiffusionSchedule":
        """A copy with every tensor on ``device`` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(DiffusionSchedule)
        moved.__dict__.update(self.__dict__)
        for name in self.TENSORS:
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def __repr__(self) -> str:
        return (f"DiffusionSchedule(num_timesteps={self.num_timesteps}, num_classes={self.num_classes}, "
                f"kind={self.kind!r}, device={self.device})")
