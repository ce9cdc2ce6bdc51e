"""Triton p_posterior_sample: x_{t-1} ~ p(x_{t-1} | x_t) with soft x0 = softmax(logits) (see
csrc/p_posterior_sample/p_posterior_sample.h for the mixture). Classes are visited in order in
each pass so the float sums match the compiled kernels bitwise; the later passes re-read a block's
logits from cache."""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import exp_neg, philox4, uniform24, uniform_below

BLOCK = 256


@triton.jit(do_not_specialize=["seed"])
def _p_posterior_sample_fwd_kernel(p_logits, p_xt, p_out, p_t, p_table, n, plane, seed, num_classes, mask_index,
                                   ignore_index, HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] pixel indices
    m_n = o_n < n
    b_b = o_n // plane
    p_pixel = p_logits + o_n + b_b * (num_classes - 1) * plane
    b_xt = tl.load(p_xt + o_n, mask=m_n, other=0).to(tl.int64)
    b_m = tl.load(p_pixel, mask=m_n, other=0.0).to(tl.float32)
    b_bad = b_m != b_m
    for k in range(1, num_classes):
        b_v = tl.load(p_pixel + k * plane, mask=m_n, other=0.0).to(tl.float32)
        b_bad = b_bad | (b_v != b_v)
        b_m = tl.where(b_v > b_m, b_v, b_m)
    b_bad = b_bad | (b_m == float("inf")) | (b_m == -float("inf"))
    b_s = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, num_classes):
        b_v = tl.load(p_pixel + k * plane, mask=m_n, other=0.0).to(tl.float32)
        b_s = b_s + exp_neg(b_v + -b_m)
    is_mask = b_xt == mask_index
    o_w = 8 * tl.load(p_t + b_b, mask=m_n, other=0) + tl.where(is_mask, 4, 0)
    b_w0 = tl.load(p_table + o_w, mask=m_n, other=0.0)
    b_w1 = tl.load(p_table + o_w + 1, mask=m_n, other=0.0)
    b_w2 = tl.load(p_table + o_w + 2, mask=m_n, other=0.0)
    b_w3 = tl.load(p_table + o_w + 3, mask=m_n, other=0.0)
    o_xt = tl.where(is_mask | (b_xt < 0) | (b_xt >= num_classes), 0, b_xt)  # ignored labels: no load past K
    b_lxt = tl.load(p_pixel + o_xt * plane, mask=m_n, other=0.0).to(tl.float32)
    b_ext = tl.where(is_mask, 0.0, exp_neg(b_lxt + -b_m))
    b_keep = b_w0 * b_ext + b_w1 * b_s
    b_keep_or_soft = b_keep + b_w2 * b_s
    b_total = b_keep_or_soft + b_w3 * b_s
    w0, w1, w2, _ = philox4(seed, o_n)
    b_x = uniform24(w0) * b_total
    b_y = uniform24(w1) * b_s
    b_cum = tl.zeros([BLOCK], dtype=tl.float32)
    b_last = tl.zeros([BLOCK], dtype=tl.int64)
    b_pick = tl.full([BLOCK], -1, dtype=tl.int64)
    for k in range(0, num_classes):
        b_v = tl.load(p_pixel + k * plane, mask=m_n, other=0.0).to(tl.float32)
        b_e = exp_neg(b_v + -b_m)
        b_cum = b_cum + b_e
        b_last = tl.where(b_e > 0.0, k, b_last)
        b_pick = tl.where((b_pick < 0) & (b_y < b_cum), k, b_pick)
    b_soft = tl.where(b_pick >= 0, b_pick, b_last)
    b_out = tl.where(b_x < b_keep, b_xt,
                     tl.where(b_x < b_keep_or_soft, b_soft, uniform_below(w2, num_classes)))
    b_out = tl.where(b_bad | ~(b_total > 0.0), b_xt, b_out)
    if HAS_IGNORE:
        b_out = tl.where(b_xt == ignore_index, b_xt, b_out)
    tl.store(p_out + o_n, b_out.to(p_out.dtype.element_ty), mask=m_n)


def p_posterior_sample_fwd(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor, seed: torch.Tensor,
                           num_classes: int, mask_index: int, ignore_index: Optional[int]) -> torch.Tensor:
    """logits [B, K, *], x_t [B, *] (contiguous), t int64 [B], seed CPU int64 scalar (the Philox key), table float32 [T, 2, 4] -> labels like x_t."""
    out = torch.empty_like(x_t)
    n = x_t.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        torch.library.wrap_triton(_p_posterior_sample_fwd_kernel)[grid](logits, x_t, out, t, table, n, n // x_t.shape[0], int(seed), num_classes,
                                             mask_index, 0 if ignore_index is None else ignore_index,
                                             HAS_IGNORE=ignore_index is not None, BLOCK=BLOCK,
            enable_fp_fusion=False)  # same bits as the CPU and CUDA builds (kernels/_common.py)
    return out
