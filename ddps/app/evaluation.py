"""Evaluation: mIoU, per-class IoU, pixel accuracy and boundary IoU of the segmentor alone and of
DDPS at every collected step, with single-scale, multi-scale + flip or sliding-window inference."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import config
from .data import build_dataset, rescale_size, resize
from ..ops._common import DTYPES


class Metrics:
    """Accumulates a confusion matrix and boundary-IoU counts over images. Classes other than the
    ignore value count in the means where they occur in the ground truth or the prediction."""

    def __init__(self, num_classes: int, ignore_index: int, boundary_dilation: float):
        self.k, self.ignore, self.dilation = num_classes, ignore_index, boundary_dilation
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.b_inter = torch.zeros(num_classes, dtype=torch.int64)
        self.b_union = torch.zeros(num_classes, dtype=torch.int64)

    def _band(self, masks: torch.Tensor, d: int) -> torch.Tensor:
        # pixels of a mask within d of its contour (the image border counts as contour, as in
        # the boundary-IoU definition): the mask minus its erosion by a (2d+1)^2 square
        outside = F.pad((~masks).float()[:, None], (1, 1, 1, 1), value=1.0)
        eroded = F.max_pool2d(outside, 2 * d + 1, stride=1, padding=d)[:, 0, 1:-1, 1:-1] == 0
        return masks & ~eroded

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: [H, W] labels."""
        valid = gt != self.ignore
        if 0 <= self.ignore < self.k:
            valid &= pred != self.ignore
        p, g = pred[valid], gt[valid]
        self.confusion += torch.bincount(g * self.k + p, minlength=self.k * self.k).view(self.k, self.k)
        d = max(1, round(self.dilation * math.hypot(*gt.shape)))
        classes = torch.unique(torch.cat([p, g]))
        gm = (gt[None] == classes[:, None, None]) & valid
        pm = (pred[None] == classes[:, None, None]) & valid
        gb, pb = self._band(gm, d), self._band(pm, d)
        self.b_inter[classes] += (gb & pb).flatten(1).sum(1)
        self.b_union[classes] += (gb | pb).flatten(1).sum(1)

    def result(self) -> dict:
        inter = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - inter
        counted = union > 0
        if 0 <= self.ignore < self.k:
            counted[self.ignore] = False
        iou = torch.where(counted, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        biou = torch.where(counted & (self.b_union > 0), self.b_inter / self.b_union.clamp(min=1).double(),
                           torch.full_like(inter, float("nan")))
        total = self.confusion.sum().item()
        pct = lambda x: round(100 * float(x), 2)  # noqa: E731
        return {"mIoU": pct(iou[counted].mean()) if counted.any() else float("nan"),
                "mBIoU": pct(biou[~biou.isnan()].mean()) if (~biou.isnan()).any() else float("nan"),
                "aAcc": pct(inter.sum() / total) if total else float("nan"),
                "IoU": [None if math.isnan(v) else pct(v) for v in iou.tolist()],
                "BIoU": [None if math.isnan(v) else pct(v) for v in biou.tolist()]}


@torch.no_grad()
def _forward(segmentor, head, images: torch.Tensor, num_classes: int, dtype: str = "fp32") -> dict:
    """Logits at the images' resolution: "base" (the segmentor, if it has a classifier), "final",
    "step <i>" (DDPS) and "part <name>" (``head.parts``: GSS's pixel branch). A head's scores come
    at the features' resolution or a multiple of it (GSS: the image's). ``dtype``: eval.dtype, the
    head's sampling under torch.autocast."""
    size = images.shape[-2:]
    # a head that trained the backbone (GSS's) takes its levels (the first at the features' size) and
    # leaves the segmentor's classifier behind: no baseline, and no second pass through the backbone
    levels = segmentor.levels(images) if head is not None and head.takes_levels else None
    features, logits = (levels[0], None) if levels is not None else segmentor(images)
    out = {} if logits is None else {"base": logits}
    if head is not None:
        # A head takes sizes its network divides (the denoiser halves the mask at each level): the
        # features are padded with their edge values to such a size, and the scores cropped back.
        h, w = features.shape[-2:]
        m = head.size_multiple
        pad, base = (0, -w % m, 0, -h % m), logits
        if any(pad):
            features = F.pad(features, pad, mode="replicate")
            base = None if logits is None else F.pad(logits, pad, mode="replicate")
        cond = levels if levels is not None else features
        with torch.autocast(images.device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            final, collected = head.sample(cond, base)
            parts = head.parts(cond)  # after sampling: the head's random draws stay as they were
        outputs = {"final": final, **{f"step {i}": s for i, s in collected.items()},
                   **{f"part {name}": s for name, s in parts.items()}}
        for name, scores in outputs.items():
            scale = scores.shape[-1] // features.shape[-1]
            out[name] = scores[:, :num_classes, :h * scale, :w * scale]
    return {k: F.interpolate(v.float(), size=size, mode="bilinear", align_corners=False) for k, v in out.items()}


def predict(segmentor, head, image: torch.Tensor, cfg, num_classes: int, dtype: str | None = None) -> dict:
    """Per-output class scores [K, H, W] for one uint8 image [3, H, W], in the configured mode,
    the head sampling at ``dtype`` (default: eval.dtype)."""
    h, w = image.shape[-2:]
    device = next(segmentor.parameters()).device
    e = cfg.eval
    dtype = e.dtype if dtype is None else dtype
    if e.mode == "ms-flip":
        # the original's aug_test: softmax probabilities averaged over scales and flips
        total = None
        for ratio in e.scales:
            scaled, _ = resize(image, None, rescale_size(h, w, [int(s * ratio) for s in cfg.data.scale]))
            for flip in (False, True):
                x = scaled.flip(-1) if flip else scaled
                out = _forward(segmentor, head, x[None].to(device), num_classes, dtype)
                out = {k: F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]
                       for k, v in out.items()}
                out = {k: v.flip(-1) if flip else v for k, v in out.items()}
                total = out if total is None else {k: total[k] + out[k] for k in out}
        return {k: v / (2 * len(e.scales)) for k, v in total.items()}
    scaled, _ = resize(image, None, rescale_size(h, w, cfg.data.scale))
    x = scaled[None].to(device)
    if e.mode == "single":
        out = _forward(segmentor, head, x, num_classes, dtype)
    else:
        out = _slide(segmentor, head, x, e.crop_size, e.stride, num_classes, dtype)
    return {k: F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)[0] for k, v in out.items()}


