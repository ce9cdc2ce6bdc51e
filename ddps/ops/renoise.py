"""renoise: q_sample(argmax(logits)) in one pass over the logits — the hot step of the original
inference loop ("free re-noising").

Backends: ``cpu`` / ``cuda`` (csrc/renoise/), ``triton`` (kernels/renoise.py) and ``reference``
(``ddps.reference.q_pred`` of ``logits.argmax(1)``).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks, reference
from . import _common, _tables

IMPLEMENTED = _backend.implements("renoise", ("cpu", "cuda", "triton", "reference"))


@_backend.register_fake("renoise")
def _renoise_fake(logits, t, table, seed, num_classes, mask_index):
    return logits.new_empty((logits.shape[0], *logits.shape[2:]), dtype=torch.int64)


def renoise(logits: torch.Tensor, t, schedule, generator: torch.Generator | None = None,
            backend: str | None = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_0 = argmax(logits)): logits [B, K, *spatial] float32/float16/bfloat16 ->
    int64 labels [B, *spatial]. Equal to ``q_sample(logits.argmax(1), t, ...)`` with the same
    generator state, bit for bit (ties and NaN resolve as torch.argmax does)."""
    schedule = _common.check_schedule(schedule, _checks.tensor(logits, "logits").device, "logits")
    _common.check_logits(logits, schedule)
    t = _checks.timesteps(t, "t", logits.shape[0], schedule.num_timesteps, logits.device)
    chosen = _backend.resolve("renoise", backend, logits.device)
    if chosen == "reference":
        return reference.q_pred(logits.argmax(dim=1), t, schedule, generator)
    table = schedule.table("q_sample", _tables.q_sample_table)
    return _common.launch("renoise", chosen, logits.contiguous(), t, table, _common.draw_seed(generator),
                          schedule.num_classes, _common.mask_index(schedule))
