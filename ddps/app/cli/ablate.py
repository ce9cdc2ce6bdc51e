"""ddps ablate: the paper's findings as one controlled comparison (ddps.app.ablation)."""
from __future__ import annotations

import sys
from pathlib import Path

from .. import ablation, config as config_mod, preflight, trainer
from ..runlock import RunLock
from .common import add_overrides, positive

NAME = "ablate"
HELP = "the paper's findings as one controlled comparison of head variants"
DESCRIPTION = ("Trains the segmentor once (until its validation mIoU is flat, with segmentor.eval_interval set), "
               "then every head variant from that segmentor (frozen, but for GSS's conditioning network, which trains "
               "its backbone) with the config's budget, for each seed, "
               "evaluates all on the held-out split, and writes OUT/ablation.json and OUT/ablation.md (mean and "
               "range over seeds, and whether each of the paper's findings is reproduced). Variants: "
               + ", ".join(f"{k} ({v})" for k, v in ablation.DESCRIPTIONS.items())
               + ". Rerunning resumes: finished variants are not trained again.")


def add_arguments(p) -> None:
    p.add_argument("--config", default="synthetic", help="YAML config file or the name of a shipped one "
                                                         "(default: synthetic)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants")
    p.add_argument("--seeds", type=positive, default=2, help="seeds per variant: 0..N-1 (default: 2)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table there (e.g. benchmarks/ABLATIONS.md)")
    add_overrides(p)


def run(args) -> int:
    # --only takes every word after it; the KEY=VALUE ones among them are overrides
    only = [a for a in args.only or () if "=" not in a] or None
    overrides = [*args.overrides, *(a for a in args.only or () if "=" in a)]
    cfg = config_mod.load(config_mod.find(args.config), overrides)
    ablation.check_variants(only)
    command = " ".join(["ddps", "ablate", *args.argv])
    outputs = [("--out", args.out, "dir")] + ([("--markdown", args.markdown, "file")] if args.markdown else [])
    preflight.check(cfg, splits=("train", "val"), outputs=outputs, training=True)
    try:
        with RunLock(Path(args.out), "ddps ablate"):
            result = ablation.run(cfg, Path(args.out), only, tuple(range(args.seeds)), command=command,
                                  markdown_out=Path(args.markdown) if args.markdown else None)
    except trainer.Interrupted as e:
        print(f"\nddps ablate: {e}; checkpoint written. Resume with the same command: {command}", file=sys.stderr)
        return 130
    print(ablation.markdown(result))
    print(f"wrote {Path(args.out) / 'ablation.json'} and {Path(args.out) / 'ablation.md'}"
          + (f" and {args.markdown}" if args.markdown else ""))
    return 0
