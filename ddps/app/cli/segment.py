"""ddps segment: colourised masks (and class IDs) of image files from a trained run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import evaluation, preflight
from ..data import DataError, read_image
from ..model import dataset_classes, load_run, run_config
from ..schema import ConfigError
from .common import TRAINED_RUN_OVERRIDES, add_run, weights_input

NAME = "segment"
HELP = "segment image files into colourised mask PNGs"
DESCRIPTION = ("Writes OUT/<name>.png (the head's final mask) and OUT/<name>_segmentor.png for each image; --steps "
               "adds OUT/<name>_step<i>.png for each collected step, --labels the class-ID PNGs; OUT/legend.png "
               "shows each class's colour. KEY=VALUE words among the images are config overrides "
               "(eval.inference_steps=4, eval.guidance_scale=0.2, eval.mode=slide, ...). Two images of one name (in "
               "other folders or with other extensions) are refused: their masks would overwrite each other.")


def add_arguments(p) -> None:
    add_run(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", action="store_true", help="also write the mask of every collected step")
    p.add_argument("--labels", action="store_true",
                   help="also write each mask as class IDs (<file>_labels.png: 8-bit, 16-bit past 256 classes)")
    p.add_argument("images", nargs="+", metavar="IMAGE|KEY=VALUE", help="image files, and " + TRAINED_RUN_OVERRIDES)
    p.set_defaults(overrides=())


def _images_and_overrides(args) -> tuple[list[str], list[str]]:
    # Images and KEY=VALUE overrides share the positional arguments: a word with "=" that names no
    # file is an override.
    overrides = [a for a in args.images if "=" in a and not Path(a).exists()]
    images = [a for a in args.images if a not in overrides]
    overrides = [*args.overrides, *overrides]
    if not images:
        raise ValueError("no image files given (only overrides: " + " ".join(overrides) + ")")
    stems: dict[str, str] = {}
    for name in images:
        other = stems.setdefault(Path(name).stem, name)
        if other != name:
            raise ValueError(f"{other} and {name} would both be written as {Path(args.out) / Path(name).stem}"
                             ".png: segment them into separate --out folders, or rename one")
    return images, overrides


def _unreadable(images: list[str]) -> list[str]:
    """The problems of the input images, each decoded once before any mask is written."""
    problems = []
    for name in images:
        try:
            read_image(Path(name))
        except DataError as e:
            problems.append(str(e))
    return problems


def run(args) -> int:
    images, overrides = _images_and_overrides(args)
    cfg = run_config(args.run, overrides)
    out = Path(args.out)
    problems = _unreadable(images)
    try:
        preflight.check(cfg, outputs=[("--out", out, "dir")], inputs=[weights_input(args)])
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(*problems)
    cfg, segmentor, head = load_run(args.run, weights=args.weights, cfg=cfg)
    k, ignore = dataset_classes(cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    for name in images:
        scores = evaluation.predict(segmentor, head, read_image(Path(name)), cfg, k)
        stem = Path(name).stem
        wanted = {"final": f"{stem}.png"}
        if "base" in scores:
            wanted["base"] = f"{stem}_segmentor.png"
        if args.steps:
            wanted.update({n: f"{stem}_step{n.split()[1]}.png" for n in scores if n.startswith("step")})
        for key, filename in wanted.items():
            labels = scores[key].argmax(0)
            Image.fromarray(evaluation.colourise(labels, k, ignore)).save(out / filename)
            if args.labels:  # class IDs, 8-bit where they fit, else 16-bit
                ids = labels.cpu().numpy().astype(np.uint8 if k <= 256 else np.uint16)
                Image.fromarray(ids).save(out / filename.replace(".png", "_labels.png"))
        print(f"{name} -> {out / wanted['final']}")
    evaluation.legend(k).save(out / "legend.png")
    print(f"colours of the {k} classes: {out / 'legend.png'}")
    return 0
