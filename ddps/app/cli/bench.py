"""ddps bench: ddps against the original implementation on this machine (ddps.bench)."""
from __future__ import annotations

import argparse

from ...ops._common import DTYPES
from .common import positive

NAME = "bench"
HELP = "measure ddps against the original implementation on this machine (the main job)"
DESCRIPTION = ("Measure ddps against the original's eager ops (reference), and against torch.compile of them and "
               "plain-torch formulations, side by side in one process, and end with a summary: each headline "
               "case's speedup, the machine and the files written. The quick profile (default) runs what a user "
               "decides by, at B=1: the sampling ops, the attention modules where the UNet first runs them (on "
               "NCHW and channels-last input), the UNet and the whole ADE20K head (inference with T=20 / 3 steps / "
               "guidance 0.4, one training step at B=2), without torch.compile; --full adds every denoiser op, "
               "GSS's maskige_decode, the other module sizes, one head step, torch.compile and B=4.")


def mask_size(text: str) -> int:
    """argparse type: a mask size the UNet can halve twice."""
    value = positive(text)
    if value % 4:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 (the UNet halves it twice), got {value}")
    return value


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (default: cpu)")
    p.add_argument("--full", action="store_true", help="the full profile instead of the quick one")
    p.add_argument("--cases", nargs="+", metavar="NAME",
                   help="run only these cases (op, module or head names; see --list)")
    p.add_argument("--list", action="store_true", help="list the profile's cases and exit")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="also run each ddps provider of the denoiser ops, modules and heads under torch.autocast "
                        "at this dtype, as a row 'provider[dtype]' beside its float32 one (default: fp32, float32 "
                        "rows only)")
    p.add_argument("--size", type=mask_size, default=128,
                   help="mask size S (default: 128, the ADE20K head's); the ops and modules take their shapes "
                        "from it (attention at S/4, the Block at S/2)")
    p.add_argument("--repeats", type=positive, default=None,
                   help="timed calls per provider (default: 5; 1 for end-to-end cases in the quick profile; short "
                        "calls repeat until 0.3 s have passed)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per provider, with device, versions and commit")
    p.add_argument("--plot", metavar="FILE.png", help="plot the speedups (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE", nargs="?", const="benchmarks/RESULTS.md",
                   help="write the results as markdown (default file: benchmarks/RESULTS.md)")


def run(args) -> int:
    from ... import bench

    return bench.main(args)
