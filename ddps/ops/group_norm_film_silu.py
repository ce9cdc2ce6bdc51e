"""group_norm_film_silu: the ResnetBlock's Block epilogue, GroupNorm -> x * (scale + 1) + shift ->
SiLU.

Backends: ``triton`` (kernels/group_norm_film_silu.py: a statistics pass and an elementwise pass,
backward likewise; contiguous or channels-last as given), ``cpu`` (for channels-last activations,
as in the fused UNet, float32, bfloat16 or float16 computed in float32: a C++ kernel with one statistics pass and one output pass, and
a two-pass backward; otherwise torch's group_norm, then FiLM as one addcmul and SiLU in place) and ``reference``
(``ddps.reference.group_norm_film_silu``). Differentiable on all three.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _backend, _checks, reference
from ..kernels._layout import bcp
from . import _common

IMPLEMENTED = _backend.implements("group_norm_film_silu", ("cpu", "triton", "reference"))


def group_norm_film_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                         shift: torch.Tensor | None, groups: int, eps: float = 1e-5,
                         backend: str | None = None) -> torch.Tensor:
    """x [B, C, H, W]; weight, bias [C] (GroupNorm affine); scale, shift [B, C, 1, 1] (FiLM from
    the time embedding; both None for no FiLM); groups divides C."""
    _checks.floating(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the channels of x, shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        _checks.floating(p, name)
        if p.shape != x.shape[1:2]:
            raise ValueError(f"{name} must be [C={x.shape[1]}] for x of shape {tuple(x.shape)}, got {tuple(p.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (or both None)")
    if scale is not None and (scale.shape != shift.shape or scale.shape[:2] != x.shape[:2]
                              or scale.numel() != x.shape[0] * x.shape[1]):
        raise ValueError(f"scale and shift must be [B, C, 1, ...] for x of shape {tuple(x.shape)}, got "
                         f"{tuple(scale.shape)} and {tuple(shift.shape)}")
    chosen = _backend.resolve("group_norm_film_silu", backend, x.device)
    if chosen == "reference":
        return reference.group_norm_film_silu(x, weight, bias, scale, shift, groups, eps)
    b, c = x.shape[:2]
    film = [None, None] if scale is None else [t.reshape(b, c).contiguous() for t in (scale, shift)]
    if chosen == "triton":
        return _triton()(x, weight.contiguous(), bias.contiguous(), *film, groups, eps)[0]
    if _kernel_takes(x, weight, bias, scale, shift):
        # Parameters in float32 whatever x's dtype: the kernel computes in float32 and rounds only
        # its output to x's dtype (what autocast's group_norm gives on the CPU).
        params = [None if t is None else t.float().contiguous() for t in (weight, bias, *film)]
        return torch.ops.ddps.group_norm_film_silu(x, *params, groups, eps)[0]
    y = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        y = torch.addcmul(shift, y, scale + 1)
    # y is this function's own temporary: overwrite it unless autograd needs it for SiLU's backward.
    return F.silu(y, inplace=not y.requires_grad)


def _kernel_takes(x, *params) -> bool:
    """The C++ kernel's case: channels-last [B, C, H, W] (the fused UNet's activations), float32,
    bfloat16 or float16."""
    return (x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.is_contiguous(memory_format=torch.channels_last)
            and all(p is None or p.dtype != torch.float64 for p in params) and x.numel() > 0)


@_backend.register_fake("group_norm_film_silu")
def _fake(x, weight, bias, scale, shift, groups, eps):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x), stats, stats.clone()


@_backend.register_fake("group_norm_film_silu_backward")
def _backward_fake(grad, x, weight, bias, scale, shift, mean, rstd, groups):
    film = None if scale is None else x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), film, \
        None if film is None else film.clone()


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, groups, _ = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, output[1], output[2])
    ctx.groups = groups


def _grads(backward_op, ctx, grad):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dscale, dshift = backward_op(grad, x, weight, bias, scale, shift, mean, rstd, ctx.groups)
    film = (None, None) if scale is None else (dscale, dshift)
    return dx, dweight, dbias, *film, None, None


_backend.register_autograd(
    "group_norm_film_silu",
    lambda ctx, grad, _mean, _rstd: _grads(torch.ops.ddps.group_norm_film_silu_backward, ctx,
                                           grad.contiguous(memory_format=torch.channels_last)),
    _setup_context)


def _triton_fwd_fake(x, weight, bias, scale, shift, groups, eps):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(bcp(x)[0]), stats, stats.clone()


def _triton_bwd_fake(grad, x, weight, bias, scale, shift, mean, rstd, groups):
    film = x.new_empty(x.shape[:2])
    return torch.empty_like(bcp(x)[0]), torch.empty_like(weight), torch.empty_like(bias), film, film.clone()


@functools.cache
def _triton():
    forward = _common.triton_op("group_norm_film_silu", "group_norm_film_silu_fwd", _triton_fwd_fake)
    backward = _common.triton_op("group_norm_film_silu", "group_norm_film_silu_bwd", _triton_bwd_fake)
    forward.register_autograd(lambda ctx, grad, _mean, _rstd: _grads(backward, ctx, grad),
                              setup_context=_setup_context)
    return forward
