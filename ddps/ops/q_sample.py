"""q_sample: x_t ~ q(x_t | x_0), the one-hot transition sampling of the original, on labels.

Backends: ``cpu`` / ``cuda`` (csrc/q_sample/, custom op ``ddps::q_sample``), ``triton``
(kernels/q_sample.py, ``ddps_triton::q_sample``) and ``reference`` (``ddps.reference.q_pred``,
dense log space).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks, reference
from . import _common, _tables

IMPLEMENTED = _backend.implements("q_sample", ("cpu", "cuda", "triton", "reference"))


@_backend.register_fake("q_sample")
def _q_sample_fake(x0, t, table, seed, num_classes, mask_index, ignore_index):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


def q_sample(x0: torch.Tensor, t, schedule, generator: torch.Generator | None = None,
             backend: str | None = None, ignore_index: int | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) per label.

    x0: labels [B, *spatial] (int64, int32 or uint8) in [0, K); t: noise level s per sample, an
    int or an integer tensor [B], s in [0, T); ignore_index: a label value (not a class) that
    passes through unchanged. Returns labels of x0's shape and dtype (the [MASK] label K appears
    under the mask transitions).
    """
    schedule = _common.check_schedule(schedule, _checks.tensor(x0, "x0").device, "x0")
    ignore_index = _common.check_ignore_index(ignore_index, schedule)
    _common.check_labels(x0, "x0", schedule, ignore_index, allow_mask=False)
    t = _checks.timesteps(t, "t", x0.shape[0], schedule.num_timesteps, x0.device)
    chosen = _backend.resolve("q_sample", backend, x0.device)
    if chosen == "reference":
        return _common.keep_ignored(lambda x: reference.q_pred(x, t, schedule, generator), x0, ignore_index, x0)
    table = schedule.table("q_sample", _tables.q_sample_table)
    return _common.launch("q_sample", chosen, x0.contiguous(), t, table, _common.draw_seed(generator),
                          schedule.num_classes, _common.mask_index(schedule), ignore_index)
