"""Triton group_norm_film_silu: GroupNorm -> x * (scale + 1) + shift -> SiLU.

Forward: one pass for per-tile statistics (sum and squared deviations from the tile's own mean,
merged with Chan's formula: no cancellation when the mean is large against the spread), one
elementwise pass. Backward: one pass for the per-(sample, channel) sums every gradient is made of,
one elementwise pass for dx. The per-channel coefficients between passes are [B, C] torch ops."""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._layout import FP_FUSION, bcp, bcp_like, like

BLOCK = 4096  # elements per program: channels x pixels


def _blocks(channels: int, pixels: int, max_c: int = 64):
    block_c = min(triton.next_power_of_2(channels), max_c)
    return block_c, max(1, min(triton.next_power_of_2(max(pixels, 1)), BLOCK // block_c))


@triton.jit
def _tile(b, c0, i_p, C_end, P, s_b, s_c, s_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    o_c = c0 + tl.arange(0, BLOCK_C)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (o_c[:, None] < C_end) & (o_p[None, :] < P)
    return b.to(tl.int64) * s_b + o_c[:, None] * s_c + o_p[None, :].to(tl.int64) * s_p, m, o_c


@triton.jit
def _film(x, mean, a, c):
    """The pre-activation z = GroupNorm(x) * (scale + 1) + shift = (x - mean) * a + c."""
    return (x - mean[:, None]) * a[:, None] + c[:, None]


@triton.jit
def _stats_kernel(p_x, p_sum, p_m2, C, P, groups, s_b, s_c, s_p, CPG: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    bg, i_p = tl.program_id(0), tl.program_id(1)
    b, g = bg // groups, bg % groups
    off, m, _ = _tile(b, g * CPG, i_p, g * CPG + CPG, P, s_b, s_c, s_p, BLOCK_C, BLOCK_P)
    b_x = tl.load(p_x + off, mask=m, other=0.0).to(tl.float32)
    count = tl.sum(tl.sum(m.to(tl.float32), axis=1), axis=0)
    b_sum = tl.sum(tl.sum(b_x, axis=1), axis=0)
    b_d = tl.where(m, b_x - b_sum / count, 0.0)
    part = bg * tl.num_programs(1) + i_p
    tl.store(p_sum + part, b_sum)
    tl.store(p_m2 + part, tl.sum(tl.sum(b_d * b_d, axis=1), axis=0))


@triton.jit
def _fwd_kernel(p_x, p_y, p_mean, p_a, p_c, C, P, s_b, s_c, s_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, i_c, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off, m, o_c = _tile(b, i_c * BLOCK_C, i_p, C, P, s_b, s_c, s_p, BLOCK_C, BLOCK_P)
    m_c = o_c < C
    coef = b * C + o_c
    b_z = _film(tl.load(p_x + off, mask=m, other=0.0).to(tl.float32), tl.load(p_mean + coef, mask=m_c, other=0.0),
                tl.load(p_a + coef, mask=m_c, other=0.0), tl.load(p_c + coef, mask=m_c, other=0.0))
    tl.store(p_y + off, (b_z * tl.sigmoid(b_z)).to(p_y.dtype.element_ty), mask=m)


@triton.jit
def _dz(p_dy, p_x, off, m, coef, m_c, p_mean, p_rstd, p_a, p_c):
    """(dL/dz, xhat) of a tile: SiLU's derivative sigma(z) (1 + z (1 - sigma(z))) at the recomputed z."""
    b_x = tl.load(p_x + off, mask=m, other=0.0).to(tl.float32)
    b_mean = tl.load(p_mean + coef, mask=m_c, other=0.0)
    b_z = _film(b_x, b_mean, tl.load(p_a + coef, mask=m_c, other=0.0), tl.load(p_c + coef, mask=m_c, other=0.0))
    b_sig = tl.sigmoid(b_z)
    b_dz = tl.load(p_dy + off, mask=m, other=0.0).to(tl.float32) * b_sig * (1.0 + b_z * (1.0 - b_sig))
    b_xhat = (b_x - b_mean[:, None]) * tl.load(p_rstd + coef, mask=m_c, other=0.0)[:, None]
    return tl.where(m, b_dz, 0.0), tl.where(m, b_xhat, 0.0)


@triton.jit
def _sums_kernel(p_dy, p_x, p_mean, p_rstd, p_a, p_c, p_s1, p_s2, C, P, s_b, s_c, s_p,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, i_c, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off, m, o_c = _tile(b, i_c * BLOCK_C, i_p, C, P, s_b, s_c, s_p, BLOCK_C, BLOCK_P)
    m_c = o_c < C
    b_dz, b_xhat = _dz(p_dy, p_x, off, m, b * C + o_c, m_c, p_mean, p_rstd, p_a, p_c)
    part = (i_p * tl.num_programs(0) + b) * C + o_c  # [tiles, B, C]
    tl.store(p_s1 + part, tl.sum(b_dz, axis=1), mask=m_c)
    tl.store(p_s2 + part, tl.sum(b_dz * b_xhat, axis=1), mask=m_c)


@triton.jit
def _dx_kernel(p_dy, p_x, p_mean, p_rstd, p_a, p_c, p_k, p_m1, p_m2, p_dx, C, P, s_b, s_c, s_p,
               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, i_c, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off, m, o_c = _tile(b, i_c * BLOCK_C, i_p, C, P, s_b, s_c, s_p, BLOCK_C, BLOCK_P)
    m_c = o_c < C
    coef = b * C + o_c
    b_dz, b_xhat = _dz(p_dy, p_x, off, m, coef, m_c, p_mean, p_rstd, p_a, p_c)
    b_k = tl.load(p_k + coef, mask=m_c, other=0.0)
    b_m1 = tl.load(p_m1 + coef, mask=m_c, other=0.0)
    b_m2 = tl.load(p_m2 + coef, mask=m_c, other=0.0)
    b_rstd = tl.load(p_rstd + coef, mask=m_c, other=0.0)
    b_dx = (b_dz * b_k[:, None] - b_m1[:, None] - b_xhat * b_m2[:, None]) * b_rstd[:, None]
    tl.store(p_dx + off, b_dx.to(p_dx.dtype.element_ty), mask=m)


def _per_channel(stat: torch.Tensor, cpg: int) -> torch.Tensor:
    """[B, G] -> [B, C]."""
    return stat.repeat_interleave(cpg, dim=1).contiguous()


def _coefficients(weight, bias, scale, shift, mean, rstd, cpg):
    """float32 [B, C]: the group mean, rstd, a and c of ``_film`` and the FiLM factor scale + 1."""
    mean_c, rstd_c = _per_channel(mean, cpg), _per_channel(rstd, cpg)
    w, bias = weight.float(), bias.float()
    film = torch.ones_like(mean_c) if scale is None else scale.reshape(mean_c.shape).float() + 1
    c = bias * film + (0.0 if shift is None else shift.reshape(mean_c.shape).float())
    return mean_c, rstd_c, (rstd_c * w * film).contiguous(), c.contiguous(), film


def _launch(kernel, x, pixels, strides, blocks, *args):
    block_c, block_p = blocks
    grid = (x.shape[0], triton.cdiv(x.shape[1], block_c), triton.cdiv(pixels, block_p))
    torch.library.wrap_triton(kernel)[grid](*args, x.shape[1], pixels, *strides, BLOCK_C=block_c, BLOCK_P=block_p,
                                            **FP_FUSION)


def group_norm_film_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: Optional[torch.Tensor],
                             shift: Optional[torch.Tensor], groups: int,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, C, H, W]; weight, bias [C]; scale, shift [B, C] or None -> (y like x, mean and rstd
    float32 [B, groups])."""
    x, pixels, strides = bcp(x)
    b, c = x.shape[:2]
    cpg = c // groups
    block_c, block_p = _blocks(cpg, pixels, max_c=BLOCK)  # a group's channels in one tile
    tiles = triton.cdiv(pixels, block_p) if x.numel() else 0
    sums = x.new_empty((b * groups, tiles), dtype=torch.float32)
    m2 = torch.empty_like(sums)
    if x.numel():
        torch.library.wrap_triton(_stats_kernel)[(b * groups, tiles)](x, sums, m2, c, pixels, groups, *strides,
                                                                      CPG=cpg, BLOCK_C=block_c, BLOCK_P=block_p,
                                                                      **FP_FUSION)
    counts = (torch.arange(tiles, device=x.device) * -block_p + pixels).clamp(max=block_p) * cpg  # per tile
    total = max(pixels * cpg, 1)
    mean = sums.sum(dim=1) / total
    var = (m2.sum(dim=1) + (counts * (sums / counts - mean[:, None]).square()).sum(dim=1)) / total
    mean, rstd = mean.reshape(b, groups), (var + eps).rsqrt().reshape(b, groups)
    mean_c, _, a, c_, _ = _coefficients(weight, bias, scale, shift, mean, rstd, cpg)
    y = like(x)
    if x.numel():
        _launch(_fwd_kernel, x, pixels, strides, _blocks(c, pixels), x, y, mean_c, a, c_)
    return y, mean, rstd


def group_norm_film_silu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: torch.Tensor,
                             rstd: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    """-> (dx like x, dweight [C], dbias [C], dscale [B, C], dshift [B, C]); without FiLM the last
    two are those of scale = shift = 0, which the caller drops."""
    x, pixels, strides = bcp(x)
    dy = bcp_like(dy, strides)
    b, c = x.shape[:2]
    cpg = c // groups
    mean_c, rstd_c, a, c_, film = _coefficients(weight, bias, scale, shift, mean, rstd, cpg)
    blocks = _blocks(c, pixels)
    tiles = triton.cdiv(pixels, blocks[1]) if x.numel() else 0
    s1 = x.new_empty((tiles, b, c), dtype=torch.float32)
    s2 = torch.empty_like(s1)
    if x.numel():
        _launch(_sums_kernel, x, pixels, strides, blocks, dy, x, mean_c, rstd_c, a, c_, s1, s2)
    s1, s2 = s1.sum(dim=0), s2.sum(dim=0)  # [B, C]: sum of dz, of dz * xhat
    w = weight.float()
    k = (film * w).contiguous()  # dL/dxhat = dz * k
    n = max(pixels * cpg, 1)
    m1 = _per_channel((k * s1).reshape(b, groups, cpg).sum(dim=2) / n, cpg)
    m2 = _per_channel((k * s2).reshape(b, groups, cpg).sum(dim=2) / n, cpg)
    dx = like(x)
    if x.numel():
        _launch(_dx_kernel, x, pixels, strides, blocks, dy, x, mean_c, rstd_c, a, c_, k, m1, m2, dx)
    dweight, dbias = ((film * s).sum(dim=0).to(weight.dtype) for s in (s2, s1))
    dscale, dshift = ((w * s2 + bias.float() * s1).to(x.dtype), s1.to(x.dtype))
    return dx, dweight, dbias, dscale, dshift
