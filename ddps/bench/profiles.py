"""The profiles of ``ddps bench``: which cases run."""
from __future__ import annotations

from .cases import Case, denoiser_op_cases, sampling_cases
from .model_cases import head_cases, module_cases

QUICK, FULL = "quick", "full"


def select(profile: str, size: int, names=None) -> list[Case]:
    """The profile's cases, restricted to ``names`` (case names such as ``attention`` or
    ``head.sample``) when given; unknown names are an error naming them."""
    cases = all_cases(profile == FULL, size)
    if names:
        known = {c.name for c in cases}
        unknown = sorted(set(names) - known)
        if unknown:
            full = sorted(set(unknown) & {c.name for c in all_cases(True, size)}) if profile == QUICK else []
            hint = f" ({', '.join(full)}: in the full profile, add --full)" if full else ""
            raise ValueError(f"unknown case(s) {unknown}{hint}; the {profile} profile has {sorted(known)}")
        cases = [c for c in cases if c.name in names]
    return cases


def all_cases(full: bool, size: int) -> list[Case]:
    """The quick profile: what a user decides by, at B = 1: the sampling ops, the attention modules
    where the UNet runs them first (LinearAttention at S, Attention at S/4) on NCHW and channels-last
    input, forward and forward + backward, the UNet's forward, and the whole head's sampling and
    training step. --full: also every denoiser op, GSS's maskige_decode, LinearAttention at S/2 and
    S/4, one head step, and all of it at B = 4 too."""
    modes = ("fwd", "fwd+bwd")
    if not full:
        return ([c for c in sampling_cases(1, size) if c.group == "sampling op"]
                + module_cases(1, size, modes, linear_sides=(size,))
                + [c for c in head_cases(size) if c.name != "head.step"])
    cases = []
    for b in (1, 4):
        cases += sampling_cases(b, size)
    for b in (1, 4):
        cases += denoiser_op_cases(b, size, modes)
    for b in (1, 4):
        cases += module_cases(b, size, modes, unet=b == 1)
    return cases + head_cases(size)
