"""ddps frontier: a trained DDPS run's mIoU against its head's time per sampling setting (ddps.app.frontier)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import checkpoint, frontier
from ..runlock import RunLock
from .common import TRAINED_RUN_OVERRIDES, add_overrides, add_run, checked_run, positive

NAME = "frontier"
HELP = "mIoU against the head's time for each sampling setting of a trained DDPS run"
DESCRIPTION = ("Evaluates a trained DDPS run's held-out split once per sampling setting: eval.inference_steps "
               f"(--steps, default {' '.join(map(str, frontier.STEPS))}) x guidance (the run's eval.guidance_scale "
               "and off, 1.0) x early stop (never, and each --stop-below: eval.stop_below, which ends an image's "
               "sampling once fewer than that fraction of its pixels changed label in a step). Each row is what "
               "ddps eval with those overrides reports, beside the head's sampling time per image and the steps it "
               "ran; written to RUN/frontier.json (or --json) and, with --markdown, as a table "
               "(benchmarks/FRONTIER.md).")


def fraction(text: str) -> float:
    """argparse type: a fraction of an image's pixels, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def add_arguments(p) -> None:
    add_run(p)
    p.add_argument("--steps", type=positive, nargs="+", default=list(frontier.STEPS), metavar="N",
                   help=f"eval.inference_steps values (default: {' '.join(map(str, frontier.STEPS))})")
    p.add_argument("--stop-below", type=fraction, nargs="*", default=list(frontier.STOPS), metavar="F",
                   help="eval.stop_below values swept beside 0 (never stop); none: only 0 "
                        f"(default: {' '.join(map(str, frontier.STOPS))})")
    p.add_argument("--limit", type=positive, help="evaluate only the first N images")
    p.add_argument("--json", help="output file (default: RUN/frontier.json)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table there (e.g. benchmarks/FRONTIER.md)")
    add_overrides(p, TRAINED_RUN_OVERRIDES)


def run(args) -> int:
    _, out = checked_run(args, "frontier.json", [("--markdown", args.markdown, "file")] if args.markdown else [])
    command = " ".join(["ddps", "frontier", *args.argv])
    with RunLock(Path(args.run), "ddps frontier"):
        result = frontier.sweep(args.run, args.overrides, args.steps, args.stop_below, args.limit, args.weights)
    text = frontier.markdown(result, command)
    print(text)
    for path, data in [(out, json.dumps(result, indent=1))] + ([(Path(args.markdown), text)] if args.markdown else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(path, data.encode())
    print(f"wrote {out}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0
