"""The Triton launches ``gpu_compile`` compiles: every launcher in ``ddps.kernels`` called with
meta tensors shaped, typed and laid out as the ops hand them over (every dtype, layout and head
width, the ADE20K head's shapes and small odd ones), its launches recorded instead of run."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOGITS = (torch.float32, torch.bfloat16, torch.float16)
LABELS = (torch.int64, torch.int32, torch.uint8)
HEAD_DIMS = (16, 32, 64, 128)  # the widths the attention ops take on Triton (ddps.kernels._layout.MAX_D)
SHIPPED_D = 32
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}


@dataclass
class Launch:
    """One kernel launch as a launcher made it: what compiles, and where it came from."""
    kernel: object
    args: tuple
    kwargs: dict
    case: str
    shipped: bool


def _meta(shape, dtype, channels_last=False):
    x = torch.empty(shape, dtype=dtype, device="meta")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _heads(b, h, d, n, dtype, token_major):
    """q, k, v [B, heads, d, N] as the ops hand them to the kernels: views of one channels-last
    qkv convolution output (token-major), or three contiguous tensors."""
    from ..ops.attention import split_heads
    if token_major:
        side = int(n ** 0.5)
        return split_heads(_meta((b, 3 * h * d, side, n // side), dtype, True), h)
    return tuple(_meta((b, h, d, n), dtype) for _ in range(3))


def _denoiser_calls():
    """(case, shipped, call) for every denoiser launcher: forward and backward of each op, every
    dtype, layout and head width, at the ADE20K head's shapes (dim 256, 4 heads, mask 128: tokens
    at S, S/2 and S/4) and at a small odd shape."""
    from ..kernels import attention, channel_layer_norm, group_norm_film_silu, linear_attention
    from ..kernels._layout import MAX_D
    for dtype, d, token_major in itertools.product(FLOATS, HEAD_DIMS, (True, False)):
        shipped = d == SHIPPED_D and dtype != torch.float64
        layout = "token-major" if token_major else "head-major"
        for n in (1024, 36):
            q, k, v = _heads(2, 4, d, n, dtype, token_major)
            name = f"{SHORT[dtype]} d{d} {layout} N{n}"

            def attn(q=q, k=k, v=v, d=d):
                out, lse = attention.attention_fwd(q, k, v, d ** -0.5)
                attention.attention_bwd(out, q, k, v, out, lse, d ** -0.5)
            yield f"attention {name}", shipped, attn
        for n in (16384, 4096, 1024, 36) if d <= MAX_D["linear_attention"] else ():
            q, k, v = _heads(2, 4, d, n, dtype, token_major)

            def linear(q=q, k=k, v=v, d=d):
                out, ctx, lse = linear_attention.linear_attention_fwd(q, k, v, d ** -0.5)
                linear_attention.linear_attention_bwd(out, q, k, v, ctx, lse, d ** -0.5)
            yield f"linear_attention {SHORT[dtype]} d{d} {layout} N{n}", shipped, linear
    for dtype, channels_last, (c, side) in itertools.product(FLOATS, (True, False), ((256, 64), (512, 32), (24, 5))):
        shipped = dtype != torch.float64 and c != 24
        x = _meta((2, c, side, side), dtype, channels_last)
        g = _meta((c,), dtype)
        name = f"{SHORT[dtype]} C{c} {side}x{side} {'channels-last' if channels_last else 'contiguous'}"

        def layer_norm(x=x, g=g):
            y, mean, rstd = channel_layer_norm.channel_layer_norm_fwd(x, g, 1e-5)
            channel_layer_norm.channel_layer_norm_bwd(y, x, g, mean, rstd)

        def group_norm(x=x, g=g, c=c):
            film = _meta((2, c), dtype)
            groups = 8 if c % 8 == 0 else 4
            y, mean, rstd = group_norm_film_silu.group_norm_film_silu_fwd(x, g, g, film, film, groups, 1e-5)
            group_norm_film_silu.group_norm_film_silu_bwd(y, x, g, g, film, film, mean, rstd, groups)
        yield f"channel_layer_norm {name}", shipped, layer_norm
        yield f"group_norm_film_silu {name}", shipped, group_norm


def _sampling_calls():
    """(case, shipped, call) for every sampling launcher: each logit and label dtype, ignore_index
    on and off, at the ADE20K shape (K = 151, 128 x 128) and a small odd one."""
    from ..kernels import maskige_decode, p_posterior_sample, q_posterior_sample, q_sample, renoise
    seed = torch.tensor(1234)
    for (b, k, side), labels, ignore in itertools.product(((2, 151, 128), (3, 7, 5)), LABELS, (None, 255)):
        x = _meta((b, side, side), labels)
        t = _meta((b,), torch.int64)
        name = f"{SHORT[labels]} K{k} {side}x{side}{' ignore' if ignore is not None else ''}"
        tables = {"q": _meta((21, 2), torch.int64), "post": _meta((20, 3, 2), torch.int64),
                  "p": _meta((20, 2, 4), torch.float32)}
        yield f"q_sample {name}", True, lambda x=x, t=t, k=k, ignore=ignore: q_sample.q_sample_fwd(
            x, t, tables["q"], seed, k, -1, ignore)
        yield f"q_posterior_sample {name}", True, lambda x=x, t=t, k=k, ignore=ignore: \
            q_posterior_sample.q_posterior_sample_fwd(x, x, t, tables["post"], seed, k, -1, ignore)
        for logits in LOGITS:
            lg = _meta((b, k, side, side), logits)
            yield f"p_posterior_sample {SHORT[logits]} logits, {name}", True, \
                lambda lg=lg, x=x, t=t, k=k, ignore=ignore: p_posterior_sample.p_posterior_sample_fwd(
                    lg, x, t, tables["p"], seed, k, -1, ignore)
            if labels == torch.int64 and ignore is None:
                yield f"renoise {SHORT[logits]} logits K{k} {side}x{side}", True, \
                    lambda lg=lg, t=t, k=k: renoise.renoise_fwd(lg, t, tables["q"], seed, k, -1)
                yield f"maskige_decode {SHORT[logits]} K{k} {side}x{side}", True, \
                    lambda x=_meta((b, 3, side, side), logits), p=_meta((k, 3), torch.float32): \
                    maskige_decode.maskige_decode_fwd(x, p)


def _tf32_calls():
    """The float32 attention kernels once more with torch's TF32 flag on (their tl.dot precision
    follows it)."""
    for case, shipped, call in _denoiser_calls():
        if "attention" in case and case.split()[1] == "fp32":
            yield case + " tf32", shipped, call


def capture() -> list[Launch]:
    """Every launch the launchers make for the cases above. Their choices (tiles, warps) fit all
    three targets, so one capture serves every target."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs, case, shipped))

    wrap = torch.library.wrap_triton
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.library.wrap_triton = Recorder
    try:
        for tf32, calls in ((False, _denoiser_calls()), (False, _sampling_calls()), (True, _tf32_calls())):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for case, shipped, call in calls:
                call()
    finally:
        torch.library.wrap_triton = wrap
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return launches
