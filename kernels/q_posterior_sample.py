"""Triton q_posterior_sample: x_{t-1} ~ q(x_{t-1} | x_t, x0) per label (see
csrc/q_posterior_sample/q_posterior_sample.h)."""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import element_words, uniform_below, word

BLOCK = 1024


@triton.jit(do_not_specialize=["seed"])
def _q_posterior_sample_fwd_kernel(p_x0, p_xt, p_out, p_t, p_table, n, plane, seed, num_classes, mask_index,
                                   ignore_index, HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_n = o_n < n
    b_x0 = tl.load(p_x0 + o_n, mask=m_n, other=0).to(tl.int64)
    b_xt = tl.load(p_xt + o_n, mask=m_n, other=0).to(tl.int64)
    b_level = tl.load(p_t + o_n // plane, mask=m_n, other=0)
    b_case = tl.where(b_xt == mask_index, 2, tl.where(b_xt == b_x0, 0, 1))
    o_row = 6 * b_level + 2 * b_case
    b_to_xt = tl.load(p_table + o_row, mask=m_n, other=0)
    b_to_x0 = tl.load(p_table + o_row + 1, mask=m_n, other=0)
    w0, w1 = element_words(seed, o_n)
    differ = b_case == 1
    b_lo = tl.where(differ & (b_xt < b_x0), b_xt, b_x0)
    b_hi = tl.where(differ & (b_xt > b_x0), b_xt, b_x0)
    b_others = num_classes - tl.where(differ, 2, 1)
    b_idx = uniform_below(w1, tl.maximum(b_others, 1))
    b_idx = tl.where(b_idx >= b_lo, b_idx + 1, b_idx)
    b_idx = tl.where((b_hi != b_lo) & (b_idx >= b_hi), b_idx + 1, b_idx)
    b_idx = tl.where(b_others == 0, b_x0, b_idx)
    b_out = tl.where(word(w0) < b_to_xt, b_xt, tl.where(word(w0) < b_to_x0, b_x0, b_idx))
    if HAS_IGNORE:
        b_out = tl.where((b_xt == ignore_index) | (b_x0 == ignore_index), b_xt, b_out)
    tl.store(p_out + o_n, b_out.to(p_out.dtype.element_ty), mask=m_n)


def q_posterior_sample_fwd(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor, seed: torch.Tensor,
                           num_classes: int, mask_index: int, ignore_index: Optional[int]) -> torch.Tensor:
    """x0, x_t [B, *] labels (contiguous), t int64 [B], seed CPU int64 scalar (the Philox key), table int64 [T, 3, 2] -> labels like x_t."""
    out = torch.empty_like(x_t)
    n = x_t.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        torch.library.wrap_triton(_q_posterior_sample_fwd_kernel)[grid](x0, x_t, out, t, table, n, n // x_t.shape[0], int(seed), num_classes,
                                             mask_index, 0 if ignore_index is None else ignore_index,
                                             HAS_IGNORE=ignore_index is not None, BLOCK=BLOCK,
            enable_fp_fusion=False)  # same bits as the CPU and CUDA builds (kernels/_common.py)
    return out
