"""Per-noise-level tables of the fused samplers, computed once per schedule on the host in float64.

Every label sampler decides with integer comparisons of a 32-bit Philox word against these
thresholds (probability * 2^32), so the per-element work is integer-only and bitwise identical on
every backend. Cases of the label posterior: 0 = x_t equals x0, 1 = x_t differs from x0 (both real
classes), 2 = x_t is [MASK].
"""
from __future__ import annotations

import torch

from ..schedule import DiffusionSchedule

TWO_32 = 2.0**32
_LOG_ONEHOT_FLOOR = 1e-30  # log_onehot's clamp: a "zero" one-hot entry is 1e-30 in the original
_CLAMP_MIN = torch.tensor(-70.0, dtype=torch.float64).exp().item()  # the original clamps log p at -70


def _threshold(p: torch.Tensor) -> torch.Tensor:
    return torch.round(p.clamp(0, 1) * TWO_32).long()


def _per_level(schedule: DiffusionSchedule):
    """float64 one-step (a, b, ct) at s, cumulative (C, D, G) at s - 1 (wrapping -1 to T), and
    cumulative (A, B) at s, for s = 0..T-1."""
    T = schedule.num_timesteps
    s = torch.arange(T)
    prev = (s - 1) % (T + 1)
    d = {n: getattr(schedule, n).detach().double().cpu() for n in ("at", "bt", "ct", "att", "btt", "ctt")}
    return (d["at"], d["bt"], d["ct"], d["att"][prev], d["btt"][prev], d["ctt"][prev], d["att"][s], d["btt"][s])


def q_sample_table(schedule: DiffusionSchedule) -> torch.Tensor:
    """[T + 1, 2] int64: thresholds of (keep x0, keep x0 or [MASK]); the rest is uniform over K."""
    att, ctt = schedule.att.double().cpu(), schedule.ctt.double().cpu()
    return torch.stack([_threshold(att), _threshold(att + ctt)], dim=1)


def _q_posterior_cases(schedule: DiffusionSchedule):
    """Per case, float64 [T] probabilities (x_{t-1} = x_t, x_{t-1} = x0, each other real class)."""
    K = schedule.num_classes
    a, b, ct, C, D, G, A, B = _per_level(schedule)
    zero = torch.zeros_like(a)
    if schedule.transition == "uniform":
        # The original divides by q(x_t = k | x0) per class k (not by the constant q(x_t | x0)),
        # works with one-hot logs floored at 1e-30 and clamps log p to [-70, 0]: reproduced here.
        eps = _LOG_ONEHOT_FLOOR
        on1, off1 = a + b, b + a * eps
        on2, off2 = C + D, D + C * eps
        on3, off3 = A + B, B + A * eps

        def w(x):
            return x.clamp(_CLAMP_MIN, 1.0)

        cases = [
            (w(on1 * on2 / on3), zero, w(off1 * off2 / off3), K - 1),
            (w(on1 * off2 / off3), w(off1 * on2 / on3), w(off1 * off2 / off3), K - 2),
            (torch.ones_like(a), zero, zero, K - 1),  # no [MASK] in the uniform transition
        ]
    else:  # the true posterior q(x_{t-1} | x_t, x0) of the mask kinds
        cases = [
            ((a + b) * (C + D), zero, b * D, K - 1),
            ((a + b) * D, b * (C + D), b * D, K - 2),
            (G, ct * (C + D), ct * D, K - 1),
        ]
    out = []
    for w_xt, w_x0, w_other, n_other in cases:
        z = w_xt + w_x0 + n_other * w_other
        # An impossible observation (z = 0, e.g. a real x_t != x0 under "absorbing") keeps x_t.
        ok = z > 0
        z = z.clamp(min=1e-300)
        out.append((torch.where(ok, w_xt / z, torch.ones_like(z)), torch.where(ok, w_x0 / z, zero),
                    torch.where(ok, w_other / z, zero)))
    return out


def q_posterior_table(schedule: DiffusionSchedule) -> torch.Tensor:
    """[T, 3, 2] int64 cumulative thresholds of (x_{t-1} = x_t, x_{t-1} = x0) per case; the rest
    is uniform over the real classes other than x0 and x_t."""
    rows = [torch.stack([_threshold(p_xt), _threshold(p_xt + p_x0)], dim=1)
            for p_xt, p_x0, _ in _q_posterior_cases(schedule)]
    return torch.stack(rows, dim=1)


def q_posterior_log_table(schedule: DiffusionSchedule) -> torch.Tensor:
    """[T, 3, 3] float32 log-probabilities (x_{t-1} = x_t, = x0, = each other real class) per case."""
    rows = [torch.stack(case, dim=1).log() for case in _q_posterior_cases(schedule)]
    return torch.stack(rows, dim=1).float()


def posterior_log_weights(schedule: DiffusionSchedule) -> torch.Tensor:
    """[T, 6] float32 logs of (a, b, ct) at s and (C, D, G) at s - 1, for the soft posterior."""
    a, b, ct, C, D, G, _, _ = _per_level(schedule)
    return torch.stack([a, b, ct, C, D, G], dim=1).log().float()


def p_posterior_table(schedule: DiffusionSchedule) -> torch.Tensor:
    """[T, 2, 4] float32 mixture weights of the soft posterior per case (x_t real, x_t [MASK]).

    With p = softmax(logits): p(x_{t-1} = k | x_t) is a mixture of "x_t" (weight w0 * p[x_t] + w1),
    "a draw from p" (w2) and "uniform over the K classes" (w3).
    """
    K = schedule.num_classes
    a, b, ct, C, D, G, _, _ = _per_level(schedule)
    real = torch.stack([a * C, a * D, b * C, b * D * K], dim=1)
    mask = torch.stack([torch.zeros_like(a), G, ct * C, ct * D * K], dim=1)
    return torch.stack([real, mask], dim=1).float()
