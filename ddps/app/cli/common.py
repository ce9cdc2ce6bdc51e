"""What the subcommands share: argument types and groups."""
from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_overrides(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.iters=500 eval.mode=slide (values are read as YAML)")


def add_run(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by ddps train")
    p.add_argument("--weights", help="weights file to use instead of RUN/model.safetensors")
