import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddps.app import config
from ddps.app.data import DataError, build_dataset, rare_class_sampling, train_batches
from ddps.app.data.files import ade20k, bdd100k, cityscapes, folder, gta5, mapillary
from ddps.app.data.synthetic import SyntheticShapes, _stripes, generate
from ddps.app.data.transforms import hsv_to_rgb, photometric, random_crop, rescale_size, rgb_to_hsv


def smoke(*overrides):
    return config.load(None, ["data.synthetic.num_train=12", "data.synthetic.size=32", "data.scale=[32,32]",
                              "data.crop_size=[24,24]", "data.ratio_range=[0.75,1.5]", *overrides])


def test_synthetic_is_deterministic_by_seed():
    a = SyntheticShapes("training", 0, 4, 64, 4, 0.35)
    b = SyntheticShapes("training", 0, 4, 64, 4, 0.35)
    c = SyntheticShapes("training", 1, 4, 64, 4, 0.35)
    v = SyntheticShapes("validation", 0, 4, 64, 4, 0.35)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        assert not torch.equal(a[i][0], c[i][0]) and not torch.equal(a[i][0], v[i][0])
    image, mask = a[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and mask.shape == (64, 64)
    labels = torch.cat([a[i][1].flatten() for i in range(4)]).unique()
    assert labels.min() == 0 and labels.max() < SyntheticShapes.num_classes and len(labels) > 2


def test_synthetic_samples_are_cached_as_generated(monkeypatch):
    from ddps.app.data import synthetic
    ds = SyntheticShapes("training", 0, 3, 32, 4, 0.35)
    first = ds[1]
    first[0].zero_()
    first[1].fill_(5)  # a caller editing its sample in place
    calls = []
    monkeypatch.setattr(synthetic, "generate", lambda *a: calls.append(a))
    again = ds[1]
    assert not calls  # served from the cache
    image, mask = generate(0, "training", 1, 32, 4, 0.35)
    assert torch.equal(again[0], torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(again[1], torch.from_numpy(mask).long())
    monkeypatch.setattr(synthetic, "CACHE_BYTES", 3 * 32 * 32 * 4 - 1)
    assert SyntheticShapes("training", 0, 3, 32, 4, 0.35)._cache is None  # too big to keep


def _concat(batches):
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


def test_batches_are_a_function_of_the_step():
    cfg = smoke()
    ds = build_dataset(cfg, "train")
    whole = list(train_batches(ds, cfg.data, 7, 4, 0, 6))  # two epochs of 12 samples
    resumed = list(train_batches(ds, cfg.data, 7, 4, 0, 2)) + list(train_batches(ds, cfg.data, 7, 4, 2, 6))
    for (i1, l1), (i2, l2) in zip(whole, resumed):
        assert torch.equal(i1, i2) and torch.equal(l1, l2)
    assert whole[0][0].shape == (4, 3, 24, 24) and whole[0][1].shape == (4, 24, 24)
    assert not torch.equal(whole[0][0], whole[3][0])  # epoch 2 reshuffles and re-augments


def test_ranks_split_the_global_batch():
    cfg = smoke()
    ds = build_dataset(cfg, "train")
    single = list(train_batches(ds, cfg.data, 3, 4, 0, 3))
    ranks = [list(train_batches(ds, cfg.data, 3, 4, 0, 3, rank=r, world=2)) for r in range(2)]
    for step, (images, labels) in enumerate(single):
        for r in range(2):
            assert torch.equal(ranks[r][step][0], images[r::2]) and torch.equal(ranks[r][step][1], labels[r::2])
    with pytest.raises(ValueError, match="not divisible"):
        train_batches(ds, cfg.data, 3, 3, 0, 1, rank=0, world=2)


def test_rescale_size_keeps_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(1024, 2048, (2048, 512)) == (512, 1024)
    assert rescale_size(100, 100, (256, 128)) == (128, 128)


def test_hsv_round_trip_and_photometric():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 17, 9, generator=g)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)
    grey = torch.full((3, 4, 4), 0.5)
    assert torch.allclose(rgb_to_hsv(grey)[1], torch.zeros(4, 4))
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
    changed = [not torch.equal(photometric(image, torch.Generator().manual_seed(s)), image) for s in range(8)]
    assert any(changed)
    out = photometric(image, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == image.shape


def test_random_crop_respects_cat_max_ratio():
    mask = torch.zeros(40, 40, dtype=torch.long)
    mask[:, 30:] = 1  # only crops that reach x >= 30 hold two classes
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    for seed in range(20):
        _, crop = random_crop(image, mask, (10, 10), 255, 0.75, torch.Generator().manual_seed(seed))
        counts = torch.bincount(crop.flatten(), minlength=2)
        if counts.min() > 0:
            assert counts.max() / counts.sum() < 0.75
    # with the ratio check off, single-class crops come up
    singles = sum(int(random_crop(image, mask, (10, 10), 255, 1.0, torch.Generator().manual_seed(s))[1].unique().numel() == 1)
                  for s in range(20))
    assert singles > 0


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def _folder(tmp_path, mask_values=(0, 1, 2), size=(8, 6), mask_size=None, split="train"):
    rng = np.random.default_rng(0)
    _png(tmp_path / "images" / split / "a.png", rng.integers(0, 255, (*size, 3)))
    h, w = mask_size or size
    _png(tmp_path / "masks" / split / "a.png", np.resize(np.array(mask_values), (h, w)))
    return tmp_path


def test_folder_dataset(tmp_path):
    ds = folder(str(_folder(tmp_path, (0, 1, 2, 255))), "train", 3, 255)
    image, labels = ds[0]
    assert image.shape == (3, 8, 6) and set(labels.unique().tolist()) == {0, 1, 2, 255}
    assert torch.equal(ds.labels(0), labels)  # the mask alone, as rare-class sampling reads it


def test_mask_label_out_of_range_names_the_file(tmp_path):
    ds = folder(str(_folder(tmp_path, (0, 1, 7))), "train", 3, 255)
    with pytest.raises(DataError, match=r"masks/train/a.png: label values \[7\]"):
        ds[0]


def test_size_mismatch_names_the_files(tmp_path):
    ds = folder(str(_folder(tmp_path, mask_size=(4, 6))), "train", 3, 255)
    with pytest.raises(DataError, match="a.png: mask size 6x4 differs from image .*a.png size 6x8"):
        ds[0]


def test_corrupt_image_and_mask_name_the_file(tmp_path):
    root = _folder(tmp_path)
    (root / "images" / "train" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="images/train/a.png: cannot read image"):
        folder(str(root), "train", 3, 255)[0]
    root = _folder(tmp_path / "2")
    (root / "masks" / "train" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="masks/train/a.png: cannot read mask"):
        folder(str(root), "train", 3, 255)[0]
    root = _folder(tmp_path / "3")
    _png(root / "masks" / "train" / "a.png", np.zeros((8, 6, 3)))
    with pytest.raises(DataError, match="a.png: a mask must be a single-channel"):
        folder(str(root), "train", 3, 255)[0]


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DataError, match=f"image directory {tmp_path}/images/train does not exist"):
        folder(str(tmp_path), "train", 3, 255)
    (tmp_path / "images" / "train").mkdir(parents=True)
    _png(tmp_path / "images" / "train" / "b.png", np.zeros((4, 4, 3)))
    (tmp_path / "masks" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="b.png: no mask b.png"):
        folder(str(tmp_path), "train", 3, 255)
    cfg = config.load(None, ["data.dataset=ade20k", f"data.root={tmp_path}/nowhere"])
    with pytest.raises(DataError, match="nowhere/images/training does not exist"):
        build_dataset(cfg, "train")


