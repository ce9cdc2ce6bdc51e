"""Maskiges (GSS, Chen et al., CVPR 2023): a label mask rendered as an RGB image, one fixed colour
per class and one for "ignore", so that an image autoencoder can model masks.

``palette(K, kind)`` gives the K + 1 colours in [0, 1] (rows 0..K-1: the classes, row K: ignore):
GSS's own for Cityscapes and ADE20K, or one computed for any K;
``encode`` paints labels with them (a linear map of the one-hot mask); ``decode`` takes each
pixel's nearest colour (the fused op ``ddps.ops.maskige_decode``, GSS-FF) and row K back to the
ignore label; ``ddps.nn.gss.FTWDecoder`` is the trained inverse (GSS-FT-W).

>>> colours = palette(5)
>>> labels = torch.tensor([[[0, 4], [255, 2]]])
>>> torch.equal(decode(encode(labels, colours), colours), labels)
True
"""
from __future__ import annotations

import itertools

import torch

from . import _checks, _gss_palettes, ops

# The palettes GSS's configs list, by kind; each fits one class count.
GSS_PALETTES = {"gss-cityscapes": _gss_palettes.CITYSCAPES, "gss-ade20k": _gss_palettes.ADE20K}
COMPUTED = ("grid", "spread")  # for any number of classes
KINDS = (*COMPUTED, *GSS_PALETTES)
IGNORE_INDEX = 255


def _grid_levels(count: int) -> tuple[int, int, int]:
    """Levels per channel of the smallest-spacing-first 3-D grid with at least ``count`` points:
    the fewest levels on the finest axis (its spacing is the palette's minimum distance), then the
    fewest points."""
    for c in itertools.count(1):
        fits = [(a * b * c, (a, b, c)) for b in range(1, c + 1) for a in range(1, b + 1) if a * b * c >= count]
        if fits:
            return min(fits)[1]


def _grid(count: int) -> torch.Tensor:
    # the first `count` points of the regular grid, in order
    levels = _grid_levels(count)
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.full((1,), 0.5, dtype=torch.float64)
            for n in levels]
    return torch.cartesian_prod(*axes)[:count]


def _lattice(count: int, parity) -> torch.Tensor:
    """The first ``count`` points (lexicographic) of {0, h, .., 1}^3 that ``parity`` keeps, with the
    coarsest step h = 1/n that keeps enough of them."""
    for n in itertools.count(1):
        axis = torch.arange(n + 1)
        points = torch.cartesian_prod(axis, axis, axis)
        points = points[parity(points)]
        if len(points) >= count:
            return points[:count].double() / n


def _spread(count: int) -> torch.Tensor:
    """The colours of the grid, the face-centred or the body-centred cubic lattice filling the RGB
    cube, whichever keeps its points farthest apart: a face-centred lattice of step 1/n holds about
    (n + 1)^3 / 2 points 1.41 / n apart, where a grid of as many points would space them about
    1.26 / n, so it wins for most K; a small cube-number palette keeps the grid's corners."""
    candidates = [_grid(count),
                  _lattice(count, lambda p: p.sum(1) % 2 == 0),  # face-centred
                  _lattice(count, lambda p: (p % 2 == p[:, :1] % 2).all(1))]  # body-centred
    return max(candidates, key=_min_distance)


def _min_distance(colours: torch.Tensor) -> float:
    d = torch.cdist(colours.double(), colours.double())
    return float(d.masked_fill(torch.eye(len(colours), dtype=torch.bool, device=colours.device), float("inf")).min())


def palette(num_classes: int, kind: str = "spread") -> torch.Tensor:
    """float32 [num_classes + 1, 3] colours in [0, 1]: row k paints class k, the last row the
    ignored pixels. ``kind``: "gss-cityscapes" or "gss-ade20k" (GSS's palettes, its 8-bit values
    / 255; for 19 and 150 classes), or a computed one for any K: "grid" (the points of the
    smallest regular grid, in order) or "spread" (the densest cubic lattice: a larger minimum
    distance for most K, e.g. 0.236 against 0.2 for 151 colours; see ``min_distance``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a palette kind; choose one of {KINDS}")
    if kind in GSS_PALETTES:
        values = torch.tensor(GSS_PALETTES[kind], dtype=torch.float64).view(-1, 3)
        if len(values) != num_classes + 1:
            raise ValueError(f"the {kind} palette is for {len(values) - 1} classes, not {num_classes}")
        return (values / 255).float()
    colours = _grid(num_classes + 1) if kind == "grid" else _spread(num_classes + 1)
    return colours.float()


def min_distance(colours: torch.Tensor) -> float:
    """The smallest Euclidean distance between two colours of the palette: a decoded pixel keeps
    its class under any perturbation shorter than half of it."""
    return _min_distance(check_palette(colours))


def check_palette(colours) -> torch.Tensor:
    """A palette: floating point [rows >= 2, 3], finite, no colour twice (a ValueError names the rows)."""
    _checks.tensor(colours, "palette")
    if not colours.dtype.is_floating_point or colours.dim() != 2 or colours.shape[1] != 3 or len(colours) < 2:
        raise ValueError(f"palette must be floating point [rows >= 2, 3], got {colours.dtype} {tuple(colours.shape)}")
    if not bool(torch.isfinite(colours).all()):
        raise ValueError("palette holds a non-finite colour")
    same = (colours[:, None] == colours[None]).all(-1) & ~torch.eye(len(colours), dtype=torch.bool,
                                                                   device=colours.device)
    if bool(same.any()):
        i, j = (int(v) for v in same.nonzero()[0])
        raise ValueError(f"palette rows {i} and {j} are the same colour {colours[i].tolist()}")
    return colours


def encode(labels: torch.Tensor, colours: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, *spatial] in [0, K) or ignore_index -> float32 maskige [B, 3, *spatial] (K = the
    palette's rows - 1)."""
    check_palette(colours)
    k = len(colours) - 1
    _checks.labels(labels, "labels", k, ignore_index)
    _checks.same_device(labels, "labels", colours.device, "the palette")
    rows = torch.where(labels == ignore_index, k, labels.long())
    return colours.float()[rows].movedim(-1, 1).contiguous()


def decode(maskige: torch.Tensor, colours: torch.Tensor, ignore_index: int = IGNORE_INDEX,
           backend: str | None = None) -> torch.Tensor:
    """maskige [B, 3, *spatial] -> int64 labels [B, *spatial]: the class of each pixel's nearest
    colour, ignore_index where it is the ignore colour."""
    check_palette(colours)
    rows = ops.maskige_decode(maskige, colours, backend=backend)
    return rows.masked_fill_(rows == len(colours) - 1, ignore_index)
