"""The original DDPS diffusion ops, eager PyTorch, in the original's exact operation sequence.

``torch.manual_seed(s)`` followed by a call here reproduces the original code bitwise (SPEC §3,
checked against the golden fixtures). This is the oracle every fused op is tested against, the
baseline of every benchmark and the fallback backend: do not "improve" the numerics here.

Labels are integer tensors [B, *spatial]; log-space tensors are [B, K, *spatial] (class dim 1);
``t`` is the noise level s per sample (int64 [B] or an int), s in [0, T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from .schedule import DiffusionSchedule

__all__ = ["index_to_log_onehot", "log_add_exp", "sample_categorical", "q_pred_log", "q_pred",
           "q_posterior_log", "q_posterior"]


def _log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    onehot = F.one_hot(x.long(), num_classes)
    permute_order = (0, -1) + tuple(range(1, x.dim()))
    return torch.log(onehot.permute(permute_order).float().clamp(min=1e-30))


def index_to_log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log(one_hot(x)) clamped at log(1e-30): labels [B, *] -> float32 [B, K, *]."""
    _checks.labels(x, "x", num_classes)
    return _log_onehot(x, num_classes)


def log_add_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)), computed as the original does (max-shifted)."""
    maximum = torch.max(a, b)
    return maximum + torch.log(torch.exp(a - maximum) + torch.exp(b - maximum))


def sample_categorical(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max sample over dim 1: one uniform per element of ``log_probs`` -> int64 labels."""
    # empty_like(...).uniform_ is what rand_like does (same layout, same draws) and takes a generator.
    uniform = torch.empty_like(log_probs).uniform_(generator=generator)
    gumbel_noise = -torch.log(-torch.log(uniform + 1e-30) + 1e-30)
    return (gumbel_noise + log_probs).argmax(dim=1).long()


def _extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


def _q_pred_log(log_x0, t, schedule: DiffusionSchedule):
    # Level -1 wraps to T, the identity (q_posterior asks for s - 1 at s = 0).
    t = (t + (schedule.num_timesteps + 1)) % (schedule.num_timesteps + 1)
    log_cumprod_at = _extract(schedule.log_cumprod_at, t, log_x0.dim())
    log_cumprod_bt = _extract(schedule.log_cumprod_bt, t, log_x0.dim())
    return log_add_exp(log_x0 + log_cumprod_at, log_cumprod_bt)


def _q_pred_log_one_step(log_x, t, schedule: DiffusionSchedule):
    log_at = _extract(schedule.log_at, t, log_x.dim())
    log_bt = _extract(schedule.log_bt, t, log_x.dim())
    return log_add_exp(log_x + log_at, log_bt)


def _check_log(log_x, name: str, schedule: DiffusionSchedule) -> None:
    _checks.tensor(log_x, name)
    if not log_x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point log-probability tensor, got dtype {log_x.dtype}")
    if log_x.dim() < 2 or log_x.shape[1] != schedule.num_classes:
        raise ValueError(f"{name} must be [B, K={schedule.num_classes}, *spatial], got shape {tuple(log_x.shape)}")
    _checks.same_device(log_x, name, schedule.device, "the schedule")


def _check_schedule(schedule) -> None:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"schedule must be a ddps.schedule.DiffusionSchedule, got {type(schedule).__name__}")


def q_pred_log(log_x0: torch.Tensor, t, schedule: DiffusionSchedule) -> torch.Tensor:
    """log q(x_t | x_0) [B, K, *] from log x_0 [B, K, *]."""
    _check_schedule(schedule)
    _check_log(log_x0, "log_x0", schedule)
    t = _checks.timesteps(t, "t", log_x0.shape[0], schedule.num_timesteps, log_x0.device)
    return _q_pred_log(log_x0, t, schedule)


def q_posterior_log(log_x0: torch.Tensor, log_x_t: torch.Tensor, t, schedule: DiffusionSchedule) -> torch.Tensor:
    """log q(x_{t-1} | x_t, x_0), unnormalised and clamped to [-70, 0] as in the original."""
    _check_schedule(schedule)
    _check_log(log_x0, "log_x0", schedule)
    _check_log(log_x_t, "log_x_t", schedule)
    _checks.same_shape(log_x0, log_x_t, "log_x0", "log_x_t")
    t = _checks.timesteps(t, "t", log_x0.shape[0], schedule.num_timesteps, log_x0.device)
    log_xt_given_x0 = _q_pred_log(log_x0, t, schedule)
    log_xt_given_xtm1 = _q_pred_log_one_step(log_x_t, t, schedule)
    log_xtm1_given_x0 = _q_pred_log(log_x0, t - 1, schedule)
    log_probs = log_xt_given_xtm1 + log_xtm1_given_x0 - log_xt_given_x0
    return torch.clamp(log_probs, -70, 0)


def _check_label_input(x, name: str, schedule) -> None:
    _checks.same_device(_checks.tensor(x, name), name, schedule.device, "the schedule")
    _checks.labels(x, name, schedule.num_classes)


def q_pred(x0: torch.Tensor, t, schedule: DiffusionSchedule,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0): labels [B, *] -> int64 labels [B, *] (one-hot transition
    sampling through dense log space, as the original)."""
    _check_schedule(schedule)
    _check_label_input(x0, "x0", schedule)
    t = _checks.timesteps(t, "t", x0.shape[0], schedule.num_timesteps, x0.device)
    log_x0 = _log_onehot(x0, schedule.num_classes)
    return sample_categorical(_q_pred_log(log_x0, t, schedule), generator)


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t, schedule: DiffusionSchedule,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_{t-1} ~ q(x_{t-1} | x_t, x_0) for label x0 (e.g. the previous prediction's
    argmax): labels [B, *] -> int64 labels [B, *]."""
    _check_schedule(schedule)
    _check_label_input(x0, "x0", schedule)
    _check_label_input(x_t, "x_t", schedule)
    _checks.same_shape(x0, x_t, "x0", "x_t")
    log_x0 = _log_onehot(x0, schedule.num_classes)
    log_x_t = _log_onehot(x_t, schedule.num_classes)
    return sample_categorical(q_posterior_log(log_x0, log_x_t, t, schedule), generator)
