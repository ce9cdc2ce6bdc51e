"""The original DDPS diffusion ops, eager PyTorch, in the original's exact operation sequence.

``torch.manual_seed(s)`` followed by a call here reproduces the original code bitwise (SPEC §3,
checked against the golden fixtures). This is the oracle every fused op is tested against, the
baseline of every benchmark and the fallback backend: do not "improve" the numerics here.

Labels are integer tensors [B, *spatial]; log-space tensors are [B, S, *spatial] (class dim 1;
S = K, or K + 1 with the [MASK] state of the mask transitions); ``t`` is the noise level s per
sample (int64 [B] or an int), s in [0, T).

The original has the uniform transition only. For the "absorbing" and "mask_and_replace"
transitions, and for the soft-x0 posterior ``p_posterior_log`` (D3PM x0-parameterisation, not in
the original head), this module computes the exact distributions densely from the transition
matrices in float64: slow, simple, and the oracle of the fused kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks
from .schedule import DiffusionSchedule

__all__ = ["index_to_log_onehot", "log_add_exp", "sample_categorical", "q_pred_log", "q_pred",
           "q_posterior_log", "q_posterior", "transition_matrix", "p_posterior_log", "p_posterior",
           "attention", "linear_attention", "channel_layer_norm", "group_norm_film_silu", "weight_standardize"]


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
    if schedule.transition != "uniform":
        probs = torch.einsum("bin,bij->bjn", _flat(_onehot_probs(log_x0)), transition_matrix(schedule, t, True))
        return _log(probs).float().reshape(log_x0.shape)
    # Level -1 wraps to T, the identity (q_posterior asks for s - 1 at s = 0).
    t = (t + (schedule.num_timesteps + 1)) % (schedule.num_timesteps + 1)
    log_cumprod_at = _extract(schedule.log_cumprod_at, t, log_x0.dim())
    log_cumprod_bt = _extract(schedule.log_cumprod_bt, t, log_x0.dim())
    return log_add_exp(log_x0 + log_cumprod_at, log_cumprod_bt)


def _q_pred_log_one_step(log_x, t, schedule: DiffusionSchedule):
    log_at = _extract(schedule.log_at, t, log_x.dim())
    log_bt = _extract(schedule.log_bt, t, log_x.dim())
    return log_add_exp(log_x + log_at, log_bt)


def transition_matrix(schedule: DiffusionSchedule, t: torch.Tensor, cumulative: bool) -> torch.Tensor:
    """float64 [B, S, S]: row k -> column j is q(x_s = j | x_{s-1} = k) (one step, level t) or
    q(x_s = j | x_0 = k) (cumulative, level t; -1 wraps to the identity level T)."""
    if cumulative:
        t = (t + (schedule.num_timesteps + 1)) % (schedule.num_timesteps + 1)
        keep, uniform, mask = schedule.att, schedule.btt, schedule.ctt
    else:
        keep, uniform, mask = schedule.at, schedule.bt, schedule.ct
    K, S = schedule.num_classes, schedule.num_states
    a, b, c = (v.double()[t][:, None, None] for v in (keep, uniform, mask))
    q = torch.zeros(t.shape[0], S, S, dtype=torch.float64, device=t.device)
    q[:, :K, :K] = a * torch.eye(K, dtype=torch.float64, device=t.device) + b
    if S > K:
        q[:, :K, K:] = c
        q[:, K, K] = 1
    return q


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, S, *spatial] -> float64 [B, S, N]."""
    return x.double().reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _onehot_probs(log_x: torch.Tensor) -> torch.Tensor:
    """exp of a log one-hot, with index_to_log_onehot's floor (1e-30) read as the zero it stands for."""
    x = log_x.exp()
    return x.where(x > 1e-29, 0.0)


def _log(w: torch.Tensor) -> torch.Tensor:
    # log with log(0) = -inf and a zero (not NaN) gradient there.
    positive = w > 0
    return torch.where(positive, w.where(positive, 1.0).log(), float("-inf"))


def _dense_posterior_log(x0_probs, log_x_t, t, schedule):
    # q(x_{t-1} = k | x_t, x0) ∝ q(x_t | x_{t-1} = k) * sum_i p(x0 = i) q(x_{t-1} = k | x0 = i).
    prior = torch.einsum("bin,bik->bkn", _flat(x0_probs), transition_matrix(schedule, t - 1, True))
    likelihood = torch.einsum("bkj,bjn->bkn", transition_matrix(schedule, t, False), _flat(_onehot_probs(log_x_t)))
    log_w = _log(prior * likelihood)
    return (log_w - torch.logsumexp(log_w, dim=1, keepdim=True)).float().reshape(log_x_t.shape)


def _check_log(log_x, name: str, schedule: DiffusionSchedule) -> None:
    _checks.tensor(log_x, name)
    if not log_x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point log-probability tensor, got dtype {log_x.dtype}")
    if log_x.dim() < 2 or log_x.shape[1] != schedule.num_states:
        raise ValueError(f"{name} must be [B, S={schedule.num_states}, *spatial], got shape {tuple(log_x.shape)}")
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
    """log q(x_{t-1} | x_t, x_0). Uniform transition: the original's formula, unnormalised and
    clamped to [-70, 0] (it divides by q(x_t = k | x_0) per class k, not by the constant
    q(x_t | x_0)). Mask transitions: the exact normalised posterior."""
    _check_schedule(schedule)
    _check_log(log_x0, "log_x0", schedule)
    _check_log(log_x_t, "log_x_t", schedule)
    _checks.same_shape(log_x0, log_x_t, "log_x0", "log_x_t")
    t = _checks.timesteps(t, "t", log_x0.shape[0], schedule.num_timesteps, log_x0.device)
    if schedule.transition != "uniform":
        return _dense_posterior_log(_onehot_probs(log_x0), log_x_t, t, schedule)
    log_xt_given_x0 = _q_pred_log(log_x0, t, schedule)
    log_xt_given_xtm1 = _q_pred_log_one_step(log_x_t, t, schedule)
    log_xtm1_given_x0 = _q_pred_log(log_x0, t - 1, schedule)
    log_probs = log_xt_given_xtm1 + log_xtm1_given_x0 - log_xt_given_x0
    return torch.clamp(log_probs, -70, 0)


