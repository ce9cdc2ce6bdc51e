"""Triton linear_attention (the original LinearAttention core, SPEC §4), computed in float32.

Forward: the d x d context k_softmax v^T / N in one streaming pass over the tokens with a running
max and sum per channel of k (the token range split over programs, the partial contexts merged in
a fixed order), then one pass that applies it to q's per-token softmax. Backward: one streaming
pass for d(context), one per-token pass for dq, dk and dv; the softmax over tokens needs only the
row sums R = sum_e d(context) * context, which are d x d work."""
import torch
import triton
import triton.language as tl

from ._layout import FP_FUSION, as_heads_like, block_d, heads_like, shared_strides

TOKENS_PER_SPLIT = 1024  # the token passes' share of one program, merged in a fixed order


def _config(d: int) -> dict:
    """Token tile and launch options, chosen with `make gpu-compile-check` (ptxas' report for
    sm_80, sm_86 and sm_90): no register spills and little shared memory for heads up to 64 wide.
    The d x d context and the tiles' products live in registers, so wider heads get fewer tokens
    per tile; 128-token tiles spilled 4-100 KB per thread at d = 64 and asked for up to 320 KB of
    shared memory. No software pipelining (its stages in flight hold their tiles in registers)."""
    block_n = 64 if block_d(d) <= 32 else 16
    return dict(BLOCK_D=block_d(d), BLOCK_N=block_n, num_warps=8, num_stages=1, **FP_FUSION)


@triton.jit
def _tile(p, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n):
    """A [d, tokens] tile of head bh as float32 (0 outside), and its mask."""
    m = (o_d[:, None] < D) & (o_n[None, :] < N)
    base = p + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h
    return tl.load(base + o_d[:, None] * s_d + o_n[None, :].to(tl.int64) * s_n, mask=m, other=0.0).to(tl.float32), m


@triton.jit
def _store(p, value, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n):
    base = p + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h
    tl.store(base + o_d[:, None] * s_d + o_n[None, :].to(tl.int64) * s_n, value.to(p.dtype.element_ty),
             mask=(o_d[:, None] < D) & (o_n[None, :] < N))


@triton.jit
def _q_softmax(b_q, o_d, D):
    """Softmax over d (the rows) of each token."""
    b_q = tl.where(o_d[:, None] < D, b_q, float("-inf"))
    b_e = tl.exp(b_q - tl.max(b_q, axis=0)[None, :])
    return b_e / tl.sum(b_e, axis=0)[None, :]


