"""The DDPS denoiser: a UNet with a time embedding, linear attention at every level and full
attention in the middle (SPEC §4). Module and attribute names follow the original so that its
state dicts load with ``strict=True``.

``backend=`` selects the kernels of the module's ops: ``"reference"`` (``ddps.reference``, the
original's op sequence, bitwise), or the fused ``ddps.ops`` (attention, linear_attention,
channel_layer_norm, group_norm_film_silu and conv3x3, with weight standardisation and conv3x3's
weight transform computed once per weight version wherever no gradient flows into the weight) on
``"auto"`` (the backend the resolver picks for each op) or on one kernel family (``"cpu"``,
``"cuda"``, ``"triton"``) for every op that has it, the others on their default.
A fused UNet (any backend but ``"reference"``) also keeps its convolution weights and activations channels-last
(``torch.channels_last``): its state dict has the same keys and values, in that memory format.
Every fused module returns what its reference returns, for any input the reference takes (B = 0,
half precision, either layout): the same shape, dtype and memory format. The fused Attention,
LinearAttention, ResnetBlock and Block take input in any layout: where their C++ kernels want
channels-last (conv3x3 on the CPU; the attention kernels on AVX-512 CPUs) the input is converted
once on the way in and once on the way out, not per op, so that a user's own NCHW model can call
them as they are; the UNet returns NCHW, as the reference's, and keeps channels-last inside.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, ops, reference
from ..ops._common import compute_dtype
from ..ops.conv3x3 import winograd_weight

def _any_layout(forward):
    """A fused block's ``forward(x, ...)`` on x in any layout, returning the reference's layout:
    where its kernels run channels-last (``self.kernels_channels_last(x)``) x is converted to
    channels-last once, and the output is NCHW-contiguous where x was not channels-last (a copy
    only where the block's output is not already so). For channels-last x, the output is
    channels-last where ``self.channels_last_out`` (the reference's convolutions keep the layout;
    the attention blocks' reshapes do not, but inside a fused UNet they may), else NCHW."""
    @functools.wraps(forward)
    def wrapped(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.backend == "reference" or x.dim() != 4:
            return forward(self, x, *args, **kwargs)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = forward(self, x, *args, **kwargs)
            return out if self.channels_last_out else out.contiguous()
        if self.kernels_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        return forward(self, x, *args, **kwargs).contiguous()
    return wrapped


class SinusoidalPosEmb(nn.Module):
    """Timesteps [B] -> [B, dim] sinusoidal features."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half_dim = self.dim // 2
        freq = math.log(10000) / (half_dim - 1)
        freq = torch.exp(torch.arange(half_dim, device=t.device) * -freq)
        emb = t[:, None] * freq[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Conv3x3(nn.Conv2d):
    """3x3 convolution, stride 1, padding 1. The fused backend runs ``ops.conv3x3`` (Winograd on
    CPU) and keeps the weight's Winograd transform while the weight is unchanged (same tensor,
    same version counter, same dtype, same autocast dtype) and no gradient flows into it."""

    def __init__(self, dim: int, dim_out: int, backend: str = "reference"):
        super().__init__(dim, dim_out, 3, padding=1)
        self.backend = _backend.check_module_backend(backend)
        self._cached = None  # (key, convolution weight, its Winograd transform)

    def conv_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The weight the convolution applies, from the parameter (the identity here)."""
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return F.conv2d(x, self.conv_weight(self.weight, x), self.bias, padding=1)
        weight = self.weight
        cacheable = not (torch.is_grad_enabled() and weight.requires_grad) and not torch.compiler.is_compiling()
        if not cacheable:
            return ops.conv3x3(x, self.conv_weight(weight, x), self.bias, backend=self._op_backend)
        # Under autocast the kernel computes with the weight rounded to autocast's dtype.
        dtype = compute_dtype(x)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, reference._norm_eps(x), dtype)
        if self._cached is None or self._cached[0] != key:
            applied = self.conv_weight(weight.detach(), x).to(dtype)
            self._cached = (key, applied, winograd_weight(applied))
        return ops.conv3x3(x, self._cached[1], self.bias, winograd=self._cached[2], backend=self._op_backend)

    @property
    def _op_backend(self) -> str | None:
        return _backend.preferred("conv3x3", self.backend)


class WeightStandardizedConv2d(Conv3x3):
    """Conv3x3 whose weight is standardised per output channel (biased variance). The reference
    backend recomputes it on every call, as the original; the fused one keeps it with the
    Winograd transform."""

    def conv_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reference.weight_standardize(weight, reference._norm_eps(x))


class LayerNorm(nn.Module):
    """LayerNorm over the channel dim of [B, C, H, W], gain only (no bias)."""

    def __init__(self, dim: int, backend: str = "reference"):
        super().__init__()
        self.backend = _backend.check_module_backend(backend)
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.channel_layer_norm(x, self.g, backend=_backend.preferred("channel_layer_norm", self.backend),
                                      dtype=dtype)


def _rounded_by_readers(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused block may return x in where every reader of it is a convolution, which
    under autocast rounds it to autocast's dtype anyway: the same values in half the bytes,
    without the float32 tensor and the readers' casts of it (None: keep x's). Only without
    autograd: in training the readers' gradients would be summed in that dtype, not float32."""
    if torch.is_grad_enabled() or not torch.is_autocast_enabled(x.device.type):
        return None
    return compute_dtype(x)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, backend: str = "reference"):
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fn (an attention block) reads the norm only through its qkv convolution.
        return self.fn(self.norm(x, dtype=None if self.norm.backend == "reference" else _rounded_by_readers(x)))


