"""p_posterior_sample: x_{t-1} ~ p(x_{t-1} | x_t) with soft x0 = softmax(logits) (D3PM
x0-parameterisation, SPEC §3), reading each pixel's logits once from memory.

Backends: ``cpu`` / ``cuda`` (csrc/p_posterior_sample/), ``triton``
(kernels/p_posterior_sample.py) and ``reference`` (``ddps.reference.p_posterior``).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks, reference
from . import _common, _tables

IMPLEMENTED = _backend.implements("p_posterior_sample", ("cpu", "cuda", "triton", "reference"))


@_backend.register_fake("p_posterior_sample")
def _p_posterior_sample_fake(logits, x_t, t, table, seed, num_classes, mask_index, ignore_index):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def p_posterior_sample(logits: torch.Tensor, x_t: torch.Tensor, t, schedule,
                       generator: torch.Generator | None = None, backend: str | None = None,
                       ignore_index: int | None = None) -> torch.Tensor:
    """Sample x_{t-1} ~ p(x_{t-1} | x_t) = sum_x0 q(x_{t-1} | x_t, x0) softmax(logits)[x0].

    logits: [B, K, *spatial] float32/float16/bfloat16; x_t: labels [B, *spatial]; t: noise level
    per sample in [0, T). Pixels whose logits hold NaN or +inf, or are all -inf, keep x_t, as do
    pixels where x_t is ignore_index. Returns labels like x_t.
    """
    schedule = _common.check_schedule(schedule, _checks.tensor(logits, "logits").device, "logits")
    _common.check_logits(logits, schedule)
    ignore_index = _common.check_ignore_index(ignore_index, schedule)
    _common.check_labels(x_t, "x_t", schedule, ignore_index, allow_mask=True)
    if x_t.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)} but logits of shape {tuple(logits.shape)} "
                         f"need x_t of shape {tuple(logits.shape[:1] + logits.shape[2:])}")
    t = _checks.timesteps(t, "t", x_t.shape[0], schedule.num_timesteps, x_t.device)
    chosen = _backend.resolve("p_posterior_sample", backend, x_t.device)
    if chosen == "reference":
        return _common.keep_ignored(lambda l, x: reference.p_posterior(l, x, t, schedule, generator),
                                    x_t, ignore_index, logits, x_t)
    table = schedule.table("p_posterior_sample", _tables.p_posterior_table)
    return _common.launch("p_posterior_sample", chosen, logits.contiguous(), x_t.contiguous(), t, table,
                          _common.draw_seed(generator), schedule.num_classes, _common.mask_index(schedule),
                          ignore_index)
