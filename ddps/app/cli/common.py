"""What the subcommands share: argument types and groups."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import preflight
from ..model import TRAINED_RUN_DROPS_TEXT, TRAINED_RUN_FREE_TEXT, run_config


def at_least(low: int):
    """argparse type: an int >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


positive = at_least(1)


TRAINED_RUN_OVERRIDES = (f"overrides of {TRAINED_RUN_FREE_TEXT}, e.g. eval.mode=slide, and {TRAINED_RUN_DROPS_TEXT} "
                         "(values are read as YAML; the other keys are the run's own)")


def add_overrides(p, help: str = "config overrides, e.g. train.iters=500 eval.mode=slide (values are read as "
                                  "YAML)") -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help)


def weights_input(args) -> tuple[str, Path]:
    """(what, path) of the weights a command on a trained run reads, for ddps.app.preflight."""
    if args.weights:
        return "--weights", Path(args.weights)
    return "--run (its weights, written when training ends)", Path(args.run) / "model.safetensors"


def add_run(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by ddps train")
    p.add_argument("--weights", help="weights file to use instead of RUN/model.safetensors")


def checked_run(args, default_json: str, outputs=()):
    """(config, JSON output) of a command on a trained run: RUN's config under the overrides, and
    --json or RUN/``default_json``, after ddps.app.preflight's checks of them, of the weights and
    of ``outputs``."""
    cfg = run_config(args.run, args.overrides)
    out = Path(args.json or Path(args.run) / default_json)
    preflight.check(cfg, splits=("val",), outputs=[("--json", out, "file"), *outputs], inputs=[weights_input(args)])
    return cfg, out
