"""Triton renoise: q_sample(argmax(logits)) in one pass over the logits (see csrc/renoise/renoise.h)."""

import torch
import triton
import triton.language as tl

from ._common import argmax_step, element_words, q_sample_label

BLOCK = 256


@triton.jit(do_not_specialize=["seed"])
def _renoise_fwd_kernel(p_logits, p_out, p_t, p_table, n, plane, seed, num_classes, mask_index,
                        BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] pixel (= label) indices
    m_n = o_n < n
    b_b = o_n // plane
    p_pixel = p_logits + o_n + b_b * (num_classes - 1) * plane  # class-0 logit of each pixel
    b_best = tl.load(p_pixel, mask=m_n, other=0.0).to(tl.float32)
    b_arg = tl.zeros([BLOCK], dtype=tl.int64)
    # Class by class, in order: ties keep the lowest class and the first NaN wins, as torch.argmax.
    for k in range(1, num_classes):
        b_v = tl.load(p_pixel + k * plane, mask=m_n, other=0.0).to(tl.float32)
        b_best, b_arg = argmax_step(b_v, k, b_best, b_arg)
    b_level = tl.load(p_t + b_b, mask=m_n, other=0)
    b_keep = tl.load(p_table + 2 * b_level, mask=m_n, other=0)
    b_keep_or_mask = tl.load(p_table + 2 * b_level + 1, mask=m_n, other=0)
    w0, w1 = element_words(seed, o_n)
    b_out = q_sample_label(b_arg, b_keep, b_keep_or_mask, w0, w1, num_classes, mask_index)
    tl.store(p_out + o_n, b_out, mask=m_n)


def renoise_fwd(logits: torch.Tensor, t: torch.Tensor, table: torch.Tensor, seed: torch.Tensor, num_classes: int,
                mask_index: int) -> torch.Tensor:
    """logits [B, K, *] (contiguous), t int64 [B], seed CPU int64 scalar (the Philox key), table int64 [T + 1, 2] -> int64 labels [B, *]."""
    out = torch.empty((logits.shape[0], *logits.shape[2:]), dtype=torch.int64, device=logits.device)
    n = out.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        torch.library.wrap_triton(_renoise_fwd_kernel)[grid](logits, out, t, table, n, n // out.shape[0], int(seed), num_classes, mask_index,
                                  BLOCK=BLOCK,
            enable_fp_fusion=False)  # same bits as the CPU and CUDA builds (kernels/_common.py)
    return out
