"""Triton q_sample: x_t ~ q(x_t | x_0) per label (see csrc/q_sample/q_sample.h)."""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import element_words, q_sample_label

BLOCK = 1024


@triton.jit(do_not_specialize=["seed"])
def _q_sample_fwd_kernel(p_x0, p_out, p_t, p_table, n, plane, seed, num_classes, mask_index, ignore_index,
                         HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] 64-bit element indices
    m_n = o_n < n
    b_x0 = tl.load(p_x0 + o_n, mask=m_n, other=0).to(tl.int64)
    b_level = tl.load(p_t + o_n // plane, mask=m_n, other=0)
    b_keep = tl.load(p_table + 2 * b_level, mask=m_n, other=0)
    b_keep_or_mask = tl.load(p_table + 2 * b_level + 1, mask=m_n, other=0)
    w0, w1 = element_words(seed, o_n)
    b_out = q_sample_label(b_x0, b_keep, b_keep_or_mask, w0, w1, num_classes, mask_index)
    if HAS_IGNORE:
        b_out = tl.where(b_x0 == ignore_index, b_x0, b_out)
    tl.store(p_out + o_n, b_out.to(p_out.dtype.element_ty), mask=m_n)


def q_sample_fwd(x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor, seed: torch.Tensor, num_classes: int,
                 mask_index: int, ignore_index: Optional[int]) -> torch.Tensor:
    """x0 [B, *] labels (contiguous), t int64 [B], seed CPU int64 scalar (the Philox key), table int64 [T + 1, 2] -> labels like x0."""
    out = torch.empty_like(x0)
    n = x0.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        torch.library.wrap_triton(_q_sample_fwd_kernel)[grid](x0, out, t, table, n, n // x0.shape[0], int(seed), num_classes, mask_index,
                                   0 if ignore_index is None else ignore_index,
                                   HAS_IGNORE=ignore_index is not None, BLOCK=BLOCK,
            enable_fp_fusion=False)  # same bits as the CPU and CUDA builds (kernels/_common.py)
    return out
