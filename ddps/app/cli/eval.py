"""ddps eval: a trained run evaluated on its held-out split."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .. import checkpoint, evaluation
from ..data import build_dataset
from ..model import load_run
from ..runlock import RunLock
from .common import TRAINED_RUN_OVERRIDES, add_overrides, add_run, checked_run, positive

NAME = "eval"
HELP = "evaluate a trained run on its held-out split"
DESCRIPTION = ("mIoU, mBIoU and aAcc of the segmentor and of the head at every collected step (GSS: also its pixel "
               "branch alone, and its prior's round trip of the true masks), into RUN/eval.json (or --json); "
               "eval.mode=single|ms-flip|slide picks the inference; eval.datasets=[{...}, ...] adds held-out sets "
               "of other data (data.* keys over the run's, e.g. 'eval.datasets=[{dataset: bdd100k, root: DIR, "
               "val_split: val}]'), each reported the same and in a row of its own.")


def add_arguments(p) -> None:
    add_run(p)
    p.add_argument("--json", help="output file (default: RUN/eval.json)")
    p.add_argument("--limit", type=positive, help="evaluate only the first N images")
    p.add_argument("--panels", metavar="DIR", help="write eval.panels PNG panels (image | segmentor | steps | truth)")
    p.add_argument("--base-only", action="store_true", help="evaluate the segmentor alone")
    add_overrides(p, TRAINED_RUN_OVERRIDES)


def run(args) -> int:
    cfg, out = checked_run(args, "eval.json", [("--panels", args.panels, "dir")] if args.panels else [])
    # eval.json next to the run's weights: not while a ddps train (or another eval) writes the run
    inside = out.resolve().parent == Path(args.run).resolve()
    with RunLock(Path(args.run), "ddps eval") if inside else contextlib.nullcontext():
        cfg, segmentor, head = load_run(args.run, weights=args.weights, cfg=cfg)
        if args.base_only and not segmentor.has_classifier:
            raise ValueError(f"--base-only: the segmentor of {args.run} has no classifier of its own (a converted DDPS "
                             "checkpoint; ddps convert --segformer adds the original SegFormer's)")
        if args.base_only and head.takes_levels:
            raise ValueError(f"--base-only: the backbone of {args.run} was trained with its GSS head, so the "
                             "segmentor's classifier, trained before, no longer matches it")
        report = evaluation.evaluate(cfg, segmentor, None if args.base_only else head, build_dataset(cfg, "val"),
                                     limit=args.limit, panels_dir=Path(args.panels) if args.panels else None,
                                     panels=cfg.eval.panels)
        print(evaluation.table(report, evaluation.data_name(cfg)))
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(out, json.dumps(report, indent=1).encode())
    print(f"wrote {out}")
    return 0