def test_ade20k_variants(tmp_path):
    _png(tmp_path / "images" / "training" / "ADE_1.jpg", np.zeros((4, 4, 3)))
    _png(tmp_path / "annotations" / "training" / "ADE_1.png", np.resize(np.array([0, 1, 150]), (4, 4)))
    original = ade20k(str(tmp_path), "training", reduce_zero_label=False)
    reduced = ade20k(str(tmp_path), "training", reduce_zero_label=True)
    assert (original.num_classes, original.ignore_index, reduced.num_classes, reduced.ignore_index) == (151, 0, 150, 255)
    assert set(original[0][1].unique().tolist()) == {0, 1, 150}
    assert set(reduced[0][1].unique().tolist()) == {255, 0, 149}
    _png(tmp_path / "annotations" / "training" / "ADE_1.png", np.full((4, 4), 151))
    with pytest.raises(DataError, match=r"ADE_1.png: label values \[151\]"):
        original[0]


def test_cityscapes_labels(tmp_path):
    _png(tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_0_0_leftImg8bit.png", np.zeros((4, 4, 3)))
    _png(tmp_path / "gtFine" / "train" / "aachen" / "aachen_0_0_gtFine_labelTrainIds.png",
         np.resize(np.array([0, 18, 255]), (4, 4)))
    ds = cityscapes(str(tmp_path), "train")
    assert (ds.num_classes, ds.ignore_index) == (20, 0)
    assert set(ds[0][1].unique().tolist()) == {1, 19, 0}
    _png(tmp_path / "gtFine" / "train" / "aachen" / "aachen_0_0_gtFine_labelTrainIds.png", np.full((4, 4), 19))
    with pytest.raises(DataError, match=r"aachen_0_0_gtFine_labelTrainIds.png: label values \[19\]"):
        ds[0]


# Cityscapes' 19 classes by (label ID, train ID), and Mapillary Vistas v1.2's IDs of each, written
# out here as the domain-generalisation literature's conversion scripts list them
CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
              27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
MAPILLARY = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9, 27: 10,
             19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}


