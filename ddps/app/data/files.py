"""Datasets read from image/mask files: ADE20K (ADEChallengeData2016), Cityscapes, the
domain-generalisation sets mapped to Cityscapes' classes (GTA5, Mapillary Vistas, BDD100K) and a
generic folder layout. Every read error names the file."""
from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..schema import DATASETS, ConfigError, option

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    pass


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W]."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _header(path: Path, what: str):
    """((width, height), mode) of an image file and None, or None and the problem; reads the
    header, and verifies the checksums of formats that have them (PNG)."""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()
    except (OSError, ValueError, SyntaxError) as e:
        return None, f"{path}: cannot read {what} ({e})"
    return (size, mode), None


MASK_MODES = ("L", "P", "I", "I;16")


def _mode_problem(path: Path, mode: str) -> str:
    return f"{path}: a mask must be a single-channel or palette image, got mode {mode}"


def _size_problem(mask_path: Path, mask_size, image_path: Path, image_size) -> str:
    """Sizes as (width, height)."""
    return (f"{mask_path}: mask size {mask_size[0]}x{mask_size[1]} differs from image {image_path} "
            f"size {image_size[0]}x{image_size[1]}")


def read_mask(path: Path) -> np.ndarray:
    """Raw label values [H, W] (a single-channel or palette PNG)."""
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise DataError(_mode_problem(path, im.mode))
            return np.asarray(im).astype(np.int64)
    except (OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None


def _files(directory: Path, what: str) -> list[Path]:
    if not directory.is_dir():
        raise DataError(f"{what} directory {directory} does not exist")
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


class FileDataset(torch.utils.data.Dataset):
    """Pairs (image, mask) of files. ``label_map`` turns raw mask values into training labels;
    raw values outside ``valid`` are an error naming the mask file."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, ignore_index: int, valid, label_map,
                 class_names=None):
        if not pairs:
            raise DataError("the dataset has no image/mask pairs")
        self.pairs = pairs
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.valid, self.label_map = valid, label_map
        self.class_names = class_names or tuple(str(i) for i in range(num_classes))

    def __len__(self):
        return len(self.pairs)

    def name(self, index: int) -> str:
        return self.pairs[index][0].stem

    def check_files(self) -> list[str]:
        """The problems of its files, without decoding them: each image and mask opens (PNG's
        checksums hold), a mask is single-channel or a palette, and has its image's size."""
        problems = []
        for image_path, mask_path in self.pairs:
            image, image_problem = _header(image_path, "image")
            mask, mask_problem = _header(mask_path, "mask")
            problems += [p for p in (image_problem, mask_problem) if p]
            if mask is None:
                continue
            if mask[1] not in MASK_MODES:
                problems.append(_mode_problem(mask_path, mask[1]))
            elif image is not None and mask[0] != image[0]:
                problems.append(_size_problem(mask_path, mask[0], image_path, image[0]))
        return problems

    def labels(self, index: int) -> torch.Tensor:
        """The training labels of ``index`` alone (its mask read, its image not)."""
        return torch.from_numpy(self._labels(read_mask(self.pairs[index][1]), self.pairs[index][1]))

    def _labels(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        bad = ~self.valid(raw)
        if bad.any():
            values = np.unique(raw[bad])[:5].tolist()
            raise DataError(f"{mask_path}: label values {values} are not valid for this dataset "
                            f"({self.num_classes} classes, ignore value {self.ignore_index})")
        return self.label_map(raw)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_mask(mask_path)
        if raw.shape != tuple(image.shape[1:]):
            raise DataError(_size_problem(mask_path, raw.shape[::-1], image_path, image.shape[:0:-1]))
        return image, torch.from_numpy(self._labels(raw, mask_path))


def _pair_by_stem(images: list[Path], masks: list[Path], mask_suffix: str, image_suffix: str = "") -> list:
    by_stem = {m.name[: -len(mask_suffix)] if mask_suffix else m.stem: m for m in masks}
    pairs = []
    for image in images:
        stem = image.name[: -len(image_suffix)] if image_suffix else image.stem
        mask = by_stem.get(stem)
        if mask is None:
            raise DataError(f"{image}: no mask {stem}{mask_suffix or '.png'} for this image")
        pairs.append((image, mask))
    return pairs


def ade20k(root: str, split: str, reduce_zero_label: bool) -> FileDataset:
    """ADEChallengeData2016: images/<split>/*.jpg, annotations/<split>/*.png (0 = other, 1..150).
    The original's variant keeps 0 as class "other" (K = 151, ignored by the loss); the standard
    one reduces it (K = 150, 0 -> ignore 255)."""
    base = Path(root)
    images = _files(base / "images" / split, "ADE20K image")
    masks = _files(base / "annotations" / split, "ADE20K annotation")
    pairs = _pair_by_stem(images, masks, "")
    valid = lambda raw: raw <= 150  # noqa: E731
    if reduce_zero_label:
        return FileDataset(pairs, 150, 255, valid, lambda raw: np.where(raw == 0, 255, raw - 1))
    return FileDataset(pairs, 151, 0, valid, lambda raw: raw)


def cityscapes(root: str, split: str) -> FileDataset:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png;
    the original's labels: trainId + 1, 255 -> 0 (K = 20, 0 ignored by the loss)."""
    base = Path(root)
    images = [p for p in _files(base / "leftImg8bit" / split, "Cityscapes image") if p.name.endswith("_leftImg8bit.png")]
    masks = [p for p in _files(base / "gtFine" / split, "Cityscapes annotation")
             if p.name.endswith("_gtFine_labelTrainIds.png")]
    pairs = _pair_by_stem(images, masks, "_gtFine_labelTrainIds.png", "_leftImg8bit.png")
    return FileDataset(pairs, 20, 0, _train_ids, _cityscapes_labels)


# Cityscapes' label IDs of its 19 training classes, in train ID order (cityscapesScripts' labels.py)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# Mapillary Vistas v1.2's class IDs that the domain-generalisation literature maps to each of
# Cityscapes' train IDs (road: road, lane marking, manhole; sidewalk: curb, sidewalk; rider: the
# three rider classes); its other classes are ignored
MAPILLARY_IDS = ((13, 24, 41), (2, 15), (17,), (6,), (3,), (45, 47), (48,), (50,), (30,), (29,), (27,), (19,),
                 (20, 21, 22), (55,), (61,), (54,), (58,), (57,), (52,))
MAPILLARY_CLASSES = 66


def _train_ids(raw: np.ndarray) -> np.ndarray:
    """Which raw values are Cityscapes train IDs (0..18, 255 = ignored): the masks of ``cityscapes``
    and ``bdd100k``."""
    return (raw <= 18) | (raw == 255)


def _cityscapes_labels(train_ids: np.ndarray) -> np.ndarray:
    """Train IDs (0..18, anything else ignored) as ddps's Cityscapes labels: train ID + 1, 0 ignored
    (the original's convention, K = 20)."""
    return np.where(train_ids <= 18, train_ids + 1, 0)


def _lookup(table: dict[int, int], size: int):
    """raw label -> Cityscapes label (0 = ignored for every raw value the table does not list)."""
    lut = np.zeros(size, np.int64)
    for raw, train_id in table.items():
        lut[raw] = train_id + 1
    return lambda raw: lut[raw]


def gta5(root: str) -> FileDataset:
    """GTA5 as published: images/*.png with labels/*.png holding Cityscapes' label IDs, mapped to
    its 19 train IDs (as ``cityscapes``: + 1, 0 ignored). GTA5 has no split: every split is all
    of it."""
    base = Path(root)
    pairs = _pair_by_stem(_files(base / "images", "GTA5 image"), _files(base / "labels", "GTA5 label"), "")
    to_train = _lookup(dict(zip(CITYSCAPES_LABEL_IDS, range(19))), 256)
    return FileDataset(pairs, 20, 0, lambda raw: raw <= 255, to_train)


def mapillary(root: str, split: str) -> FileDataset:
    """Mapillary Vistas as published: <split>/images/*.jpg with <split>/v1.2/labels/*.png (the v2.0
    download; the v1.x one has them in <split>/labels), v1.2's 66 class IDs mapped to Cityscapes'
    19 classes (as ``cityscapes``: train ID + 1, 0 ignored)."""
    base = Path(root) / split
    labels = base / "v1.2" / "labels"
    pairs = _pair_by_stem(_files(base / "images", "Mapillary image"),
                          _files(labels if labels.is_dir() else base / "labels", "Mapillary label"), "")
    to_train = _lookup({raw: train_id for train_id, ids in enumerate(MAPILLARY_IDS) for raw in ids}, MAPILLARY_CLASSES)
    return FileDataset(pairs, 20, 0, lambda raw: raw < MAPILLARY_CLASSES, to_train)


def bdd100k(root: str, split: str) -> FileDataset:
    """BDD100K's segmentation set as published (bdd100k/seg): images/<split>/*.jpg with
    labels/<split>/*_train_id.png holding Cityscapes' train IDs (as ``cityscapes``: + 1, 255 -> 0)."""
    base = Path(root)
    pairs = _pair_by_stem(_files(base / "images" / split, "BDD100K image"),
                          _files(base / "labels" / split, "BDD100K label"), "_train_id.png")
    return FileDataset(pairs, 20, 0, _train_ids, _cityscapes_labels)


def folder(root: str, split: str, num_classes: int, ignore_index: int | None) -> FileDataset:
    """images/<split>/<name>.<ext> with masks/<split>/<name>.png holding labels 0..K-1 (and the
    ignore value, if any)."""
    base = Path(root)
    images = _files(base / "images" / split, "image")
    masks = _files(base / "masks" / split, "mask")
    pairs = _pair_by_stem(images, masks, "")
    ignore = 255 if ignore_index is None else ignore_index
    valid = lambda raw: (raw >= 0) & (raw < num_classes) | (raw == ignore)  # noqa: E731
    return FileDataset(pairs, num_classes, ignore, valid, lambda raw: raw)


def _split(cfg, split: str) -> str:
    return cfg.data.train_split if split == "train" else cfg.data.val_split


@dataclass
class FolderOptions:
    num_classes: int | None = option(None, minimum=2)  # its number of classes (required)
    # the mask value of unlabelled pixels, if any (null: 255)
    ignore_index: int | None = option(None, minimum=0, maximum=65535)


def _folder_classes(cfg) -> tuple[int, int]:
    return cfg.data.num_classes, 255 if cfg.data.ignore_index is None else cfg.data.ignore_index


def _check_folder(cfg) -> None:
    if cfg.data.num_classes is None:
        raise ConfigError("data.num_classes: the folder dataset needs its number of classes")


DATASETS.register("ade20k", lambda cfg, split: ade20k(cfg.data.root, _split(cfg, split), reduce_zero_label=False),
                  classes=lambda cfg: (151, 0), needs_root=True)
DATASETS.register("ade20k-150", lambda cfg, split: ade20k(cfg.data.root, _split(cfg, split), reduce_zero_label=True),
                  classes=lambda cfg: (150, 255), needs_root=True)
DATASETS.register("cityscapes", lambda cfg, split: cityscapes(cfg.data.root, _split(cfg, split)),
                  classes=lambda cfg: (20, 0), needs_root=True)
DATASETS.register("gta5", lambda cfg, split: gta5(cfg.data.root), classes=lambda cfg: (20, 0), needs_root=True)
DATASETS.register("mapillary", lambda cfg, split: mapillary(cfg.data.root, _split(cfg, split)),
                  classes=lambda cfg: (20, 0), needs_root=True)
DATASETS.register("bdd100k", lambda cfg, split: bdd100k(cfg.data.root, _split(cfg, split)),
                  classes=lambda cfg: (20, 0), needs_root=True)
DATASETS.register("folder", lambda cfg, split: folder(cfg.data.root, _split(cfg, split), *_folder_classes(cfg)),
                  FolderOptions, _check_folder, classes=_folder_classes, needs_root=True)
