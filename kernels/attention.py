"""Triton attention: flash-style softmax attention over q, k, v [B, heads, d, N] in the layout of
the qkv convolution (any strides shared by the three), with an online softmax over key blocks:
no N x N matrix in memory. The backward recomputes the probabilities from the saved log-sum-exp:
one kernel accumulates dk and dv per key block, one dq per query block (no atomics: the same
inputs give the same bits). Softmax statistics and accumulators are float32, float64 for float64
inputs (the dtype of the saved log-sum-exp)."""
import os

import torch
import triton
import triton.language as tl

from ._layout import FP_FUSION, accumulator, as_heads_like, block_d, heads_like, shared_strides


def _config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options, chosen with `make gpu-compile-check` (ptxas' report for
    sm_80, sm_86 and sm_90): no register spills, and at most 99 KB of shared memory per block (the
    smallest per-block limit of the three), for every head width up to 128. Products on the CUDA
    cores (float32 without TF32, float64) run without software pipelining, whose stages in flight
    kept every operand in registers too: the backward spilled 13-60 KB per thread with it."""
    config = dict(BLOCK_D=block_d(d), PRECISION=_precision(dtype), **FP_FUSION)
    if config["PRECISION"] == "ieee" and (dtype == torch.float64 or block_d(d) >= 64):
        return dict(config, BLOCK_M=16, BLOCK_N=16, num_warps=8 if block_d(d) <= 64 else 4, num_stages=1)
    if config["PRECISION"] == "ieee":
        return dict(config, BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
    return dict(config, BLOCK_M=32, BLOCK_N=32, num_warps=4 if block_d(d) <= 64 else 8)


@triton.jit
def _rows(p, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n):
    """Pointers and mask of a [tokens, d] tile of head bh (tokens o_n, channels o_d)."""
    base = p + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h
    return base + o_n[:, None].to(tl.int64) * s_n + o_d[None, :] * s_d, (o_n[:, None] < N) & (o_d[None, :] < D)


@triton.jit
def _load(p, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n):
    ptr, m = _rows(p, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n)
    return tl.load(ptr, mask=m, other=0.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        # Triton's interpreter multiplies bfloat16 operands as their uint16 bit patterns; in
        # float32 the products are the same (exact) and so is the float32 accumulation.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(b_q, b_k, o_n, N, scale, PRECISION: tl.constexpr):
    """scale * q k^T for a [queries, keys] block, -inf at keys past N."""
    s = _dot(b_q, tl.trans(b_k), PRECISION) * scale
    return tl.where(o_n[None, :] < N, s, float("-inf"))


@triton.jit
def _fwd_kernel(p_q, p_k, p_v, p_o, p_lse, H, N, D, scale, s_b, s_h, s_d, s_n, so_b, so_h, so_d, so_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    i_m, bh = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    b_q = _load(p_q, bh, H, o_m, o_d, N, D, s_b, s_h, s_d, s_n)
    acc = p_lse.dtype.element_ty
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=acc)
    b_sum = tl.zeros([BLOCK_M], dtype=acc)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc)
    for start in range(0, N, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        b_s = _scores(b_q, _load(p_k, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n), o_n, N, scale, PRECISION)
        b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
        b_p = tl.exp(b_s - b_new[:, None])
        b_alpha = tl.exp(b_max - b_new)
        b_sum = b_sum * b_alpha + tl.sum(b_p, axis=1)
        b_v = _load(p_v, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, PRECISION)
        b_max = b_new
    ptr_o, m_o = _rows(p_o, bh, H, o_m, o_d, N, D, so_b, so_h, so_d, so_n)
    tl.store(ptr_o, (b_acc / b_sum[:, None]).to(p_o.dtype.element_ty), mask=m_o)
    tl.store(p_lse + bh.to(tl.int64) * N + o_m, b_max + tl.log(b_sum), mask=o_m < N)


@triton.jit
def _block_grads(b_q, b_k, b_v, b_do, p_lse, p_delta, bh, o_m, o_n, N, scale, PRECISION: tl.constexpr):
    """The recomputed probabilities P of a [queries, keys] block and dL/dS = P (dO v^T - rowsum(dO * O))
    (S the scaled scores), from the saved log-sum-exp and rowsum of each query."""
    m_m = o_m < N
    b_lse = tl.load(p_lse + bh.to(tl.int64) * N + o_m, mask=m_m, other=0.0)
    b_p = tl.where(m_m[:, None], tl.exp(_scores(b_q, b_k, o_n, N, scale, PRECISION) - b_lse[:, None]), 0.0)
    b_delta = tl.load(p_delta + bh.to(tl.int64) * N + o_m, mask=m_m, other=0.0)
    return b_p, b_p * (_dot(b_do, tl.trans(b_v), PRECISION) - b_delta[:, None])


@triton.jit
def _bwd_kv_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, H, N, D, scale, s_b, s_h, s_d, s_n,
                   so_b, so_h, so_d, so_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    i_n, bh = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    b_k = _load(p_k, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n)
    b_v = _load(p_v, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=p_lse.dtype.element_ty)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=p_lse.dtype.element_ty)
    for start in range(0, N, BLOCK_M):
        o_m = start + tl.arange(0, BLOCK_M)
        b_q = _load(p_q, bh, H, o_m, o_d, N, D, s_b, s_h, s_d, s_n)
        b_do = _load(p_do, bh, H, o_m, o_d, N, D, so_b, so_h, so_d, so_n)
        b_p, b_ds = _block_grads(b_q, b_k, b_v, b_do, p_lse, p_delta, bh, o_m, o_n, N, scale, PRECISION)
        b_dv += _dot(tl.trans(b_p.to(b_do.dtype)), b_do, PRECISION)
        b_dk += _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, PRECISION)
    ptr_dk, m_k = _rows(p_dk, bh, H, o_n, o_d, N, D, so_b, so_h, so_d, so_n)
    ptr_dv, _ = _rows(p_dv, bh, H, o_n, o_d, N, D, so_b, so_h, so_d, so_n)
    tl.store(ptr_dk, (b_dk * scale).to(p_dk.dtype.element_ty), mask=m_k)
    tl.store(ptr_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_k)


@triton.jit
def _bwd_q_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, H, N, D, scale, s_b, s_h, s_d, s_n,
                  so_b, so_h, so_d, so_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    i_m, bh = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    b_q = _load(p_q, bh, H, o_m, o_d, N, D, s_b, s_h, s_d, s_n)
    b_do = _load(p_do, bh, H, o_m, o_d, N, D, so_b, so_h, so_d, so_n)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=p_lse.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        b_k = _load(p_k, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n)
        b_v = _load(p_v, bh, H, o_n, o_d, N, D, s_b, s_h, s_d, s_n)
        _, b_ds = _block_grads(b_q, b_k, b_v, b_do, p_lse, p_delta, bh, o_m, o_n, N, scale, PRECISION)
        b_dq += _dot(b_ds.to(b_k.dtype), b_k, PRECISION)
    ptr_dq, m_q = _rows(p_dq, bh, H, o_m, o_d, N, D, so_b, so_h, so_d, so_n)
    tl.store(ptr_dq, (b_dq * scale).to(p_dq.dtype.element_ty), mask=m_q)


def _precision(dtype):
    """tl.dot's input precision: float32 products for float32 inputs (the reference's precision)
    unless torch's own matmul TF32 flag allows tensor cores, as it does for torch's matmuls;
    float64 products for float64."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "upcast" if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else "tf32"


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, heads, d, N] -> (out [B, heads * d, N], token-major when q is; lse [B, heads, N],
    float32, float64 for float64 inputs)."""
    q, k, v = shared_strides(q, k, v)
    b, h, d, n = q.shape
    out = heads_like(q)
    lse = q.new_empty((b, h, n), dtype=accumulator(q.dtype))
    if q.numel():
        config = _config(d, q.dtype)
        torch.library.wrap_triton(_fwd_kernel)[(triton.cdiv(n, config["BLOCK_M"]), b * h)](
            q, k, v, out, lse, h, n, d, scale, *q.stride(), *out.stride(), **config)
    return out.reshape(b, h * d, n), lse


def attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each [B, heads, d, N] laid out as the output (and dO, copied into it)."""
    q, k, v = shared_strides(q, k, v)
    b, h, d, n = q.shape
    out = out.reshape(b, h, d, n)  # laid out as heads_like(q), as the kernels assume of grad too
    grad = as_heads_like(grad, q)
    delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(dim=2).contiguous()  # [B, heads, N]
    dq, dk, dv = heads_like(q), heads_like(q), heads_like(q)
    if q.numel():
        args = (q, k, v, grad, lse, delta)
        config = _config(d, q.dtype)
        torch.library.wrap_triton(_bwd_kv_kernel)[(triton.cdiv(n, config["BLOCK_N"]), b * h)](
            *args, dk, dv, h, n, d, scale, *q.stride(), *grad.stride(), **config)
        torch.library.wrap_triton(_bwd_q_kernel)[(triton.cdiv(n, config["BLOCK_M"]), b * h)](
            *args, dq, h, n, d, scale, *q.stride(), *grad.stride(), **config)
    return dq, dk, dv
