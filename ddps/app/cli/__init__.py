"""The ddps command line. ddps bench: ddps against the original implementation on this machine
(the main job). ddps train / eval / segment / convert: the training recipe, its evaluation, masks
for image files, and original checkpoints into ddps run directories. ddps ablate: the paper's
findings as one controlled comparison. ddps frontier: a trained run's mIoU against its sampling
time per setting. ddps demo: the DDPS sampling loop on random features, with
the sampling op timed on every available backend.

One module per subcommand: NAME, HELP, DESCRIPTION, add_arguments(parser) and run(args); what
they share in ``common``."""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

from ... import __version__
from ..data import DataError
from ..schema import ConfigError
from . import ablate, bench, convert, demo, eval as eval_cmd, frontier, segment, train

COMMANDS = (bench, train, eval_cmd, frontier, segment, convert, ablate, demo)
# What a command may report as one line (exit status 2) rather than a traceback: a user's input.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, ImportError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"ddps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def reuse_freed_memory() -> bool:
    """Makes glibc's malloc keep freed blocks for reuse instead of giving them back to the OS. By
    default it serves blocks above its mmap threshold (128 KiB, raised as such blocks are freed, to
    at most 32 MiB) with fresh pages and unmaps them on free, so every training step pays the page
    faults of its activations again: the head's training step (ddps bench --cases
    head.train_step) took 7.6 s that way and 6.1-6.4 s without, on this package's reference CPU. Left
    out where DDPS_REUSE_MEMORY=0, where the user set glibc's MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_, and on other C libraries. Returns whether it applied."""
    if os.environ.get("DDPS_REUSE_MEMORY") == "0" or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2 ** 31 - 1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # argparse matches all positionals in one go, so overrides placed after later options come
    # back as unknown arguments; they are overrides all the same
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    args.argv = argv[1:]
    if args.command != "bench":  # the benchmarks time library calls, with the allocator users have
        reuse_freed_memory()
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        if args.command in ("bench", "demo"):
            raise
        for problem in str(e).splitlines() or [type(e).__name__]:
            print(f"ddps {args.command}: error: {problem}", file=sys.stderr)
        return 2
