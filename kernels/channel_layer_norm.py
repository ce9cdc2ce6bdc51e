"""Triton channel_layer_norm: LayerNorm over the channels of [B, C, *spatial], gain only. One
program normalises a tile of pixels with all their channels in registers (one pass over x); the
backward reads x and dy once and writes dx and per-tile partial sums of dg, summed in a fixed order
(deterministic)."""
import torch
import triton
import triton.language as tl

from ._layout import FP_FUSION, bcp, bcp_like, like


def _blocks(c: int, pixels: int):
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, min(triton.next_power_of_2(max(pixels, 1)), 4096 // block_c))


@triton.jit
def _tile(b, i_p, C, P, s_b, s_c, s_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_P] of pixel tile i_p of sample b, their mask, and the pixel indices."""
    o_c = tl.arange(0, BLOCK_C)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (o_c[:, None] < C) & (o_p[None, :] < P)
    return b.to(tl.int64) * s_b + o_c[:, None] * s_c + o_p[None, :].to(tl.int64) * s_p, m, o_c, o_p


@triton.jit
def _fwd_kernel(p_x, p_g, p_y, p_mean, p_rstd, C, P, s_b, s_c, s_p, eps,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, i_p = tl.program_id(0), tl.program_id(1)
    off, m, o_c, o_p = _tile(b, i_p, C, P, s_b, s_c, s_p, BLOCK_C, BLOCK_P)
    b_x = tl.load(p_x + off, mask=m, other=0.0).to(tl.float32)
    b_mean = tl.sum(b_x, axis=0) / C
    b_xc = tl.where(m, b_x - b_mean[None, :], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=0) / C + eps)
    b_g = tl.load(p_g + o_c, mask=o_c < C, other=0.0).to(tl.float32)
    tl.store(p_y + off, (b_xc * b_rstd[None, :] * b_g[:, None]).to(p_y.dtype.element_ty), mask=m)
    m_p = o_p < P
    tl.store(p_mean + b * P + o_p, b_mean, mask=m_p)
    tl.store(p_rstd + b * P + o_p, b_rstd, mask=m_p)


@triton.jit
def _bwd_kernel(p_dy, p_x, p_g, p_mean, p_rstd, p_dx, p_dg_part, C, P, s_b, s_c, s_p,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, i_p = tl.program_id(0), tl.program_id(1)
    off, m, o_c, o_p = _tile(b, i_p, C, P, s_b, s_c, s_p, BLOCK_C, BLOCK_P)
    m_p = o_p < P
    b_mean = tl.load(p_mean + b * P + o_p, mask=m_p, other=0.0)
    b_rstd = tl.load(p_rstd + b * P + o_p, mask=m_p, other=0.0)
    b_xhat = tl.where(m, (tl.load(p_x + off, mask=m, other=0.0).to(tl.float32) - b_mean[None, :]) * b_rstd[None, :],
                      0.0)
    b_dy = tl.load(p_dy + off, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(p_g + o_c, mask=o_c < C, other=0.0).to(tl.float32)
    b_gdy = b_dy * b_g[:, None]
    b_c1 = tl.sum(b_gdy * b_xhat, axis=0) / C
    b_c2 = tl.sum(b_gdy, axis=0) / C
    b_dx = (b_gdy - b_xhat * b_c1[None, :] - b_c2[None, :]) * b_rstd[None, :]
    tl.store(p_dx + off, b_dx.to(p_dx.dtype.element_ty), mask=m)
    part = b * tl.num_programs(1) + i_p
    tl.store(p_dg_part + part * C + o_c, tl.sum(b_dy * b_xhat, axis=1), mask=o_c < C)


def channel_layer_norm_fwd(x: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, C, *spatial], g [C] -> (y like x, mean and rstd float32 [B, pixels])."""
    x, pixels, strides = bcp(x)
    y = like(x)
    mean = x.new_empty((x.shape[0], pixels), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel():
        block_c, block_p = _blocks(x.shape[1], pixels)
        grid = (x.shape[0], triton.cdiv(pixels, block_p))
        torch.library.wrap_triton(_fwd_kernel)[grid](x, g, y, mean, rstd, x.shape[1], pixels, *strides, eps,
                                                     BLOCK_C=block_c, BLOCK_P=block_p, **FP_FUSION)
    return y, mean, rstd


def channel_layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x, dg [C])."""
    x, pixels, strides = bcp(x)
    dy = bcp_like(dy, strides)
    dx = like(x)
    block_c, block_p = _blocks(x.shape[1], pixels)
    tiles = triton.cdiv(pixels, block_p)
    dg_part = x.new_zeros((x.shape[0] * tiles, x.shape[1]), dtype=torch.float32)
    if x.numel():
        torch.library.wrap_triton(_bwd_kernel)[(x.shape[0], tiles)](dy, x, g, mean, rstd, dx, dg_part, x.shape[1],
                                                                     pixels, *strides, BLOCK_C=block_c,
                                                                     BLOCK_P=block_p, **FP_FUSION)
    return dx, dg_part.sum(dim=0).to(g.dtype)
