"""The original's training augmentations (mmseg 0.30): resize with a ratio range, random crop
with cat_max_ratio, flip, photometric distortion, pad to the crop size. Every random draw comes
from the generator passed in, so a sample's augmentation is a function of its seed alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float = 0.5) -> bool:
    return float(torch.rand((), generator=g)) < p


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size whose long side is <= max(scale) and short side
    <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize(image: torch.Tensor, mask: torch.Tensor | None, size) -> tuple:
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


def random_crop(image, mask, crop, ignore_index: int, cat_max_ratio: float, g: torch.Generator):
    ch, cw = crop
    h, w = mask.shape

    def box():
        y = int(torch.randint(0, max(h - ch, 0) + 1, (), generator=g))
        x = int(torch.randint(0, max(w - cw, 0) + 1, (), generator=g))
        return y, x

    y, x = box()
    if cat_max_ratio < 1:
        # re-draw (up to 10 times) a crop in which one class covers more than cat_max_ratio
        for _ in range(10):
            labels = mask[y:y + ch, x:x + cw]
            counts = torch.bincount(labels[labels != ignore_index].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
            y, x = box()
    return image[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6])
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def photometric(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion: brightness ±32, contrast 0.5-1.5 (before or after the HSV
    part), saturation 0.5-1.5, hue ±18 degrees; each applied with probability 1/2."""
    x = image.float()
    if _coin(g):
        x = x + _uniform(g, -32, 32)
    contrast_first = _coin(g)
    if contrast_first and _coin(g):
        x = x * _uniform(g, 0.5, 1.5)
    x = x.clamp(0, 255)
    saturate, shift_hue = _coin(g), _coin(g)
    if saturate or shift_hue:
        hsv = rgb_to_hsv(x / 255)
        if saturate:
            hsv[1] = (hsv[1] * _uniform(g, 0.5, 1.5)).clamp(0, 1)
        if shift_hue:
            hsv[0] = (hsv[0] + _uniform(g, -18, 18) / 360) % 1
        x = hsv_to_rgb(hsv) * 255
    if not contrast_first and _coin(g):
        x = (x * _uniform(g, 0.5, 1.5)).clamp(0, 255)
    return x.round().clamp(0, 255).to(torch.uint8)


def pad(image, mask, size, ignore_index: int):
    ph, pw = size[0] - image.shape[1], size[1] - image.shape[2]
    if ph <= 0 and pw <= 0:
        return image, mask
    ph, pw = max(ph, 0), max(pw, 0)
    return F.pad(image, (0, pw, 0, ph), value=0), F.pad(mask, (0, pw, 0, ph), value=ignore_index)


class TrainTransform:
    def __init__(self, cfg, ignore_index: int):
        self.cfg, self.ignore_index = cfg, ignore_index

    def __call__(self, image, mask, g: torch.Generator):
        cfg = self.cfg
        ratio = _uniform(g, *cfg.ratio_range)
        size = rescale_size(*mask.shape, [int(s * ratio) for s in cfg.scale])
        image, mask = resize(image, mask, size)
        image, mask = random_crop(image, mask, cfg.crop_size, self.ignore_index, cfg.cat_max_ratio, g)
        if _coin(g, cfg.flip_prob):
            image, mask = image.flip(-1), mask.flip(-1)
        if cfg.photometric:
            image = photometric(image, g)
        return pad(image, mask, cfg.crop_size, self.ignore_index)
