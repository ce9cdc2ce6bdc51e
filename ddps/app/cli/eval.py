"""ddps eval: a trained run evaluated on its held-out split."""
from __future__ import annotations

import json
from pathlib import Path

from .. import evaluation
from ..data import build_dataset
from ..model import load_run
from .common import add_overrides, add_run, positive

NAME = "eval"
HELP = "evaluate a trained run on its held-out split"
DESCRIPTION = ("mIoU, mBIoU and aAcc of the segmentor and of the head at every collected step, into RUN/eval.json "
               "(or --json); eval.mode=single|ms-flip|slide picks the inference.")


def add_arguments(p) -> None:
    add_run(p)
    p.add_argument("--json", help="output file (default: RUN/eval.json)")
    p.add_argument("--limit", type=positive, help="evaluate only the first N images")
    p.add_argument("--panels", metavar="DIR", help="write eval.panels PNG panels (image | segmentor | steps | truth)")
    p.add_argument("--base-only", action="store_true", help="evaluate the segmentor alone")
    add_overrides(p)


def run(args) -> int:
    cfg, segmentor, head = load_run(args.run, args.overrides, args.weights)
    if args.base_only and not segmentor.has_classifier:
        raise ValueError(f"--base-only: the segmentor of {args.run} has no classifier of its own (a converted DDPS "
                         "checkpoint; ddps convert --segformer adds the original SegFormer's)")
    report = evaluation.evaluate(cfg, segmentor, None if args.base_only else head, build_dataset(cfg, "val"),
                                 limit=args.limit, panels_dir=Path(args.panels) if args.panels else None,
                                 panels=cfg.eval.panels)
    print(evaluation.table(report))
    out = Path(args.json or Path(args.run) / "eval.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0
