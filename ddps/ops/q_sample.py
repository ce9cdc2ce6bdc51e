"""q_sample: x_t ~ q(x_t | x_0), the one-hot transition sampling of the original, on labels.

Backends: ``cpu`` / ``cuda`` (csrc/q_sample/, custom op ``ddps::q_sample``) and ``reference``
(``ddps.reference.q_pred``, dense log space).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks, reference
from ._common import check_schedule, draw_seed

IMPLEMENTED = ("cpu", "cuda", "reference")


@_backend.register_fake("q_sample")
def _q_sample_fake(x0, t, keep_threshold, seed, num_classes):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


def q_sample(x0: torch.Tensor, t, schedule, generator: torch.Generator | None = None,
             backend: str | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) per label.

    x0: labels [B, *spatial] (int64, int32 or uint8) in [0, K); t: noise level s per sample, an
    int or an integer tensor [B], s in [0, T). Returns labels of x0's shape and dtype.
    """
    schedule = check_schedule(schedule, _checks.tensor(x0, "x0").device)
    _checks.labels(x0, "x0", schedule.num_classes)
    if x0.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"x0 must be int64, int32 or uint8 labels, got dtype {x0.dtype}")
    t = _checks.timesteps(t, "t", x0.shape[0], schedule.num_timesteps, x0.device)
    chosen = _backend.resolve("q_sample", backend, x0.device, IMPLEMENTED)
    if chosen == "reference":
        return reference.q_pred(x0, t, schedule, generator).to(x0.dtype)
    return torch.ops.ddps.q_sample(x0, t, schedule.keep_threshold, draw_seed(generator),
                                   schedule.num_classes)
