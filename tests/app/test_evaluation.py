import math

import numpy as np
import pytest
import torch

from ddps.app.evaluation import Metrics, panel


def naive_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of mask with a non-mask pixel or the outside of the image within Chebyshev distance d."""
    h, w = mask.shape
    band = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            y0, y1, x0, x1 = y - d, y + d + 1, x - d, x + d + 1
            if y0 < 0 or x0 < 0 or y1 > h or x1 > w or not mask[y0:y1, x0:x1].all():
                band[y, x] = True
    return band


def naive_metrics(preds, gts, k, ignore, dilation):
    inter, union, b_inter, b_union = (np.zeros(k) for _ in range(4))
    correct = total = 0
    for p, g in zip(preds, gts):
        valid = g != ignore
        if 0 <= ignore < k:
            valid &= p != ignore
        d = max(1, round(dilation * math.hypot(*g.shape)))
        correct += (p[valid] == g[valid]).sum()
        total += valid.sum()
        for c in range(k):
            pm, gm = (p == c) & valid, (g == c) & valid
            inter[c] += (pm & gm).sum()
            union[c] += (pm | gm).sum()
            pb, gb = naive_band(pm, d), naive_band(gm, d)
            b_inter[c] += (pb & gb).sum()
            b_union[c] += (pb | gb).sum()
    counted = union > 0
    if 0 <= ignore < k:
        counted[ignore] = False
    miou = 100 * np.mean(inter[counted] / union[counted])
    bcounted = counted & (b_union > 0)
    mbiou = 100 * np.mean(b_inter[bcounted] / b_union[bcounted])
    return miou, mbiou, 100 * correct / total


@pytest.mark.parametrize("k, ignore", [(4, 255), (5, 0)])
def test_metrics_match_a_direct_computation(k, ignore):
    g = torch.Generator().manual_seed(k)
    gts, preds = [], []
    for h, w in ((20, 24), (17, 13)):
        gt = torch.randint(0, k, (h // 4 + 1, w // 4 + 1), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w]
        pred = torch.where(torch.rand(h, w, generator=g) < 0.8, gt, torch.randint(0, k, (h, w), generator=g))
        gt[0, :5] = ignore
        gts.append(gt)
        preds.append(pred)
    metrics = Metrics(k, ignore, 0.05)
    for p, gt in zip(preds, gts):
        metrics.update(p, gt)
    result = metrics.result()
    miou, mbiou, aacc = naive_metrics([p.numpy() for p in preds], [x.numpy() for x in gts], k, ignore, 0.05)
    assert result["mIoU"] == pytest.approx(miou, abs=0.006)
    assert result["mBIoU"] == pytest.approx(mbiou, abs=0.006)
    assert result["aAcc"] == pytest.approx(aacc, abs=0.006)
    assert len(result["IoU"]) == k
    if ignore == 0:
        assert result["IoU"][0] is None


def test_perfect_and_disjoint_predictions():
    gt = torch.zeros(16, 16, dtype=torch.long)
    gt[4:12, 4:12] = 1
    m = Metrics(2, 255, 0.02)
    m.update(gt.clone(), gt)
    assert (m.result()["mIoU"], m.result()["mBIoU"], m.result()["aAcc"]) == (100.0, 100.0, 100.0)
    m = Metrics(2, 255, 0.02)
    m.update(1 - gt, gt)
    assert (m.result()["mIoU"], m.result()["aAcc"]) == (0.0, 0.0)


def test_per_step_outputs_come_from_their_step():
    # "step 9" used to hold step 9's logits only when every collect step ran; now each key is the
    # step its logits come from.
    from ddps.app import evaluation
    from ddps.nn import DDPSHead
    torch.manual_seed(0)
    head = DDPSHead(num_classes=4, cond_channels=3, dim=8, out_dim=8, dim_mults=(1,), embed_dim=4, num_timesteps=10,
                    inference_steps=4, collect_timesteps=(0, 4, 9)).eval()

    def segmentor(images):
        return torch.randn(images.shape[0], 3, 4, 4), torch.randn(images.shape[0], 4, 4, 4)
    out = evaluation._forward(segmentor, head, torch.zeros(1, 3, 16, 16), 4)
    assert sorted(out) == ["base", "final", "step 0", "step 4", "step 9"]
    assert torch.equal(out["step 9"], out["final"]) and not torch.equal(out["step 4"], out["final"])


def test_panel_titles_each_column():
    tiles = [np.full((20, w, 3), v, np.uint8) for w, v in ((40, 200), (30, 120), (50, 60))]
    image = np.asarray(panel(tiles, ["image", "", "truth"]))
    strip = image.shape[0] - 20
    assert image.shape == (strip + 20, 120, 3) and strip > 0
    np.testing.assert_array_equal(image[strip:], np.concatenate(tiles, axis=1))  # the tiles, untouched
    inked = [(image[:strip, x0:x1] < 128).any() for x0, x1 in ((0, 40), (40, 70), (70, 120))]
    assert inked == [True, False, True]  # a title over each titled column, in its own column


def test_odd_feature_sizes_are_padded_for_the_denoiser():
    # a 51x64 image gives 13x16 features; the denoiser (two levels) takes even sizes only
    from ddps.app.evaluation import _forward
    from ddps.nn import DDPSHead

    head = DDPSHead(num_classes=5, cond_channels=4, dim=8, out_dim=8, dim_mults=(1, 2), embed_dim=4,
                    num_timesteps=10, inference_steps=2, collect_timesteps=(0, 5, 9), guidance_scale=0.4).eval()
    features = torch.randn(1, 4, 13, 16)

    def segmentor(images):
        return features, None

    torch.manual_seed(0)
    out = _forward(segmentor, head, torch.zeros(1, 3, 51, 64), 5)
    assert set(out) == {"final", "step 0", "step 5", "step 9"}
    assert all(v.shape == (1, 5, 51, 64) for v in out.values())
    # the head ran on the features padded with their edge values, and its logits were cropped back
    torch.manual_seed(0)
    final, _ = head.sample(torch.nn.functional.pad(features, (0, 0, 0, 1), mode="replicate"))
    expected = torch.nn.functional.interpolate(final[:, :, :13], size=(51, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["final"], expected)


class _TinySegmentor(torch.nn.Module):
    """Features at 1/4 resolution and logits, as the segmentor protocol gives them."""

    def __init__(self, k):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 4, 4, stride=4)
        self.classifier = torch.nn.Conv2d(4, k, 1)

    def forward(self, images):
        f = self.features(images.float() / 255)
        return f, self.classifier(f)


class _TinySet:
    num_classes, ignore_index = 5, 255

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
                       torch.randint(0, 5, (32, 32), generator=g)) for _ in range(3)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_eval_reports_the_fp32_run_and_the_label_agreement(dtype):
    from ddps.app import evaluation
    from ddps.app.config import Config
    from ddps.nn import DDPSHead

    cfg = Config()
    cfg.data.scale = [32, 32]
    torch.manual_seed(0)
    segmentor = _TinySegmentor(5).eval()
    head = DDPSHead(num_classes=5, cond_channels=4, dim=8, out_dim=8, dim_mults=(1, 2), embed_dim=4, num_timesteps=10,
                    inference_steps=2, collect_timesteps=(0, 5, 9), guidance_scale=0.4, backend="auto").eval()
    data = _TinySet()
    plain = evaluation.evaluate(cfg, segmentor, head, data)
    cfg.eval.dtype = dtype
    report = evaluation.evaluate(cfg, segmentor, head, data)
    assert "agreement_with_fp32" not in plain["ddps"]
    # The float32 run inside the low-precision evaluation draws what a float32 evaluation draws.
    assert report["ddps"]["fp32_final"] == plain["ddps"]["final"] and report["ddps"]["dtype"] == dtype
    # The agreement, recomputed image by image from the same random states.
    torch.manual_seed(cfg.seed)
    agree = total = 0
    for image, _ in data.items:
        with torch.random.fork_rng():
            fp32 = evaluation.predict(segmentor, head, image, cfg, 5, "fp32")["final"].argmax(0)
        low = evaluation.predict(segmentor, head, image, cfg, 5)["final"].argmax(0)
        agree, total = agree + int((low == fp32).sum()), total + fp32.numel()
    assert report["ddps"]["agreement_with_fp32"] == pytest.approx(100 * agree / total)
    text = evaluation.table(report)
    assert f"ddps final {dtype}" in text and "ddps final fp32" in text and "equal to the fp32 run's" in text


def test_a_head_s_parts_are_scored_beside_it():
    # GSS's pixel branch: its logits resized to the image as the final scores are, and its own row
    from ddps import maskige
    from ddps.app import evaluation
    from ddps.app.config import Config
    from ddps.nn.gss import FrozenFeatureConditioning, GSSHead
    from ddps.nn.vq import MaskigeVQ

    cfg = Config()
    cfg.data.scale = [32, 32]
    torch.manual_seed(0)
    segmentor = _TinySegmentor(5).eval()
    head = GSSHead(5, MaskigeVQ(codes=16, dim=8, channels=16), maskige.palette(5),
                   FrozenFeatureConditioning(4, 16, 5, dim=8)).eval()
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = evaluation._forward(segmentor, head, image, 5)
    assert sorted(out) == ["base", "final", "part pixel branch"]
    pixels = head.conditioning.aux(segmentor(image)[0])
    expected = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["part pixel branch"], expected)
    data = _TinySet()
    report = evaluation.evaluate(cfg, segmentor, head, data)
    metrics = Metrics(5, 255, cfg.eval.boundary_dilation)
    for image, gt in data.items:
        metrics.update(evaluation.predict(segmentor, head, image, cfg, 5)["part pixel branch"].argmax(0), gt)
    assert report["gss"]["parts"] == {"pixel branch": metrics.result()}
    assert report["gss"]["parts"]["pixel branch"] != report["gss"]["final"]
    assert "gss pixel branch" in evaluation.table(report)
    # a head without parts reports none
    ddps = _small_ddps_head()
    assert "parts" not in evaluation.evaluate(cfg, segmentor, ddps, data)["ddps"]


def _small_ddps_head(k=5):
    from ddps.nn import DDPSHead
    return DDPSHead(num_classes=k, cond_channels=4, dim=8, out_dim=8, dim_mults=(1, 2), embed_dim=4, num_timesteps=10,
                    inference_steps=2, collect_timesteps=(0, 9)).eval()


def test_rows_and_panel_columns_come_in_reading_order():
    from ddps.app import evaluation
    names = ["final", "part pixel branch", "step 10", "step 0", "base"]
    ordered = sorted(names, key=evaluation._order)
    assert ordered == ["base", "step 0", "step 10", "part pixel branch", "final"]
    assert [evaluation._title(n) for n in ordered] == ["segmentor", "step 0", "step 10", "pixel branch", "final"]
    r = {"mIoU": 1.0, "mBIoU": 2.0, "aAcc": 3.0}
    ddps = {"base": r, "ddps": {"final": r, "steps": {"0": r, "9": r}}}
    gss = {"gss": {"final": r, "steps": {}, "parts": {"pixel branch": r}}, "prior": {"reconstruction": r}}
    labels = lambda report: [line[:16].strip() for line in evaluation.table(report).splitlines()[1:]]  # noqa: E731
    assert labels(ddps) == ["segmentor", "ddps step 0", "ddps step 9", "ddps final"]
    assert labels(gss) == ["gss pixel branch", "gss final", "gss prior"]
    assert evaluation.table(gss).splitlines()[1].split()[-3:] == ["1.00", "2.00", "3.00"]
    # the segmentor alone (eval --base-only): its row under the header, nothing else
    assert evaluation.table({"base": r}).splitlines() == [" " * 16 + "    mIoU   mBIoU    aAcc",
                                                          "segmentor           1.00    2.00    3.00"]


def test_eval_datasets_are_each_evaluated_as_a_run_on_that_data_would_be(tmp_path):
    import json

    from ddps.app import config, evaluation
    from ddps.app.data import build_dataset

    small = ["data.synthetic.num_val=3", "data.synthetic.size=32", "data.scale=[32,32]"]
    shifted = ["eval.datasets=[{name: shifted, synthetic: {domain: 1}}, {synthetic: {noise: 0.0}, val_split: other}]"]
    cfg = config.load(None, [*small, *shifted])
    torch.manual_seed(0)
    segmentor, head = _TinySegmentor(6).eval(), _small_ddps_head(6)
    report = evaluation.evaluate(cfg, segmentor, head, build_dataset(cfg, "val"), tmp_path / "eval.json",
                                 tmp_path / "panels", panels=1, limit=2)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert list(report["datasets"]) == ["shifted", "synthetic-shapes"]  # a name defaults to its dataset
    # panels of the run's own split, and of each other one in a folder of its name
    assert sorted(p.relative_to(tmp_path / "panels").as_posix() for p in (tmp_path / "panels").rglob("*.png")) == [
        "shifted/synthetic-validation-00000-domain1.png", "synthetic-shapes/synthetic-other-00000.png",
        "synthetic-validation-00000.png"]
    # each as the run's own held-out split would be with those data keys (its first 2 images), from
    # the same random state
    for name, keys in (("shifted", ["data.synthetic.domain=1"]),
                       ("synthetic-shapes", ["data.synthetic.noise=0.0", "data.val_split=other"])):
        alone = config.load(None, [*small, *keys])
        assert report["datasets"][name] == evaluation.evaluate(alone, segmentor, head, build_dataset(alone, "val"),
                                                               limit=2)
    plain = config.load(None, small)
    assert {k: v for k, v in report.items() if k != "datasets"} == evaluation.evaluate(
        plain, segmentor, head, build_dataset(plain, "val"), limit=2) == evaluation.evaluate(
        cfg, segmentor, head, build_dataset(cfg, "val"), limit=2, others=False)  # the segmentor stage's plateau check
    assert report != evaluation.evaluate(cfg, segmentor, head, build_dataset(cfg, "val"))  # all 3 images
    # no panels unless asked for
    evaluation.evaluate(cfg, segmentor, head, build_dataset(cfg, "val"), panels_dir=tmp_path / "none", limit=1)
    assert not list((tmp_path / "none").rglob("*.png"))
    assert report["datasets"]["shifted"]["ddps"]["final"] != report["ddps"]["final"]
    # one row per dataset: the segmentor's and the head's final mIoU / mBIoU
    lines = evaluation.table(report, "mine").splitlines()
    rows = lines[lines.index("") + 2:]
    assert [row.split()[0] for row in rows] == ["mine", "shifted", "synthetic-shapes"]
    for row, r in zip(rows, [report, *report["datasets"].values()]):
        assert row.split()[1:] == [f"{r['base']['mIoU']:.2f}", "/", f"{r['base']['mBIoU']:.2f}",
                                   f"{r['ddps']['final']['mIoU']:.2f}", "/", f"{r['ddps']['final']['mBIoU']:.2f}"]
    # the segmentor alone: its column only
    alone = evaluation.table(evaluation.evaluate(cfg, segmentor, None, build_dataset(cfg, "val")))
    assert alone.splitlines()[-4].split() == ["mIoU", "/", "mBIoU", "segmentor"]


def test_the_cross_domain_rows_are_laid_out_under_their_columns():
    from ddps.app import evaluation
    r = lambda m: {"mIoU": m, "mBIoU": m / 2, "aAcc": 90.0}  # noqa: E731
    ddps = lambda m: {"ddps": {"final": r(m + 1), "steps": {}}}  # noqa: E731
    report = {"base": r(40.0), **ddps(40.0), "datasets": {"b": {"base": r(30.0), **ddps(30.0)}}}
    assert evaluation.table(report, "a").split("\n\n")[1].splitlines() == [
        "mIoU / mBIoU       segmentor      ddps final",
        "a             40.00 /  20.00  41.00 /  20.50",
        "b             30.00 /  15.00  31.00 /  15.50"]
    # a segmentor without a classifier of its own (GSS's trained backbone): a dash
    gss = {"gss": {"final": r(50.0), "steps": {}}, "datasets": {"other-domain": {"gss": {"final": r(45.0), "steps": {}}}}}
    assert evaluation.table(gss).split("\n\n")[1].splitlines() == [
        "mIoU / mBIoU         segmentor       gss final",
        "held-out split               -  50.00 /  25.00",
        "other-domain                 -  45.00 /  22.50"]
