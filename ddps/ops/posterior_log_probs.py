"""posterior_log_probs: normalised log q(x_{t-1} | x_t, x0) [B, S, *] for label x0, or
log p(x_{t-1} | x_t) for soft x0 = softmax(logits), differentiable w.r.t. the logits.

It has no custom kernel: the fast path is a closed form in a few dense passes of torch ops (one
scatter into a constant fill for label x0; log_softmax, logaddexp and logsumexp for logits) that
runs on every device and differentiates through autograd. ``backend="reference"`` computes the
same distribution with ``ddps.reference`` (dense transition matrices / the original's formula).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference
from . import _common, _tables


def posterior_log_probs(x0_or_logits: torch.Tensor, x_t: torch.Tensor, t, schedule,
                        backend: str | None = None) -> torch.Tensor:
    """x0_or_logits: labels [B, *spatial] in [0, K), or logits [B, K, *spatial]; x_t: labels
    [B, *spatial] ([MASK] = K allowed); t: noise level per sample in [0, T). Returns float32
    [B, S, *spatial] with logsumexp over dim 1 equal to 0 (S = K, or K + 1 with [MASK]).
    For the uniform transition and label x0 this is the original's posterior, normalised."""
    x = _checks.tensor(x0_or_logits, "x0_or_logits")
    schedule = _common.check_schedule(schedule, x.device, "x0_or_logits")
    requested = backend if backend is not None else os.environ.get("DDPS_BACKEND") or None
    if requested is not None and requested not in _backend.BACKENDS:
        raise ValueError(f"posterior_log_probs: unknown backend {requested!r}; choose one of {_backend.BACKENDS}")
    soft = x.dtype.is_floating_point
    if soft:
        _common.check_logits(x, schedule)
        spatial = x.shape[:1] + x.shape[2:]
    else:
        _common.check_labels(x, "x0_or_logits", schedule, None, allow_mask=False)
        spatial = x.shape
    _common.check_labels(x_t, "x_t", schedule, None, allow_mask=True)
    if x_t.shape != spatial:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)} but x0_or_logits of shape {tuple(x.shape)} "
                         f"needs x_t of shape {tuple(spatial)}")
    t = _checks.timesteps(t, "t", x_t.shape[0], schedule.num_timesteps, x_t.device)
    if requested == "reference":
        if soft:
            return reference.p_posterior_log(x, x_t, t, schedule)
        S = schedule.num_states
        log_probs = reference.q_posterior_log(reference.index_to_log_onehot(x, S),
                                              reference.index_to_log_onehot(x_t, S), t, schedule)
        return log_probs.log_softmax(dim=1)
    return _soft_closed_form(x, x_t, t, schedule) if soft else _label_closed_form(x, x_t, t, schedule)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def _label_closed_form(x0, x_t, t, schedule):
    table = schedule.table("q_posterior_log", _tables.q_posterior_log_table)[t]  # [B, 3 cases, 3]
    x0, x_t = x0.long(), x_t.long()
    case = torch.where(x_t == x0, 0, 1)
    if schedule.mask_index is not None:
        case = torch.where(x_t == schedule.mask_index, 2, case)
    b = torch.arange(x0.shape[0], device=x0.device).reshape(-1, *([1] * (x0.dim() - 1))).expand_as(x0)
    entry = table[b, case]  # [B, *spatial, 3]
    K, S = schedule.num_classes, schedule.num_states
    out = entry[..., 2].unsqueeze(1).repeat(1, S, *([1] * (x0.dim() - 1)))
    if S > K:
        out[:, K] = float("-inf")
    out.scatter_(1, x0.unsqueeze(1), entry[..., 1].unsqueeze(1))
    out.scatter_(1, x_t.unsqueeze(1), entry[..., 0].unsqueeze(1))
    return out


def _soft_closed_form(logits, x_t, t, schedule):
    log_w = schedule.table("posterior_log_weights", _tables.posterior_log_weights)[t]  # [B, 6]
    log_a, log_b, log_ct, log_c, log_d, log_g = (_per_sample(log_w[:, i], logits.dim()) for i in range(6))
    log_p = F.log_softmax(logits.float(), dim=1)
    prior = torch.logaddexp(log_p + log_c, log_d)  # log q(x_{t-1} = k | soft x0), k real
    classes = torch.arange(schedule.num_classes, device=logits.device).reshape(1, -1, *([1] * (logits.dim() - 2)))
    x_t_ = x_t.long().unsqueeze(1)
    like = torch.where(classes == x_t_, torch.logaddexp(log_a, log_b), log_b)  # log q(x_t | x_{t-1} = k)
    if schedule.mask_index is not None:
        is_mask = x_t_ == schedule.mask_index
        like = torch.where(is_mask, log_ct, like)
        mask_term = torch.where(is_mask, log_g, torch.full_like(log_g, float("-inf"))).expand_as(x_t_)
        out = torch.cat([prior + like, mask_term.float()], dim=1)
    else:
        out = prior + like
    return out - torch.logsumexp(out, dim=1, keepdim=True)
