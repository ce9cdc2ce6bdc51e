"""maskige_decode: the nearest palette colour of each pixel of a maskige (GSS's training-free
decoding, GSS-FF), in one pass over the maskige: O(K) work per pixel and no [B, K, *spatial]
distance tensor.

Backends: ``cpu`` / ``cuda`` (csrc/maskige_decode/), ``triton`` (kernels/maskige_decode.py) and
``reference`` (GSS's composite, ``((maskige - palette) ** 2).sum().argmin()``, in float32).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks
from . import _common

IMPLEMENTED = _backend.implements("maskige_decode", ("cpu", "cuda", "triton", "reference"))


@_backend.register_fake("maskige_decode")
def _maskige_decode_fake(maskige, palette):
    return maskige.new_empty((maskige.shape[0], *maskige.shape[2:]), dtype=torch.int64)


def composite(maskige: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """GSS's decoding as it computes it: every pixel's squared distance to every colour (a
    [B, rows, 3, *spatial] tensor), then argmin; in float32. The reference backend, and the
    baseline of the benchmark."""
    colours = palette.view(1, -1, 3, *([1] * (maskige.dim() - 2)))
    return ((maskige.float()[:, None] - colours) ** 2).sum(2).argmin(1)


def maskige_decode(maskige: torch.Tensor, palette: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """maskige [B, 3, *spatial] float32/float16/bfloat16, palette [rows, 3] (read as float32) ->
    int64 [B, *spatial]: the row of the colour nearest to each pixel, by squared distance in
    float32, bit for bit the reference's (ties: the lowest row; a NaN pixel: row 0, as
    torch.argmin)."""
    _checks.tensor(maskige, "maskige")
    _checks.tensor(palette, "palette")
    if maskige.dtype not in _common.LOGIT_DTYPES:
        raise TypeError(f"maskige must be float32, float16 or bfloat16, got dtype {maskige.dtype}")
    if maskige.dim() < 2 or maskige.shape[1] != 3:
        raise ValueError(f"maskige must be [B, 3, *spatial], got shape {tuple(maskige.shape)}")
    if palette.dim() != 2 or palette.shape[1] != 3 or palette.shape[0] < 1 or not palette.dtype.is_floating_point:
        raise ValueError(f"palette must be floating point [rows >= 1, 3], got {palette.dtype} {tuple(palette.shape)}")
    _checks.same_device(palette, "palette", maskige.device, "maskige")
    palette = palette.float().contiguous()
    chosen = _backend.resolve("maskige_decode", backend, maskige.device)
    if chosen == "reference":
        return composite(maskige, palette)
    return _common.launch("maskige_decode", chosen, maskige.contiguous(), palette)
