"""Layouts the denoiser's Triton kernels address: activations [B, C, *spatial] as (batch, channel,
pixel) strides, so that one kernel serves the reference's contiguous tensors and the fused UNet's
channels-last ones without a copy."""
import torch


def bcp(x: torch.Tensor):
    """(x or a contiguous copy, pixels, (batch, channel, pixel) strides). Channels-last 4-d tensors
    are taken as they are; anything else that is not contiguous is copied."""
    b, c = x.shape[:2]
    pixels = x[0, 0].numel() if b and c else 0
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x, pixels, (x.stride(0), 1, c)
    x = x.contiguous()
    return x, pixels, (c * pixels, pixels, 1)


def bcp_like(t: torch.Tensor, strides) -> torch.Tensor:
    """t (x's shape) laid out as ``bcp`` took x, whose (batch, channel, pixel) strides are given:
    as it is when it already is, else a copy."""
    # strides[1] == 1 also for contiguous [B, C, 1] (one pixel), which only 4-d tensors can be
    # channels-last for, and as a contiguous one they are laid out the same.
    return t.contiguous(memory_format=torch.channels_last) if strides[1] == 1 and t.dim() == 4 else t.contiguous()


def like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty tensor with x's shape and strides (x as returned by ``bcp``)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype or x.dtype, device=x.device)


def token_major(x: torch.Tensor) -> bool:
    """Whether a [B, heads, d, N] view has its d channels adjacent in memory, as the views of a
    channels-last 1x1 conv's output do (then the ops work on tokens and return that layout)."""
    return x.shape[-2] > 1 and x.stride(-2) == 1 and x.shape[-1] > 1


def heads_like(q: torch.Tensor) -> torch.Tensor:
    """An empty [B, heads, d, N] tensor laid out as q's kind: token-major (d adjacent, as views of
    a channels-last convolution's output) or head-major (N adjacent)."""
    b, h, d, n = q.shape
    if token_major(q):
        return q.new_empty((b, n, h, d)).permute(0, 2, 3, 1)
    return q.new_empty((b, h, d, n))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (one shape) address their elements alike. Strides of size-1 dimensions do
    not count (only index 0 multiplies them): a one-sample batch's gradient often comes with another
    batch stride than the forward's tensors, and copying it for that measured 2 % of a module's
    backward."""
    return all(x == y for x, y, size in zip(a.stride(), b.stride(), a.shape) if size > 1)


def as_heads_like(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """t ([B, heads * d, N] or [B, heads, d, N]) as [B, heads, d, N] laid out as ``heads_like(q)``
    (the attention kernels' output and gradient layout): a view when it already is, else a copy."""
    target = heads_like(q)
    t = t.reshape(q.shape)
    return t if same_layout(t, target) else target.copy_(t)


def shared_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v with one layout, which the kernels take once: as they are when they share one (views
    of one qkv tensor), else copies laid out as ``heads_like(q)``."""
    if same_layout(q, k) and same_layout(q, v):
        return q, k, v
    return tuple(heads_like(q).copy_(x) for x in (q, k, v))


# Launch options of every denoiser kernel. Triton 3.9 warns that 3.10 stops fusing multiply-adds by
# default; these kernels promise results within float rounding of the reference (not bits, unlike
# the samplers), so they keep the fused ones whatever the version.
FP_FUSION = dict(enable_fp_fusion=True)

# The widest head each Triton attention op takes: what `make gpu-compile-check` compiles within
# the spill and shared-memory budgets (linear_attention keeps a d x d context and d x 128 token
# tiles in registers: at d = 128 ptxas ran for minutes and spilled). Wider heads run the ops'
# torch composites.
MAX_D = {"attention": 128, "linear_attention": 64}


def block_d(d: int) -> int:
    """The head dim as the attention kernels tile it: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the attention kernels' softmax statistics and sums, and of their saved
    log-sum-exp: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
