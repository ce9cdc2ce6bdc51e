"""Swin Transformer blocks (Liu et al., ICCV 2021) on a feature map, as GSS uses them after its
multi-level fusion (two blocks, 512 wide, 16 heads) and in GSS-FT-W's decoder (one, 128 wide):
pre-norm multi-head self-attention within non-overlapping windows, with a learnt bias per relative
position and head, every second block on windows shifted by half a window (a cyclic shift, the
pairs that wrap around kept apart by a mask), then a GELU MLP. A map whose sides are not multiples
of the window is padded with zeros after the norm and cropped back, as mmseg's blocks do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASKED = -100.0  # the attention logit between positions of different regions of a shifted window


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2]: the row of the bias table for each (query, key) pair of a window,
    (dy + window - 1) * (2 * window - 1) + (dx + window - 1)."""
    y, x = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    y, x = y.flatten(), x.flatten()
    return (y[:, None] - y[None] + window - 1) * (2 * window - 1) + (x[:, None] - x[None] + window - 1)


def shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """[windows, window^2, window^2]: 0 between positions from the same region of the shifted map,
    MASKED between the regions a cyclic shift brings together."""
    region = torch.zeros(height, width)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    for i, (y0, y1) in enumerate(bounds):
        for j, (x0, x1) in enumerate(bounds):
            region[y0:y1, x0:x1] = 3 * i + j
    ids = _windows(region[None, :, :, None], window)[..., 0]  # [windows, window^2]
    return torch.where(ids[:, :, None] == ids[:, None], 0.0, MASKED)


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/window * W/window, window^2, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    x = x.view(b, h // window, w // window, window, window, -1).transpose(2, 3)
    return x.reshape(b, h, w, -1)


class SwinBlock(nn.Module):
    """[B, H, W, C] -> [B, H, W, C]; ``shifted``: windows shifted by window // 2."""

    def __init__(self, dim: int, heads: int, window: int, mlp: int, shifted: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.window, self.shift = heads, window, window // 2 if shifted else 0
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s, shift = self.window, self.shift
        y = F.pad(self.norm1(x), (0, 0, 0, -w % s, 0, -h % s))
        hp, wp = y.shape[1:3]
        if shift:
            y = y.roll((-shift, -shift), (1, 2))
        windows = _windows(y, s)  # [N, s*s, C]
        q, k, v = self.qkv(windows).view(len(windows), s * s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)  # [N, heads, s*s, s*s]
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        logits = logits + bias
        if shift:
            mask = shift_mask(hp, wp, s, shift).to(logits)
            logits = (logits.view(b, -1, self.heads, s * s, s * s) + mask[None, :, None]).flatten(0, 1)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(len(windows), s * s, c)
        y = _unwindows(self.proj(out), s, b, hp, wp)
        if shift:
            y = y.roll((shift, shift), (1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class SwinStack(nn.Module):
    """``depth`` Swin blocks (every second shifted) on [B, C, H, W], then LayerNorm -> [B, C, H, W]."""

    def __init__(self, dim: int, heads: int, window: int, depth: int, mlp: int):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, mlp, shifted=i % 2 == 1) for i in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).permute(0, 3, 1, 2)
