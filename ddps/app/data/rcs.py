"""Rare-class sampling (DAFormer's, which DIFF trains with; ``data.rcs``): each training sample
draws a class c with probability softmax((1 - f_c) / T) over the classes present, f_c the class's
share of the training labels' pixels and T ``data.rcs_class_temp``; then, uniformly, an image with
more than ``data.rcs_min_pixels`` pixels of c; then its augmentation, redrawn up to 10 more times
until the crop holds more than ``rcs_min_pixels * rcs_min_crop_ratio`` pixels of c."""
from __future__ import annotations

import torch

from .files import DataError

RETRIES = 10  # DAFormer's: more crops of the drawn image, at most


class RareClassSampling:
    def __init__(self, dataset, class_temp: float, min_pixels: int, min_crop_ratio: float):
        k = dataset.num_classes
        counts = torch.stack([torch.bincount(_valid(dataset.labels(i), k), minlength=k) for i in range(len(dataset))])
        total = counts.sum(0)
        self.classes = total.nonzero().flatten()
        share = total[self.classes].double() / total.sum()
        self.probs = torch.softmax((1 - share) / class_temp, 0)
        self.images = [(counts[:, c] > min_pixels).nonzero().flatten() for c in self.classes.tolist()]
        empty = [c for c, pool in zip(self.classes.tolist(), self.images) if not len(pool)]
        if empty:
            names = ", ".join(dataset.class_names[c] for c in empty)
            raise DataError(f"data.rcs_min_pixels: {min_pixels}: no training image has more than that many pixels "
                            f"of class{'es' if len(empty) > 1 else ''} {names}; lower it, or turn data.rcs off")
        self.threshold = min_pixels * min_crop_ratio

    def draw(self, g: torch.Generator) -> tuple[int, int]:
        """(class, image index) of one sample."""
        j = int(torch.multinomial(self.probs, 1, generator=g))
        pool = self.images[j]
        return int(self.classes[j]), int(pool[torch.randint(len(pool), (1,), generator=g)])

    def sample(self, dataset, transform, g: torch.Generator):
        """One training sample (image, labels) by rare-class sampling."""
        c, index = self.draw(g)
        image, labels = dataset[index]
        out = transform(image, labels, g)
        for _ in range(RETRIES):
            if int((out[1] == c).sum()) > self.threshold:
                break
            out = transform(image, labels, g)
        return out


def _valid(labels: torch.Tensor, k: int) -> torch.Tensor:
    labels = labels.flatten()
    return labels[(labels >= 0) & (labels < k)]
