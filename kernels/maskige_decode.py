"""Triton maskige_decode: the nearest palette row of each maskige pixel (see csrc/maskige_decode/maskige_decode.h)."""
import torch
import triton
import triton.language as tl

from ._common import argmax_step

BLOCK = 256


@triton.jit
def _negated_distance(x0, x1, x2, p_colour):
    """-((x - colour)^2).sum() rounded as (d0^2 + d1^2) + d2^2, as ddps::negated_distance."""
    d0 = x0 - tl.load(p_colour)
    d1 = x1 - tl.load(p_colour + 1)
    d2 = x2 - tl.load(p_colour + 2)
    return -(d0 * d0 + d1 * d1 + d2 * d2)


@triton.jit
def _maskige_decode_fwd_kernel(p_maskige, p_palette, p_out, n, plane, rows, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] pixel (= output) indices
    m_n = o_n < n
    p_pixel = p_maskige + o_n + (o_n // plane) * 2 * plane  # channel 0 of each pixel
    b_x0 = tl.load(p_pixel, mask=m_n, other=0.0).to(tl.float32)
    b_x1 = tl.load(p_pixel + plane, mask=m_n, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_pixel + 2 * plane, mask=m_n, other=0.0).to(tl.float32)
    b_best = _negated_distance(b_x0, b_x1, b_x2, p_palette)
    b_arg = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(1, rows):
        b_best, b_arg = argmax_step(_negated_distance(b_x0, b_x1, b_x2, p_palette + 3 * k), k, b_best, b_arg)
    tl.store(p_out + o_n, b_arg.to(tl.int64), mask=m_n)


def maskige_decode_fwd(maskige: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """maskige [B, 3, *] (contiguous), palette float32 [rows, 3] (contiguous) -> int64 [B, *]."""
    out = torch.empty((maskige.shape[0], *maskige.shape[2:]), dtype=torch.int64, device=maskige.device)
    n = out.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        torch.library.wrap_triton(_maskige_decode_fwd_kernel)[grid](
            maskige, palette, out, n, n // out.shape[0], palette.shape[0], BLOCK=BLOCK,
            enable_fp_fusion=False)  # the distances round as the CPU and CUDA builds round them
    return out