@triton.jit
def _square(p, bh, o_d, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """A [BLOCK_D, BLOCK_D] float32 matrix of head bh (row-major), or its transpose."""
    base = p + bh.to(tl.int64) * BLOCK_D * BLOCK_D
    if TRANSPOSE:
        return tl.load(base + o_d[None, :] * BLOCK_D + o_d[:, None])
    return tl.load(base + o_d[:, None] * BLOCK_D + o_d[None, :])


@triton.jit
def _context_kernel(p_k, p_v, p_max, p_sum, p_ctx, H, N, D, s_b, s_h, s_d, s_n,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr):
    bh, i_s = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BLOCK_D)
    b_max = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_ctx = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    first = i_s * BLOCKS_PER_SPLIT * BLOCK_N
    for start in range(first, tl.minimum(first + BLOCKS_PER_SPLIT * BLOCK_N, N), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        b_k, _ = _tile(p_k, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
        # Padded channel rows stay finite (k = 0 there): they only ever meet zeros later.
        b_k = tl.where(o_n[None, :] < N, b_k, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_k, axis=1))
        b_p = tl.exp(b_k - b_new[:, None])
        b_alpha = tl.exp(b_max - b_new)
        b_sum = b_sum * b_alpha + tl.sum(b_p, axis=1)
        b_v, _ = _tile(p_v, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
        b_ctx = b_ctx * b_alpha[:, None] + tl.dot(b_p, tl.trans(b_v), input_precision="ieee")
        b_max = b_new
    part = bh * tl.num_programs(1) + i_s
    tl.store(p_max + part * BLOCK_D + o_d, b_max)
    tl.store(p_sum + part * BLOCK_D + o_d, b_sum)
    tl.store(p_ctx + part.to(tl.int64) * BLOCK_D * BLOCK_D + o_d[:, None] * BLOCK_D + o_d[None, :], b_ctx)


@triton.jit
def _out_kernel(p_q, p_ctx, p_o, H, N, D, scale, s_b, s_h, s_d, s_n, so_b, so_h, so_d, so_n,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    i_n, bh = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BLOCK_D)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_q, _ = _tile(p_q, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
    b_ctx_t = _square(p_ctx, bh, o_d, BLOCK_D, True)  # [e, d]
    b_o = tl.dot(b_ctx_t, _q_softmax(b_q, o_d, D), input_precision="ieee") * scale
    _store(p_o, b_o, bh, H, o_d, o_n, N, D, so_b, so_h, so_d, so_n)


@triton.jit
def _dcontext_kernel(p_q, p_do, p_dctx, H, N, D, s_b, s_h, s_d, s_n, so_b, so_h, so_d, so_n,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr):
    bh, i_s = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BLOCK_D)
    b_acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    first = i_s * BLOCKS_PER_SPLIT * BLOCK_N
    for start in range(first, tl.minimum(first + BLOCKS_PER_SPLIT * BLOCK_N, N), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        b_q, m = _tile(p_q, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
        b_qs = tl.where(m, _q_softmax(b_q, o_d, D), 0.0)
        b_do, _ = _tile(p_do, bh, H, o_d, o_n, N, D, so_b, so_h, so_d, so_n)
        b_acc += tl.dot(b_qs, tl.trans(b_do), input_precision="ieee")
    part = bh * tl.num_programs(1) + i_s
    tl.store(p_dctx + part.to(tl.int64) * BLOCK_D * BLOCK_D + o_d[:, None] * BLOCK_D + o_d[None, :], b_acc)


@triton.jit
def _bwd_kernel(p_q, p_k, p_v, p_do, p_ctx, p_dctx, p_lse, p_rows, p_dq, p_dk, p_dv, H, N, D, scale,
                s_b, s_h, s_d, s_n, so_b, so_h, so_d, so_n, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    i_n, bh = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BLOCK_D)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_q, m = _tile(p_q, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
    b_do, _ = _tile(p_do, bh, H, o_d, o_n, N, D, so_b, so_h, so_d, so_n)
    b_dctx = _square(p_dctx, bh, o_d, BLOCK_D, False)  # [d, e], scale included
    # q: out = scale * context^T softmax_d(q)
    b_qs = _q_softmax(b_q, o_d, D)
    b_dqs = tl.dot(_square(p_ctx, bh, o_d, BLOCK_D, False), b_do, input_precision="ieee") * scale
    _store(p_dq, b_qs * (b_dqs - tl.sum(b_qs * b_dqs, axis=0)[None, :]), bh, H, o_d, o_n, N, D,
           so_b, so_h, so_d, so_n)
    # k, v: context = softmax_tokens(k) v^T / N
    b_k, _ = _tile(p_k, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
    b_ks = tl.where(m, tl.exp(b_k - tl.load(p_lse + bh * BLOCK_D + o_d)[:, None]), 0.0)
    b_v, _ = _tile(p_v, bh, H, o_d, o_n, N, D, s_b, s_h, s_d, s_n)
    b_dks = tl.dot(b_dctx, b_v, input_precision="ieee") / N
    _store(p_dk, b_ks * (b_dks - tl.load(p_rows + bh * BLOCK_D + o_d)[:, None]), bh, H, o_d, o_n, N, D,
           so_b, so_h, so_d, so_n)
    _store(p_dv, tl.dot(tl.trans(b_dctx), b_ks, input_precision="ieee") / N, bh, H, o_d, o_n, N, D,
           so_b, so_h, so_d, so_n)


def _layout(q, k, v):
    """The three with one set of strides, the split count of the token passes, the config."""
    splits = max(1, triton.cdiv(q.shape[-1], TOKENS_PER_SPLIT))
    return *shared_strides(q, k, v), splits, _config(q.shape[2])


def linear_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, heads, d, N] -> (out [B, heads * d, N], token-major when q is; context float32
    [B * heads, D, D] (softmax_tokens(k) v^T / N, padded to D = BLOCK_D); lse float32 [B * heads, D]:
    the log-sum-exp over tokens of each channel of k)."""
    q, k, v, splits, config = _layout(q, k, v)
    b, h, d, n = q.shape
    block_d = config["BLOCK_D"]
    out = heads_like(q)
    maxes = q.new_empty((b * h, splits, block_d), dtype=torch.float32)
    sums = torch.empty_like(maxes)
    parts = q.new_empty((b * h, splits, block_d, block_d), dtype=torch.float32)
    if q.numel():
        torch.library.wrap_triton(_context_kernel)[(b * h, splits)](
            k, v, maxes, sums, parts, h, n, d, *q.stride(), BLOCKS_PER_SPLIT=TOKENS_PER_SPLIT // config["BLOCK_N"],
            **config)
    top = maxes.amax(dim=1, keepdim=True)
    weights = (maxes - top).exp()
    total = (sums * weights).sum(dim=1)  # [B * heads, D]
    context = ((parts * weights[..., None]).sum(dim=1) / (total[..., None] * max(n, 1))).contiguous()
    lse = top.squeeze(1) + total.log()
    if q.numel():
        torch.library.wrap_triton(_out_kernel)[(triton.cdiv(n, config["BLOCK_N"]), b * h)](
            q, context, out, h, n, d, scale, *q.stride(), *out.stride(), **config)
    return out.reshape(b, h * d, n), context, lse


def linear_attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         context: torch.Tensor, lse: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each [B, heads, d, N] laid out as the forward's output."""
    q, k, v, splits, config = _layout(q, k, v)
    b, h, d, n = q.shape
    block_d = config["BLOCK_D"]
    dq, dk, dv = heads_like(q), heads_like(q), heads_like(q)
    grad = as_heads_like(grad, q)
    parts = q.new_empty((b * h, splits, block_d, block_d), dtype=torch.float32)
    if q.numel():
        torch.library.wrap_triton(_dcontext_kernel)[(b * h, splits)](
            q, grad, parts, h, n, d, *q.stride(), *grad.stride(), BLOCKS_PER_SPLIT=TOKENS_PER_SPLIT // config["BLOCK_N"],
            **config)
    dcontext = (parts.sum(dim=1) * scale).contiguous()
    rows = (dcontext * context).sum(dim=-1).contiguous()
    if q.numel():
        torch.library.wrap_triton(_bwd_kernel)[(triton.cdiv(n, config["BLOCK_N"]), b * h)](
            q, k, v, grad, context, dcontext, lse.contiguous(), rows, dq, dk, dv, h, n, d, scale, *q.stride(),
            *grad.stride(), **config)
    return dq, dk, dv