def _slide(segmentor, head, x, crop, stride, num_classes: int, dtype: str) -> dict:
    """The original's slide_inference: logits of overlapping crops averaged on the image grid."""
    _, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    rows = max(h - ch + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - cw + stride[1] - 1, 0) // stride[1] + 1
    sums, count = {}, torch.zeros(1, 1, h, w, device=x.device)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride[0], h - ch), min(c * stride[1], w - cw)
            out = _forward(segmentor, head, x[:, :, y1:y1 + ch, x1:x1 + cw], num_classes, dtype)
            for k, v in out.items():
                canvas = sums.setdefault(k, x.new_zeros(1, v.shape[1], h, w, dtype=torch.float32))
                canvas[:, :, y1:y1 + ch, x1:x1 + cw] += v
            count[:, :, y1:y1 + ch, x1:x1 + cw] += 1
    return {k: v / count for k, v in sums.items()}


def palette(num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(2023)
    colours = rng.integers(40, 256, size=(max(num_classes, 1), 3), dtype=np.uint8)
    colours[0] = (0, 0, 0)
    return colours


def colourise(labels: torch.Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    labels = labels.cpu().numpy()
    image = palette(num_classes)[np.clip(labels, 0, num_classes - 1)]
    image[labels == ignore_index] = (255, 255, 255)
    return image


def legend(num_classes: int):
    """A PIL image of every class's colour beside its index, in columns of 32."""
    rows, cell = 32, (64, 16)
    columns = -(-num_classes // rows)
    image = Image.new("RGB", (columns * cell[0], min(rows, num_classes) * cell[1]), "white")
    draw = ImageDraw.Draw(image)
    colours = palette(num_classes)
    for c in range(num_classes):
        x, y = c // rows * cell[0], c % rows * cell[1]
        draw.rectangle([x + 2, y + 2, x + 22, y + cell[1] - 2], fill=tuple(int(v) for v in colours[c]))
        draw.text((x + 26, y + 2), str(c), fill="black")
    return image


def _order(name: str):
    if name.startswith("step"):
        return 1, int(name.split()[1])
    return {"base": 0, "final": 3}.get(name, 2), 0  # parts between the steps and the final


def _title(name: str) -> str:
    return "segmentor" if name == "base" else name.removeprefix("part ")


def panel(tiles, titles) -> Image.Image:
    """Equal-height RGB tiles side by side under a strip with each column's title."""
    strip = 18
    row = np.concatenate(tiles, axis=1)
    image = Image.new("RGB", (row.shape[1], row.shape[0] + strip), "white")
    image.paste(Image.fromarray(row), (0, strip))
    draw, x = ImageDraw.Draw(image), 0
    for tile, title in zip(tiles, titles):
        draw.text((x + 3, 3), title, fill="black")
        x += tile.shape[1]
    return image


def evaluate(cfg, segmentor, head, dataset, out_json: Path | None = None, panels_dir: Path | None = None,
             panels: int = 0, limit: int | None = None, others: bool = True) -> dict:
    """The report of ``dataset`` (below) and, with ``others``, for each of ``eval.datasets`` the
    same of its held-out split under ``"datasets": {name: report}`` (its panels in ``panels_dir /
    name``), each evaluated from the same random state."""
    report = _evaluate(cfg, segmentor, head, dataset, panels_dir, panels, limit)
    extra = config.eval_datasets(cfg) if others else []
    if extra:
        report["datasets"] = {name: _evaluate(sub, segmentor, head, build_dataset(sub, "val"),
                                              None if panels_dir is None else panels_dir / name, panels, limit)
                              for name, sub in extra}
    if out_json is not None:
        out_json.write_text(json.dumps(report, indent=1))
    return report


def _evaluate(cfg, segmentor, head, dataset, panels_dir: Path | None, panels: int, limit: int | None) -> dict:
    """The metrics of ``dataset`` as ``{"base": {...}, NAME: {"final": {...}, "steps": {"<i>": {...}}}}``:
    "base" where the segmentor has a classifier, NAME (the head's ``metrics_name``: ddps, refine,
    gss) where a head is given, and ``"prior": {"reconstruction": {...}}`` for a head with a mask
    prior of its own (its round trip of the true masks, ``head.reconstruct``); NAME gains "parts":
    {name: {...}} for a head with parts that predict on their own (``head.parts``). With eval.dtype bf16
    or fp16 the head also samples in float32 from the same random state, and NAME gains
    "fp32_final" (that run's metrics) and "agreement_with_fp32" (the percentage of pixels whose
    final label is the float32 run's)."""
    k, ignore = dataset.num_classes, dataset.ignore_index
    torch.manual_seed(cfg.seed)  # the head's random initial masks
    metrics = {}
    compare = head is not None and cfg.eval.dtype != "fp32"
    device = next(segmentor.parameters()).device
    agree = pixels = 0
    n = len(dataset) if limit is None else min(limit, len(dataset))

    def count(name, pred, gt):
        metrics.setdefault(name, Metrics(k, ignore, cfg.eval.boundary_dilation)).update(pred, gt)

    for index in range(n):
        image, gt = dataset[index]
        if compare:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                fp32 = predict(segmentor, head, image, cfg, k, "fp32")["final"].argmax(0).cpu()
            count("fp32 final", fp32, gt)
        scores = predict(segmentor, head, image, cfg, k)
        preds = {name: s.argmax(0).cpu() for name, s in scores.items()}
        if compare:
            agree += int((preds["final"] == fp32).sum())
            pixels += fp32.numel()
        for name, pred in preds.items():
            count(name, pred, gt)
        if head is not None:
            with torch.no_grad():
                round_trip = head.reconstruct(gt[None].to(device), ignore)
            if round_trip is not None:
                count("prior", round_trip[0].cpu(), gt)
        if panels_dir is not None and index < panels:
            _panel(image, gt, preds, k, ignore).save(_mkdir(panels_dir) / f"{dataset.name(index)}.png")
    results = {name: m.result() for name, m in metrics.items()}
    report = {"base": results["base"]} if "base" in results else {}
    if "prior" in results:  # the mask prior's own round trip of the true masks: its reconstruction quality
        report["prior"] = {"reconstruction": results.pop("prior")}
    if head is not None:
        report[head.metrics_name] = section = {
            "final": results["final"],
            "steps": {name.split()[1]: results[name]
                      for name in sorted((n for n in results if n.startswith("step")), key=_order)}}
        parts = {name.removeprefix("part "): results[name] for name in results if name.startswith("part ")}
        if parts:
            section["parts"] = parts
        if compare:
            section.update(dtype=cfg.eval.dtype, fp32_final=results["fp32 final"],
                           agreement_with_fp32=100 * agree / max(pixels, 1))
    return report


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _panel(image, gt, preds: dict, k: int, ignore: int) -> Image.Image:
    names = sorted(preds, key=_order)
    tiles = [image.permute(1, 2, 0).numpy()] + [colourise(preds[m], k, ignore) for m in names]
    tiles.append(colourise(gt, k, ignore))
    return panel(tiles, ["image", *map(_title, names), "truth"])


def data_name(cfg) -> str:
    """The run's own held-out split, as ``table`` names it."""
    return f"{cfg.data.dataset} {cfg.data.val_split}"


NOT_HEADS = ("base", "prior", "datasets")  # a report's keys other than its head's


def head_report(report: dict) -> tuple[str, dict]:
    """(the head's name, its section) of an evaluation report with a head."""
    name = next(n for n in report if n not in NOT_HEADS)
    return name, report[name]


def table(report: dict, held_out: str = "held-out split") -> str:
    """The report as text, the head's rows under its name; with "datasets", a row per dataset
    (``held_out`` names the report's own) of the segmentor's and the head's final mIoU / mBIoU."""
    text = _rows(report)
    if "datasets" in report:
        text += "\n\n" + _domains({held_out: report, **report["datasets"]})
    return text


def _domains(reports: dict) -> str:
    columns = [("segmentor", lambda r: r.get("base"))]
    first = next(iter(reports.values()))
    if set(first) - set(NOT_HEADS):
        name = head_report(first)[0]
        columns.append((f"{name} final", lambda r: head_report(r)[1]["final"]))
    width = max(len(n) for n in ["mIoU / mBIoU", *reports])
    lines = [f"{'mIoU / mBIoU':{width}s}" + "".join(f" {title:>15s}" for title, _ in columns)]
    for name, r in reports.items():
        cells = [get(r) for _, get in columns]
        lines.append(f"{name:{width}s}" + "".join(f" {'-':>15s}" if c is None else f" {c['mIoU']:6.2f} / {c['mBIoU']:6.2f}"
                                               for c in cells))
    return "\n".join(lines)


def _rows(report: dict) -> str:
    rows = [("segmentor", report["base"])] if "base" in report else []
    name = None
    if set(report) - set(NOT_HEADS):
        name, section = head_report(report)
        rows += [(f"{name} step {s}", r) for s, r in section["steps"].items()]
        dtype = section.get("dtype")
        rows += [(f"{name} {part}", r) for part, r in section.get("parts", {}).items()]
        rows.append((f"{name} final" + (f" {dtype}" if dtype else ""), section["final"]))
        if dtype:
            rows.append((f"{name} final fp32", section["fp32_final"]))
    if "prior" in report:
        rows.append((f"{name} prior", report["prior"]["reconstruction"]))
    lines = [f"{'':16s} {'mIoU':>7s} {'mBIoU':>7s} {'aAcc':>7s}"]
    lines += [f"{label:16s} {r['mIoU']:7.2f} {r['mBIoU']:7.2f} {r['aAcc']:7.2f}" for label, r in rows]
    if name is not None and "agreement_with_fp32" in report[name]:
        lines.append(f"{name} final labels equal to the fp32 run's: {report[name]['agreement_with_fp32']:.3f}% of pixels")
    return "\n".join(lines)
