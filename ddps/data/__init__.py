"""Datasets and the training batch stream.

Every dataset yields ``(image uint8 [3, H, W], labels int64 [H, W])`` and knows its
``num_classes`` K and ``ignore_index``. The batch stream is a function of (seed, step): the global
batch of step s takes positions s*B .. s*B+B-1 of a sequence of per-epoch permutations, and each
sample's augmentation draws from a generator seeded by (seed, position). So a resumed run sees
exactly the batches an uninterrupted one would, and rank r of W takes every W-th sample of the
global batch (DistributedSampler's interleaving)."""
from __future__ import annotations

import torch

from .files import DataError, ade20k, cityscapes, folder, read_image
from .synthetic import SyntheticShapes
from .transforms import TrainTransform, rescale_size, resize

__all__ = ["DataError", "build_dataset", "head_classes", "mix_seed", "read_image", "rescale_size",
           "resize", "train_batches"]


def build_dataset(cfg, split: str):
    """The dataset of ``split`` ("train" or "val") described by the config's data section."""
    data = cfg.data
    name = data.train_split if split == "train" else data.val_split
    if data.dataset == "synthetic-shapes":
        syn = data.synthetic
        return SyntheticShapes(name, cfg.seed if syn.seed is None else syn.seed, syn.num_train if split == "train" else syn.num_val, syn.size,
                               syn.max_shapes, syn.noise)
    if data.dataset in ("ade20k", "ade20k-150"):
        return ade20k(data.root, name, reduce_zero_label=data.dataset == "ade20k-150")
    if data.dataset == "cityscapes":
        return cityscapes(data.root, name)
    return folder(data.root, name, data.num_classes, data.ignore_index)


def head_classes(num_classes: int, ignore_index: int) -> int:
    """Classes of the DDPS head's diffusion. Where the ignore value is a class (the original's
    0 = other) the diffusion treats it like any other; otherwise ignored pixels get an extra
    class K, which no loss and no metric counts."""
    return num_classes if 0 <= ignore_index < num_classes else num_classes + 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, position) pairs give
    unrelated generators."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


class _Samples(torch.utils.data.Dataset):
    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, position = key
        image, labels = self.dataset[index]
        g = torch.Generator().manual_seed(mix_seed(self.seed, position))
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


def train_batches(dataset, data_cfg, seed: int, batch: int, start: int, stop: int, rank: int = 0, world: int = 1):
    """Batches (images uint8 [b, 3, h, w], labels [b, h, w]) of steps start..stop-1; b = batch / world."""
    if batch % world:
        raise ValueError(f"batch size {batch} is not divisible by the {world} processes")
    samples = _Samples(dataset, TrainTransform(data_cfg, dataset.ignore_index), seed)
    return torch.utils.data.DataLoader(samples, batch_sampler=_Positions(len(dataset), seed, batch, start, stop, rank, world),
                                       num_workers=data_cfg.workers)
