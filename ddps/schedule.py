"""Noise schedules of the uniform categorical diffusion (VQ-Diffusion style, SPEC §2)."""
from __future__ import annotations

import math

import torch

_ATT_1 = 0.99999  # att at the first (least noisy) level
_ATT_T = 0.000009  # att at the last (noisiest) level
KINDS = ("linear", "cos")
TRANSITIONS = ("uniform", "absorbing", "mask_and_replace")
# Share of the noise mass 1 - att that goes to [MASK] (the rest is uniform over the K classes).
# mask_and_replace: VQ-Diffusion's cumulative mask probability rises from 0 to 0.9.
_MASK_SHARE = {"uniform": 0.0, "absorbing": 1.0, "mask_and_replace": 0.9}


def _cumulative_alphas(num_timesteps: int, kind: str) -> torch.Tensor:
    # Float32 throughout, in the original's exact operation order, so the buffers match bitwise.
    steps = torch.arange(0, num_timesteps)
    if kind == "linear":
        return steps / (num_timesteps - 1) * (_ATT_T - _ATT_1) + _ATT_1
    att = (torch.cos((steps + num_timesteps) * math.pi * 0.5 / num_timesteps) + 1) ** 2
    return att * (_ATT_1 - _ATT_T) + _ATT_T


class DiffusionSchedule:
    """Transition schedule over ``num_classes`` classes and ``num_timesteps`` noise levels.

    Float32 tensors (noise level s = 0..T-1, plus the identity level T for the cumulative ones):
    ``at, bt, ct`` [T] one-step keep / per-class uniform / mask weights; ``att, btt, ctt`` [T + 1]
    the cumulative ones (``att[T] = 1``, ``btt[T] = ctt[T] = 0``); the logs ``log_at, log_bt,
    log_cumprod_at, log_cumprod_bt``. q(x_s | x_0) = att[s] * onehot(x_0) + btt[s] (+ ctt[s] on
    [MASK]).

    ``transition``: "uniform" (the original DDPS: K classes, ct = ctt = 0; bitwise the original's
    buffers), "absorbing" (noise goes to an extra [MASK] class, index K: btt = 0) or
    "mask_and_replace" (VQ-Diffusion: keep, uniform replace, or [MASK]; ctt = 0.9 * (1 - att)).
    Both mask kinds keep the same att as the uniform one; [MASK] is absorbing.
    """

    def __init__(self, num_timesteps: int, num_classes: int, kind: str = "linear",
                 transition: str = "uniform"):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int):
            raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not a schedule kind; choose one of {KINDS}")
        if transition not in TRANSITIONS:
            raise ValueError(f"transition={transition!r} is not a transition kind; choose one of {TRANSITIONS}")
        min_steps = 2 if kind == "linear" else 1
        if num_timesteps < min_steps:
            raise ValueError(f"num_timesteps={num_timesteps} must be >= {min_steps} for kind={kind!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.num_timesteps = num_timesteps
        self.num_classes = num_classes
        self.kind = kind
        self.transition = transition
        self.mask_index = None if transition == "uniform" else num_classes
        self.num_states = num_classes + (transition != "uniform")
        self._tables = {}

        att = torch.cat((torch.tensor([1]), _cumulative_alphas(num_timesteps, kind)))
        self.at = att[1:] / att[:-1]
        if transition == "uniform":  # the original's exact operation sequence
            self.bt = (1 - self.at) / num_classes
            self.att = torch.cat((att[1:], torch.tensor([1])))
            self.btt = (1 - self.att) / num_classes
            self.ct = torch.zeros_like(self.at)
            self.ctt = torch.zeros_like(self.att)
        else:
            # float64, then float32: 1 - ctt loses all precision near ctt = 1 in float32.
            self.att = torch.cat((att[1:], torch.tensor([1.0])))
            att64 = self.att.double()
            ctt64 = _MASK_SHARE[transition] * (1 - att64)
            ctt64[-1] = 0
            before = torch.cat((torch.zeros(1, dtype=torch.float64), ctt64[:-2]))  # ctt[s - 1]
            # One step composes to the cumulative: (1 - ctt[s]) = (1 - ctt[s-1]) * (1 - ct[s]).
            ct64 = 1 - (1 - ctt64[:-1]) / (1 - before)
            at64 = att64[:-1] / torch.cat((torch.ones(1, dtype=torch.float64), att64[:-2]))
            self.ctt = ctt64.float()
            self.ct = ct64.float()
            self.btt = ((1 - att64 - ctt64) / num_classes).clamp(min=0).float()
            self.bt = ((1 - at64 - ct64) / num_classes).clamp(min=0).float()
        self.log_cumprod_at = torch.log(self.att)
        self.log_cumprod_bt = torch.log(self.btt)
        self.log_at = torch.log(self.at)
        self.log_bt = torch.log(self.bt)

    TENSORS = ("at", "bt", "ct", "att", "btt", "ctt", "log_cumprod_at", "log_cumprod_bt", "log_at",
               "log_bt")

    def table(self, name: str, build):
        """Per-schedule lookup table ``build(self)`` (a tensor), cached per name and device."""
        key = (name, self.device)
        if key not in self._tables:
            self._tables[key] = build(self).to(self.device)
        return self._tables[key]
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
        moved._tables = {}
        for name in self.TENSORS:
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def __repr__(self) -> str:
        return (f"DiffusionSchedule(num_timesteps={self.num_timesteps}, num_classes={self.num_classes}, "
                f"kind={self.kind!r}, transition={self.transition!r}, device={self.device})")