class Residual(nn.Module):
    read_by_convolutions = False  # a fused UNet sets it where only convolutions read the sum

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x) + x
        dtype = _rounded_by_readers(out) if self.read_by_convolutions else None
        return out.to(dtype) if dtype else out


class _QkvAttention(nn.Module):
    """What the attention blocks share: a 1x1 qkv convolution, an op on its heads (``core``: one of
    the ops' ``_qkv`` entries), then ``to_out`` (the subclass's); [B, dim, H, W] -> same."""

    def __init__(self, dim: int, heads: int, dim_head: int, backend: str, core, op: str):
        super().__init__()
        self.backend = _backend.check_module_backend(backend)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.core, self.op = core, op
        self.to_qkv = nn.Conv2d(dim, dim_head * heads * 3, 1, bias=False)

    channels_last_out = False  # a fused UNet sets it on its own blocks

    @staticmethod
    def kernels_channels_last(x: torch.Tensor) -> bool:
        # The C++ attention kernels (AVX-512 CPUs) take channels-last qkv only; elsewhere the
        # block runs faster on NCHW than on a converted copy (see pointwise).
        return x.device.type == "cpu" and _backend.WIDE_CPU_VECTORS

    @_any_layout
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(self.pointwise(self.to_qkv, x), self.heads, self.scale,
                        backend=_backend.preferred(self.op, self.backend))
        conv, *rest = self.to_out if isinstance(self.to_out, nn.Sequential) else (self.to_out,)
        out = self.pointwise(conv, out)
        for module in rest:
            out = module(out)
        return out

    def pointwise(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv(x) for the 1x1 convolutions. The fused blocks take a contiguous (NCHW) CPU x as one
        matmul of the weight by the [C, H * W] pixels: LinearAttention's forward on NCHW input ran
        1.14-1.22x faster so than with oneDNN's NCHW convolutions, and 1.01-1.45x faster than through
        channels-last and back (32 to 128 pixels a side, B = 1 and 4, interleaved runs on an AVX2
        EPYC; Attention's at 32: 0.97-1.02x)."""
        if self.backend == "reference" or x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return conv(x)
        b, c, h, w = x.shape
        # bmm: matmul would fold a weight that requires grad into one [B * H * W, C] product,
        # copying x and the output to and from pixel-major.
        out = torch.bmm(conv.weight.reshape(conv.out_channels, c).expand(b, -1, -1), x.reshape(b, c, h * w))
        if conv.bias is not None:
            # In place: bmm's backward does not read its output, and a new [B, C, H * W] tensor
            # costs its page faults. The bias in out's dtype, as autocast casts a convolution's.
            out.add_(conv.bias.to(out.dtype)[:, None])
        return out.reshape(b, conv.out_channels, h, w)


class LinearAttention(_QkvAttention):
    """Linear attention: softmax over d for q, over tokens for k; [B, dim, H, W] -> same."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, backend: str = "reference"):
        super().__init__(dim, heads, dim_head, backend, ops.linear_attention_qkv, "linear_attention")
        self.to_out = nn.Sequential(nn.Conv2d(dim_head * heads, dim, 1), LayerNorm(dim, backend=backend))
        _fused_layout(self)


class Attention(_QkvAttention):
    """Full softmax attention over the H * W tokens; [B, dim, H, W] -> same."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, backend: str = "reference"):
        super().__init__(dim, heads, dim_head, backend, ops.attention_qkv, "attention")
        self.to_out = nn.Conv2d(dim_head * heads, dim, 1)
        _fused_layout(self)


def _cpu_tensor(x: torch.Tensor) -> bool:
    """The blocks' kernels_channels_last: conv3x3's C++ kernel (CPU) takes channels-last input only."""
    return x.device.type == "cpu"


class Block(nn.Module):
    """WS-conv 3x3 -> GroupNorm -> optional FiLM (x * (scale + 1) + shift) -> SiLU."""

    kernels_channels_last = staticmethod(_cpu_tensor)
    channels_last_out = True

    def __init__(self, dim: int, dim_out: int, groups: int = 8, backend: str = "reference"):
        super().__init__()
        self.backend = _backend.check_module_backend(backend)
        self.proj = WeightStandardizedConv2d(dim, dim_out, backend=backend)
        self.norm = nn.GroupNorm(groups, dim_out)
        _fused_layout(self)

    @_any_layout
    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return ops.group_norm_film_silu(self.proj(x), self.norm.weight, self.norm.bias, scale, shift,
                                        self.norm.num_groups, self.norm.eps,
                                        backend=_backend.preferred("group_norm_film_silu", self.backend))


class ResnetBlock(nn.Module):
    kernels_channels_last = staticmethod(_cpu_tensor)
    channels_last_out = True

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int, groups: int = 8, backend: str = "reference"):
        super().__init__()
        self.backend = _backend.check_module_backend(backend)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups=groups, backend=backend)
        self.block2 = Block(dim_out, dim_out, groups=groups, backend=backend)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()
        _fused_layout(self)

    @_any_layout
    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


