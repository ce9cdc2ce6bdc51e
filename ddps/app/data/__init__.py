"""Datasets and the training batch stream.

Each dataset is a plug-in (``ddps.app.schema.DATASETS``): ``synthetic.py`` the synthetic shapes,
``files.py`` ADE20K, Cityscapes, GTA5, Mapillary Vistas, BDD100K and a generic folder. Every
dataset yields ``(image uint8 [3, H, W], labels int64 [H, W])`` and knows its ``num_classes`` K
and ``ignore_index``. The batch stream is a function of (seed, step): the global batch of step s
takes positions s*B .. s*B+B-1 of a sequence of per-epoch permutations, and each sample's
augmentation draws from a generator seeded by (seed, position). So a resumed run sees exactly the
batches an uninterrupted one would, and rank r of W takes every W-th sample of the
global batch (DistributedSampler's interleaving)."""
from __future__ import annotations

import torch

from ..schema import DATASETS
from . import synthetic, files  # noqa: F401  (each registers its datasets, in this order)
from .files import DataError, read_image
from .rcs import RareClassSampling
from .transforms import TrainTransform, rescale_size, resize

__all__ = ["DataError", "build_dataset", "mix_seed", "rare_class_sampling", "read_image", "rescale_size", "resize",
           "train_batches"]


def build_dataset(cfg, split: str):
    """The dataset of ``split`` ("train" or "val") described by the config's data section."""
    return DATASETS[cfg.data.dataset].build(cfg, split)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, position) pairs give
    unrelated generators."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


class _Samples(torch.utils.data.Dataset):
    def __init__(self, dataset, transform, seed: int, rcs: RareClassSampling | None):
        self.dataset, self.transform, self.seed, self.rcs = dataset, transform, seed, rcs

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, position = key
        g = torch.Generator().manual_seed(mix_seed(self.seed, position))
        if self.rcs is not None:  # the image is drawn by its classes instead
            return self.rcs.sample(self.dataset, self.transform, g)
        image, labels = self.dataset[index]
        return self.transform(image, labels, g)


class _Positions(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int, batch: int, start: int, stop: int, rank: int, world: int):
        self.n, self.seed, self.batch = n, seed, batch
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != getattr(self, "_epoch", None):
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        return int(self._perm[offset])

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            positions = range(step * self.batch + self.rank, (step + 1) * self.batch, self.world)
            yield [(self._index(p), p) for p in positions]


def rare_class_sampling(dataset, data_cfg) -> RareClassSampling | None:
    """data.rcs's sampling of ``dataset`` (its labels read once), or None."""
    if not data_cfg.rcs:
        return None
    return RareClassSampling(dataset, data_cfg.rcs_class_temp, data_cfg.rcs_min_pixels, data_cfg.rcs_min_crop_ratio)


def train_batches(dataset, data_cfg, seed: int, batch: int, start: int, stop: int, rank: int = 0, world: int = 1,
                  rcs: RareClassSampling | None = None):
    """Batches (images uint8 [b, 3, h, w], labels [b, h, w]) of steps start..stop-1; b = batch / world.
    ``rcs``: each sample drawn by rare-class sampling instead of the epoch's permutation."""
    if batch % world:
        raise ValueError(f"batch size {batch} is not divisible by the {world} processes")
    samples = _Samples(dataset, TrainTransform(data_cfg, dataset.ignore_index), seed, rcs)
    return torch.utils.data.DataLoader(samples, batch_sampler=_Positions(len(dataset), seed, batch, start, stop, rank, world),
                                       num_workers=data_cfg.workers)