def _palette_png(path, array):
    # a palette PNG, as GTA5's and Mapillary's labels are: the pixel values are palette indices
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    image.putpalette(list(range(256)) * 3)
    image.save(path)


def _expected(raw, table):
    # ddps's Cityscapes convention: train ID + 1, 0 for everything ignored
    return np.vectorize(lambda v: table[v] + 1 if v in table else 0)(raw)


def test_gta5_maps_cityscapes_label_ids_to_train_ids(tmp_path):
    raw = np.arange(256).reshape(16, 16)
    _png(tmp_path / "images" / "00001.png", np.zeros((16, 16, 3)))
    _palette_png(tmp_path / "labels" / "00001.png", raw)
    for split in ("train", "val"):  # GTA5 has no split: each is all of it
        ds = build_dataset(config.load(None, ["data.dataset=gta5", f"data.root={tmp_path}"]), split)
        assert (ds.num_classes, ds.ignore_index, len(ds)) == (20, 0, 1)
        assert ds[0][1].dtype == torch.int64
        np.testing.assert_array_equal(ds[0][1].numpy(), _expected(raw, CITYSCAPES))
    assert ds.check_files() == []
    Image.fromarray(np.full((16, 16), 256, np.uint16)).save(tmp_path / "labels" / "00001.png")  # 16-bit
    with pytest.raises(DataError, match=r"labels/00001.png: label values \[256\] are not valid"):
        ds[0]
    _png(tmp_path / "images" / "00002.png", np.zeros((16, 16, 3)))
    with pytest.raises(DataError, match="images/00002.png: no mask 00002.png for this image"):
        gta5(str(tmp_path))
    with pytest.raises(DataError, match="GTA5 label directory .*/nowhere/labels does not exist"):
        (tmp_path / "nowhere" / "images").mkdir(parents=True)
        gta5(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("labels", ["validation/v1.2/labels", "validation/labels"])  # the v2.0 and v1.x downloads
def test_mapillary_maps_its_v1_2_classes_to_cityscapes(tmp_path, labels):
    raw = np.arange(66).reshape(6, 11)
    _png(tmp_path / "validation" / "images" / "x1.jpg", np.zeros((6, 11, 3)))
    _palette_png(tmp_path / labels / "x1.png", raw)
    ds = mapillary(str(tmp_path), "validation")
    assert (ds.num_classes, ds.ignore_index) == (20, 0)
    assert ds[0][1].dtype == torch.int64
    np.testing.assert_array_equal(ds[0][1].numpy(), _expected(raw, MAPILLARY))
    _palette_png(tmp_path / labels / "x1.png", np.full((6, 11), 66))  # a v2.0 label (124 classes)
    with pytest.raises(DataError, match=r"x1.png: label values \[66\] are not valid"):
        ds[0]


def test_bdd100k_reads_train_ids(tmp_path):
    raw = np.resize(np.array([0, 5, 18, 255]), (4, 4))
    _png(tmp_path / "images" / "val" / "7d2f.jpg", np.zeros((4, 4, 3)))
    _png(tmp_path / "labels" / "val" / "7d2f_train_id.png", raw)
    ds = bdd100k(str(tmp_path), "val")
    assert (ds.num_classes, ds.ignore_index) == (20, 0)
    np.testing.assert_array_equal(ds[0][1].numpy(), _expected(raw, {i: i for i in range(19)}))
    _png(tmp_path / "labels" / "val" / "7d2f_train_id.png", np.full((4, 4), 19))
    with pytest.raises(DataError, match=r"7d2f_train_id.png: label values \[19\]"):
        ds[0]
    (tmp_path / "labels" / "val" / "7d2f_train_id.png").rename(tmp_path / "labels" / "val" / "7d2f.png")
    with pytest.raises(DataError, match="7d2f.jpg: no mask 7d2f_train_id.png"):
        bdd100k(str(tmp_path), "val")


@pytest.mark.parametrize("dataset,split,missing", [
    ("gta5", "val", ["GTA5 image directory {root}/images", "GTA5 label directory {root}/labels"]),
    ("mapillary", "validation", ["Mapillary image directory {root}/validation/images",
                                 "Mapillary label directory {root}/validation/labels"]),
    ("bdd100k", "val", ["BDD100K image directory {root}/images/val", "BDD100K label directory {root}/labels/val"]),
    ("cityscapes", "val", ["Cityscapes image directory {root}/leftImg8bit/val",
                           "Cityscapes annotation directory {root}/gtFine/val"]),
])
def test_a_missing_folder_of_a_published_layout_is_named(tmp_path, dataset, split, missing):
    cfg = config.load(None, [f"data.dataset={dataset}", f"data.root={tmp_path}", f"data.val_split={split}"])
    for i, message in enumerate(missing):  # the images' folder, then (with it made) the labels'
        with pytest.raises(DataError, match=re.escape(message.format(root=tmp_path) + " does not exist")):
            build_dataset(cfg, "val")
        Path(message.format(root=tmp_path).split(" directory ")[1]).mkdir(parents=True)


@pytest.mark.parametrize("split,domain,digest", [
    ("validation", 0, "e2c3492856761d0dbd6600e36a44bd14456008bf073126fb68976f618b2fd31d"),
    ("validation", 1, "b5aec0dea814ec5b13f14e2e21f4db68c4774cb72e41239382f7957d32b02e77"),
    ("other", 0, "5b32a3af03c944ab47240ff5bb36b64c69dc3b8e8318fbb6243b3b1e88b15140")])  # a split of no name
def test_synthetic_images_stay_those_the_published_figures_were_computed_on(split, domain, digest):
    # every figure of the docs and benchmarks/ came from these images: a change to the generator
    # (its draws, their order, a range) changes the data, not only these bytes
    h = hashlib.sha256()
    for index in range(3):
        for array in generate(0, split, index, 48, 4, 0.35, domain):
            h.update(array.tobytes())
    assert h.hexdigest() == digest


def test_the_shifted_synthetic_domain_keeps_shapes_and_changes_colours_and_texture():
    for index in range(3):
        _, mask0 = generate(0, "validation", index, 64, 4, 0.0)
        image, mask = generate(0, "validation", index, 64, 4, 0.0, domain=1)
        assert not np.array_equal(mask, mask0)  # its own images
        assert set(np.unique(mask)) <= set(range(len(SyntheticShapes.class_names))) and len(np.unique(mask)) > 1
        # without noise, every region is one colour, background and shapes in [0.25, 0.75] (domain
        # 0: a background in [0.2, 0.8], shapes anywhere in [0, 1])
        background = image[mask == 0]
        assert (background == background[0]).all()
        assert int(0.25 * 255) <= image.min() and image.max() <= 0.75 * 255
    # the texture: a sine wave of a random direction in [0, pi) and period in [4, 12) pixels, its
    # gain per channel in [0.5, 1), plus uniform noise of unit variance, both x 0.6 x amplitude
    for seed in range(3):
        draws = np.random.default_rng(seed)
        angle, period, gains = draws.uniform(0, np.pi), draws.uniform(4, 12), draws.uniform(0.5, 1, 3)
        noise = draws.uniform(-np.sqrt(3), np.sqrt(3), (20, 20, 3))
        y, x = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
        wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
        expected = 0.7 * (0.6 * wave[:, :, None] * gains + 0.6 * noise)
        np.testing.assert_allclose(_stripes(np.random.default_rng(seed), 20, 0.7), expected, rtol=1e-12, atol=1e-12)
    cfg = config.load(None, ["data.synthetic.domain=1", "data.synthetic.num_val=2", "data.synthetic.size=32"])
    ds = build_dataset(cfg, "val")
    train = build_dataset(cfg, "train")
    assert (ds.split, ds.domain, len(ds), train.split, len(train)) == ("validation", 1, 2, "training", 512)
    assert (ds.seed, build_dataset(config.load(None, ["data.synthetic.seed=5"]), "val").seed) == (0, 5)
    assert ds.name(1) == "synthetic-validation-00001-domain1"
    assert SyntheticShapes("validation", 0, 2, 32, 4, 0.35).name(1) == "synthetic-validation-00001"
    assert torch.equal(ds[0][0], torch.from_numpy(generate(0, "validation", 0, 32, 4, 0.35, 1)[0]).permute(2, 0, 1))


class _Labels(torch.utils.data.Dataset):
    """Images of zeros with the given label maps (3 classes, ignore 255)."""
    num_classes, ignore_index, class_names = 3, 255, ("a", "b", "c")

    def __init__(self, maps):
        self.maps = [torch.as_tensor(m) for m in maps]

    def __len__(self):
        return len(self.maps)

    def labels(self, index):
        return self.maps[index]

    def __getitem__(self, index):
        m = self.maps[index]
        return torch.zeros(3, *m.shape, dtype=torch.uint8), m


def _map(counts, size=(10, 10)):
    """A label map with counts[c] pixels of class c, the rest ignored."""
    flat = torch.full((size[0] * size[1],), 255)
    start = 0
    for c, n in enumerate(counts):
        flat[start:start + n] = c
        start += n
    return flat.view(size)


def test_rare_class_probabilities_and_pools_by_their_formula():
    """DAFormer's: p_c = softmax_c((1 - n_c / N) / T) over the classes present (N: the labelled
    pixels of the training set; ignore and absent classes not counted); the pool of c: the images
    with more than min_pixels pixels of c."""
    from ddps.app.data.rcs import RareClassSampling
    ds = _Labels([_map((60, 5, 0)), _map((30, 0, 0)), _map((10, 2, 0))])
    rcs = RareClassSampling(ds, 0.05, 4, 0.5)
    assert rcs.classes.tolist() == [0, 1]
    n = torch.tensor([100.0, 7.0], dtype=torch.float64)
    logits = (1 - n / 107) / 0.05
    torch.testing.assert_close(rcs.probs, logits.exp() / logits.exp().sum())
    assert [p.tolist() for p in rcs.images] == [[0, 1, 2], [0]] and rcs.threshold == 2.0
    ignore_is_k = _Labels([_map((50, 5, 0))])  # a dataset whose ignore value is K = 3 (ade20k-150's kind)
    ignore_is_k.ignore_index = 3
    ignore_is_k.maps[0][ignore_is_k.maps[0] == 255] = 3
    assert RareClassSampling(ignore_is_k, 0.05, 4, 0.5).classes.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"data.rcs_min_pixels: 5: no training image has more than that many "
                                        r"pixels of class b; lower it, or turn data.rcs off"):
        RareClassSampling(ds, 0.05, 5, 0.5)
    with pytest.raises(DataError, match=r"pixels of classes a, b; lower it"):
        RareClassSampling(ds, 0.05, 60, 0.5)