def _fused_layout(module: nn.Module) -> None:
    """A fused module's convolution weights channels-last, as its activations run: oneDNN's
    channels-last convolutions are 1.2-1.4x the NCHW ones on this package's reference CPU, and
    with the weights stored so no convolution reorders them."""
    if module.backend != "reference":
        module.to(memory_format=torch.channels_last)


def _upsample(dim: int, dim_out: int, backend: str) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), Conv3x3(dim, dim_out, backend=backend))


class UNet(nn.Module):
    """The denoiser: x [B, channels, H, W], timesteps [B] -> [B, out_dim, H, W].

    H and W must be divisible by 2 ** (len(dim_mults) - 1). Timestep i = 0 is the noisiest.
    """

    def __init__(self, dim: int, out_dim: int, channels: int, dim_mults=(1, 2, 4),
                 resnet_block_groups: int = 8, backend: str = "reference"):
        super().__init__()
        self.backend = _backend.check_module_backend(backend)
        if dim % resnet_block_groups or any(dim * m % resnet_block_groups for m in dim_mults):
            raise ValueError(f"dim={dim} and dim * dim_mults={[dim * m for m in dim_mults]} must be "
                             f"multiples of resnet_block_groups={resnet_block_groups}")
        if dim < 4:
            raise ValueError(f"dim={dim} must be >= 4 (the sinusoidal embedding needs dim // 2 >= 2)")
        self.channels = channels
        self.out_dim = out_dim
        self.num_levels = len(dim_mults)
        self.init_conv = nn.Conv2d(channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))

        def resnet(d_in, d_out):
            return ResnetBlock(d_in, d_out, time_emb_dim=time_dim, groups=resnet_block_groups, backend=backend)

        def attention(d, cls):
            return Residual(PreNorm(d, cls(d, backend=backend), backend=backend))

        def up_attention(d):
            # Read by the level's upsampling convolution only (a down level's also reaches a Block
            # whose weight standardisation takes eps by its input's dtype: float32's there).
            block = attention(d, LinearAttention)
            block.read_by_convolutions = backend != "reference"
            return block

        self.downs = nn.ModuleList()
        for ind, (d_in, d_out) in enumerate(in_out):
            is_last = ind == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                resnet(d_in, d_in), resnet(d_in, d_in), attention(d_in, LinearAttention),
                Conv3x3(d_in, d_out, backend=backend) if is_last else nn.Conv2d(d_in, d_out, 4, 2, 1),
            ]))
        mid_dim = dims[-1]
        self.mid_block1 = resnet(mid_dim, mid_dim)
        self.mid_attn = attention(mid_dim, Attention)
        self.mid_block2 = resnet(mid_dim, mid_dim)
        self.ups = nn.ModuleList()
        for ind, (d_in, d_out) in enumerate(reversed(in_out)):
            is_last = ind == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                resnet(d_out + d_in, d_out), resnet(d_out + d_in, d_out), up_attention(d_out),
                Conv3x3(d_out, d_in, backend=backend) if is_last else _upsample(d_out, d_in, backend),
            ]))
        self.final_res_block = resnet(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, out_dim, 1)
        _fused_layout(self)
        for module in self.modules():  # its activations stay channels-last from block to block
            if isinstance(module, _QkvAttention):
                module.channels_last_out = True

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        out = self.forward_native_layout(x, time)
        # NCHW, as the reference's (its attention blocks' reshapes) for either layout of x
        return out if self.backend == "reference" else out.contiguous()

    def forward_native_layout(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """``forward`` with the output in the layout its last kernel leaves (channels-last for a
        fused UNet), for a caller whose next layer takes either (DDPSHead's classifier)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be [B, channels={self.channels}, H, W], got shape {tuple(x.shape)}")
        self._check_trunk_input(x, time)
        if self.backend != "reference":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.trunk(self.init_conv(x), time)

    @property
    def size_multiple(self) -> int:
        """What H and W must be multiples of: each level below the first halves them."""
        return 2 ** (self.num_levels - 1)

    def _check_trunk_input(self, x: torch.Tensor, time: torch.Tensor) -> None:
        factor = self.size_multiple
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x spatial size {tuple(x.shape[2:])} must be divisible by {factor}")
        if time.dim() != 1 or time.shape[0] != x.shape[0]:
            raise ValueError(f"time must have shape [{x.shape[0]}], got {tuple(time.shape)}")

    def trunk(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """Everything after ``init_conv``: x = init_conv's output [B, dim, H, W]. DDPSHead calls it
        with init_conv computed in two shares (condition and mask embedding)."""
        if x.dim() != 4 or x.shape[1] != self.init_conv.out_channels:
            raise ValueError(f"x must be [B, dim={self.init_conv.out_channels}, H, W], got shape {tuple(x.shape)}")
        self._check_trunk_input(x, time)
        # Nothing below writes into x in place, so the fused path needs no copy of it.
        r = x if self.backend != "reference" else x.clone()
        t = self.time_mlp(time)
        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = block2(x, t)
            x = attn(x)
            skips.append(x)
            x = downsample(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t)
        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = block2(torch.cat((x, skips.pop()), dim=1), t)
            x = attn(x)
            x = upsample(x)
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)
