"""``synthetic-shapes``: a procedural segmentation dataset, deterministic by (seed, split, index).

Every image holds 1..max_shapes filled shapes of five classes (disc, square, triangle, ring,
cross) on a textured background. A shape's colour is drawn independently of its class, so a
pixel's class follows only from the geometry of the region around it: a segmentor with a small
receptive field confuses the classes inside a shape, and a mask prior that has learnt the shapes'
regularity (straight edges, corners, one class per connected region) can correct it.

``domain: 1`` renders the same shapes and classes in another domain, to measure how a segmentor
trained on domain 0 carries over (the cross-domain evaluation, ``eval.datasets``): the background
and shape colours drawn from [0.25, 0.75] per channel (domain 0: [0.2, 0.8] and [0, 1]), so
that shapes stand out less, textured by oriented stripes under uniform noise (domain 0: a smooth
field under Gaussian noise).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..schema import DATASETS, option

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "cross")
SPLIT_SEEDS = {"training": 1, "validation": 2}
# Generating a sample costs about as much as the compact segmentor's training step on it, so a
# dataset that fits in this many bytes keeps its samples after the first epoch.
CACHE_BYTES = 1 << 30


def _shape_mask(kind: int, yy, xx, cy, cx, r, angle):
    # coordinates in the shape's rotated frame, in units of r
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / r
    v = (-(xx - cx) * s + (yy - cy) * c) / r
    if kind == 1:
        return u * u + v * v <= 1
    if kind == 2:
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if kind == 3:
        return (v <= 0.6) & (1.7 * np.abs(u) <= v + 1)
    if kind == 4:
        d = u * u + v * v
        return (d <= 1) & (d >= 0.3)
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))


def _texture(rng, size: int, amplitude: float):
    """Smooth random field plus pixel noise, [size, size, 3] in [-amplitude, amplitude]-ish."""
    coarse = rng.normal(size=(size // 16 + 2, size // 16 + 2, 3))
    idx = np.arange(size) / 16
    i0 = idx.astype(int)
    f = (idx - i0)[:, None, None]
    rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f
    g = (idx - i0)[None, :, None]
    smooth = rows[:, i0] * (1 - g) + rows[:, i0 + 1] * g
    return amplitude * (0.6 * smooth + 0.6 * rng.normal(size=(size, size, 3)))


def _stripes(rng, size: int, amplitude: float):
    """Stripes of a random direction and period (4 to 12 pixels) plus uniform pixel noise of
    _texture's spread, [size, size, 3] in [-amplitude, amplitude]-ish."""
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    yy, xx = np.mgrid[0:size, 0:size]
    wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)[:, :, None]
    return amplitude * (0.6 * wave * rng.uniform(0.5, 1, size=3) + 0.6 * rng.uniform(-3 ** 0.5, 3 ** 0.5, size=(size, size, 3)))


# domain -> (the background's colour range, the shapes' colour range, the texture)
DOMAINS = {0: ((0.2, 0.8), (0, 1), _texture), 1: ((0.25, 0.75), (0.25, 0.75), _stripes)}


def generate(seed: int, split: str, index: int, size: int, max_shapes: int, noise: float, domain: int = 0):
    """(image uint8 [size, size, 3], mask uint8 [size, size]) of one sample."""
    # domain 0's stream is the one every run before domains had
    rng = np.random.default_rng([seed, SPLIT_SEEDS.get(split, 3), index, *([domain] if domain else [])])
    background, colours, texture = DOMAINS[domain]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = rng.uniform(*background, size=3)[None, None, :] + texture(rng, size, noise)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, max_shapes + 1)):
        kind = int(rng.integers(1, len(CLASS_NAMES)))
        r = rng.uniform(0.12, 0.25) * size
        cy, cx = rng.uniform(r, size - r, size=2)
        inside = _shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, np.pi))
        colour = rng.uniform(*colours, size=3)
        image[inside] = colour + texture(rng, size, noise)[inside]
        mask[inside] = kind
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    return image, mask


class SyntheticShapes(torch.utils.data.Dataset):
    num_classes = len(CLASS_NAMES)
    ignore_index = 255  # never present: every pixel has a class
    class_names = CLASS_NAMES

    def __init__(self, split: str, seed: int, num: int, size: int, max_shapes: int, noise: float, domain: int = 0):
        self.split, self.seed, self.num, self.size = split, seed, num, size
        self.max_shapes, self.noise, self.domain = max_shapes, noise, domain
        self._cache = {} if num * size * size * 4 <= CACHE_BYTES else None

    def __len__(self):
        return self.num

    def name(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:05d}" + (f"-domain{self.domain}" if self.domain else "")

    def labels(self, index: int) -> torch.Tensor:
        return self[index][1]

    def __getitem__(self, index: int):
        sample = None if self._cache is None else self._cache.get(index)
        if sample is None:
            sample = generate(self.seed, self.split, index, self.size, self.max_shapes, self.noise, self.domain)
            if self._cache is not None:
                self._cache[index] = sample
        image, mask = sample
        # copies: a caller that edits a sample in place leaves the cached one as generated
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask).long()


@dataclass
class SyntheticOptions:
    num_train: int = option(512, minimum=1)
    num_val: int = option(64, minimum=1)
    size: int = option(128, minimum=1)        # image height and width
    max_shapes: int = option(4, minimum=1)    # shapes per image: 1..max_shapes
    noise: float = option(0.35, minimum=0)    # amplitude of the background and shape texture noise
    # the images' seed (null: the run's seed), fixed to compare runs of other seeds
    seed: int | None = option(None, minimum=-2 ** 63, maximum=2 ** 64 - 1)
    # 0: the images every run trains on; 1: the same shapes in another domain (other colours,
    # textures and noise), for eval.datasets
    domain: int = option(0, choices=tuple(DOMAINS))


@dataclass
class Options:
    synthetic: SyntheticOptions = dataclasses.field(default_factory=SyntheticOptions)


def build(cfg, split: str) -> SyntheticShapes:
    syn = cfg.data.synthetic
    name = cfg.data.train_split if split == "train" else cfg.data.val_split
    return SyntheticShapes(name, cfg.seed if syn.seed is None else syn.seed,
                           syn.num_train if split == "train" else syn.num_val, syn.size, syn.max_shapes, syn.noise, syn.domain)


DATASETS.register("synthetic-shapes", build, Options, classes=lambda cfg: (len(CLASS_NAMES), 255), needs_root=False)