def _check_label_input(x, name: str, schedule, num_labels: int | None = None) -> None:
    _checks.same_device(_checks.tensor(x, name), name, schedule.device, "the schedule")
    _checks.labels(x, name, num_labels or schedule.num_classes)


def q_pred(x0: torch.Tensor, t, schedule: DiffusionSchedule,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0): labels [B, *] -> int64 labels [B, *] (one-hot transition
    sampling through dense log space, as the original)."""
    _check_schedule(schedule)
    _check_label_input(x0, "x0", schedule)
    t = _checks.timesteps(t, "t", x0.shape[0], schedule.num_timesteps, x0.device)
    log_x0 = _log_onehot(x0, schedule.num_states)
    return sample_categorical(_q_pred_log(log_x0, t, schedule), generator)


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t, schedule: DiffusionSchedule,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_{t-1} ~ q(x_{t-1} | x_t, x_0) for label x0 (e.g. the previous prediction's
    argmax): labels [B, *] -> int64 labels [B, *]."""
    _check_schedule(schedule)
    _check_label_input(x0, "x0", schedule)
    _check_label_input(x_t, "x_t", schedule, schedule.num_states)
    _checks.same_shape(x0, x_t, "x0", "x_t")
    log_x0 = _log_onehot(x0, schedule.num_states)
    log_x_t = _log_onehot(x_t, schedule.num_states)
    return sample_categorical(q_posterior_log(log_x0, log_x_t, t, schedule), generator)


def p_posterior_log(logits: torch.Tensor, x_t: torch.Tensor, t, schedule: DiffusionSchedule) -> torch.Tensor:
    """Normalised log p(x_{t-1} | x_t) [B, S, *] with soft x0 = softmax(logits) [B, K, *]: for the
    uniform transition log((a [k = x_t] + b) (c p_k + d)) normalised (SPEC §3); differentiable."""
    _check_schedule(schedule)
    _checks.tensor(logits, "logits")
    if not logits.dtype.is_floating_point or logits.dim() < 2 or logits.shape[1] != schedule.num_classes:
        raise ValueError(f"logits must be floating-point [B, K={schedule.num_classes}, *spatial], "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    _check_label_input(x_t, "x_t", schedule, schedule.num_states)
    if x_t.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)} but logits {tuple(logits.shape)} need "
                         f"{tuple(logits.shape[:1] + logits.shape[2:])}")
    t = _checks.timesteps(t, "t", x_t.shape[0], schedule.num_timesteps, x_t.device)
    probs = logits.double().softmax(dim=1)
    extra = schedule.num_states - schedule.num_classes
    if extra:
        probs = torch.cat([probs, probs.new_zeros(probs.shape[0], extra, *probs.shape[2:])], dim=1)
    return _dense_posterior_log(probs, _log_onehot(x_t, schedule.num_states), t, schedule)


def p_posterior(logits: torch.Tensor, x_t: torch.Tensor, t, schedule: DiffusionSchedule,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_{t-1} ~ p(x_{t-1} | x_t) with soft x0 = softmax(logits): int64 labels [B, *]."""
    return sample_categorical(p_posterior_log(logits, x_t, t, schedule), generator)


# --- the denoiser's ops (SPEC §4), the original's sequences, used by ddps.nn's reference modules ---

def _norm_eps(x: torch.Tensor) -> float:
    return 1e-5 if x.dtype == torch.float32 else 1e-3


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention over tokens: q, k, v [B, heads, d, N] -> [B, heads * d, N]."""
    q = q * scale
    sim = torch.einsum("bhdi,bhdj->bhij", q, k)
    attn = sim.softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", attn, v)
    return out.permute(0, 1, 3, 2).reshape(q.shape[0], -1, q.shape[-1])


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The original linear attention core: q, k, v [B, heads, d, N] -> [B, heads * d, N]."""
    q = q.softmax(dim=-2)
    k = k.softmax(dim=-1)
    q = q * scale
    v = v / q.shape[-1]
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q)
    return out.reshape(q.shape[0], -1, q.shape[-1])


def channel_layer_norm(x: torch.Tensor, g: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """LayerNorm over dim 1 of [B, C, *], gain g [1, C, 1, ...] and no bias; eps by dtype if None."""
    eps = _norm_eps(x) if eps is None else eps
    var = torch.var(x, dim=1, unbiased=False, keepdim=True)
    mean = torch.mean(x, dim=1, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * g


def group_norm_film_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                         shift: torch.Tensor | None, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """The ResnetBlock's Block epilogue: GroupNorm(groups) -> x * (scale + 1) + shift -> SiLU;
    x [B, C, H, W], scale/shift [B, C, 1, 1] (both or neither)."""
    x = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        x = x * (scale + 1) + shift
    return F.silu(x)


def weight_standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-output-channel standardisation of a conv weight [O, I, kh, kw] (biased variance)."""
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = torch.var(weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (weight - mean) * (var + eps).rsqrt()