def test_rare_class_draws_follow_their_distribution():
    """10000 draws from a fixed seed: each class's count within 4.5 standard deviations of its
    binomial mean, and the image uniform over the class's pool (a chi-square bound)."""
    from ddps.app.data.rcs import RareClassSampling
    ds = _Labels([_map((60, 5, 20)), _map((30, 0, 40)), _map((10, 6, 30)), _map((80, 0, 0))])
    rcs = RareClassSampling(ds, 0.2, 4, 0.5)
    g = torch.Generator().manual_seed(0)
    draws = [rcs.draw(g) for _ in range(10000)]
    classes = torch.tensor([c for c, _ in draws])
    for j, c in enumerate(rcs.classes.tolist()):
        p = float(rcs.probs[j])
        count = int((classes == c).sum())
        assert abs(count - 10000 * p) < 4.5 * (10000 * p * (1 - p)) ** 0.5, (c, count, p)
        images = torch.tensor([i for k, i in draws if k == c])
        pool = rcs.images[j].tolist()
        assert set(images.tolist()) == set(pool)
        observed = torch.bincount(images, minlength=4)[pool].double()
        expected = count / len(pool)
        assert ((observed - expected) ** 2 / expected).sum() < 20  # chi-square, <= 3 dof: p < 2e-4


