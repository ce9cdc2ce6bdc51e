"""q_posterior_sample: x_{t-1} ~ q(x_{t-1} | x_t, x0) for label x0 (the original's posterior
sampling, on labels: at most three distinct probabilities per pixel).

Backends: ``cpu`` / ``cuda`` (csrc/q_posterior_sample/), ``triton``
(kernels/q_posterior_sample.py) and ``reference`` (``ddps.reference.q_posterior``).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks, reference
from . import _common, _tables

IMPLEMENTED = _backend.implements("q_posterior_sample", ("cpu", "cuda", "triton", "reference"))


@_backend.register_fake("q_posterior_sample")
def _q_posterior_sample_fake(x0, x_t, t, table, seed, num_classes, mask_index, ignore_index):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def q_posterior_sample(x0: torch.Tensor, x_t: torch.Tensor, t, schedule, generator: torch.Generator | None = None,
                       backend: str | None = None, ignore_index: int | None = None) -> torch.Tensor:
    """Sample x_{t-1} ~ q(x_{t-1} | x_t, x0).

    x0: labels [B, *spatial] in [0, K) (e.g. the previous prediction's argmax); x_t: labels of the
    same shape and dtype in [0, K) ([0, K] with [MASK]); t: noise level s per sample in [0, T);
    pixels where either is ignore_index return x_t. Returns labels like x_t. At s = 0 the
    result is x0 (the identity level).
    """
    schedule = _common.check_schedule(schedule, _checks.tensor(x0, "x0").device, "x0")
    ignore_index = _common.check_ignore_index(ignore_index, schedule)
    _common.check_labels(x0, "x0", schedule, ignore_index, allow_mask=False)
    _common.check_labels(x_t, "x_t", schedule, ignore_index, allow_mask=True)
    _checks.same_shape(x0, x_t, "x0", "x_t")
    if x0.dtype != x_t.dtype:
        raise TypeError(f"x0 has dtype {x0.dtype} but x_t has dtype {x_t.dtype}; pass one label dtype")
    t = _checks.timesteps(t, "t", x0.shape[0], schedule.num_timesteps, x0.device)
    chosen = _backend.resolve("q_posterior_sample", backend, x0.device)
    if chosen == "reference":
        return _common.keep_ignored(lambda a, b: reference.q_posterior(a, b, t, schedule, generator),
                                    x_t, ignore_index, x0, x_t)
    table = schedule.table("q_posterior_sample", _tables.q_posterior_table)
    return _common.launch("q_posterior_sample", chosen, x0.contiguous(), x_t.contiguous(), t, table,
                          _common.draw_seed(generator), schedule.num_classes, _common.mask_index(schedule),
                          ignore_index)