def test_rare_class_sampling_recrops_until_the_class_is_in_the_crop():
    """The drawn image's augmentation is redrawn, at most 10 more times, until the crop holds
    more than min_pixels * min_crop_ratio pixels of the class; the stream stays a function of
    (seed, position)."""
    from ddps.app.data.rcs import RareClassSampling
    label = torch.zeros(32, 32, dtype=torch.long)
    label[:12, :12] = 1  # 144 pixels of class 1 in a corner
    ds = _Labels([label])
    rcs = RareClassSampling(ds, 1e-3, 30, 0.5)  # class 1 is rare: drawn nearly always
    calls = []

    def crop(image, labels, g):  # an 8x8 crop at a random place
        y, x = (int(v) for v in torch.randint(0, 25, (2,), generator=g))
        calls.append((y, x))
        return image[:, y:y + 8, x:x + 8], labels[y:y + 8, x:x + 8]

    got = []
    for seed in range(40):
        calls.clear()
        g = torch.Generator().manual_seed(seed)
        c, _ = rcs.draw(torch.Generator().manual_seed(seed))
        _, labels = rcs.sample(ds, crop, g)
        assert 1 <= len(calls) <= 11
        enough = int((labels == c).sum()) > 15
        assert enough or len(calls) == 11  # stopped at the first crop with enough, or ran out
        if len(calls) < 11:
            assert all(int((ds.maps[0][y:y + 8, x:x + 8] == c).sum()) <= 15 for y, x in calls[:-1])
        got.append(enough)
    # a function of its generator alone: the global RNG moved in between changes nothing
    for seed in range(20):
        torch.manual_seed(seed)
        first = rcs.sample(ds, crop, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed + 100)
        assert torch.equal(first[1], rcs.sample(ds, crop, torch.Generator().manual_seed(seed))[1])
    one = sum(int((label[y:y + 8, x:x + 8] == 1).sum()) > 15 for y in range(25) for x in range(25)) / 625
    assert sum(got) / 40 > 3 * one  # re-cropping finds the corner far more often than one crop does
    cfg = smoke("data.rcs=true", "data.rcs_min_pixels=10")
    whole = build_dataset(cfg, "train")
    sampling = rare_class_sampling(whole, cfg.data)
    assert rare_class_sampling(whole, smoke().data) is None and sampling.threshold == 5.0
    a = list(train_batches(whole, cfg.data, 7, 4, 0, 3, rcs=sampling))
    b = list(train_batches(whole, cfg.data, 7, 4, 1, 3, rcs=sampling))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a[1:], b))
