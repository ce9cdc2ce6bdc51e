"""The ``ddps`` command line. ``ddps bench``: ddps against the original implementation on this
machine (the main job). ``ddps demo``: the DDPS sampling loop on random features, with the
sampling op timed on every available backend."""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from . import __version__, backends
from .bench.measure import machine, machine_line, measure
from .nn import DDPSHead
from .ops import q_sample
from .schedule import DiffusionSchedule


def demo(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ddps demo: --device cuda needs a visible CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    print(machine_line(machine(device)))
    for name, entry in backends().items():
        print(f"  backend {name:9s} {'yes' if entry['available'] else 'no ':3s}  {entry['reason']}")

    schedule = DiffusionSchedule(args.timesteps, args.classes).to(device)
    x0 = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    print(f"\nq_sample: x_t ~ q(x_t | x_0), B={args.batch}, K={args.classes}, {args.size}x{args.size} labels")
    usable = ["reference"] + [b for b in ("cpu", "cuda") if backends()[b]["available"] and b == device.type]
    baseline = None
    for backend in usable:
        fn = lambda: q_sample(x0, args.timesteps // 2, schedule, backend=backend)  # noqa: E731
        fn()
        times = measure(fn, args.repeats, device)
        median = statistics.median(times)
        baseline = baseline or median
        print(f"  {backend:9s} median {median * 1e3:9.3f} ms   speedup vs reference {baseline / median:8.1f}x")

    cond = torch.randn(args.batch, args.cond_channels, args.size, args.size, device=device)
    print(f"\nDDPSHead.sample: T={args.timesteps}, {args.steps} inference steps, guidance {args.guidance}, "
          f"dim {args.dim}, cond [{args.batch}, {args.cond_channels}, {args.size}, {args.size}] (random weights, "
          "the same in both heads)")
    weights = None
    for backend in ("reference", "auto"):
        head = DDPSHead(num_classes=args.classes, cond_channels=args.cond_channels, dim=args.dim, out_dim=args.dim,
                        dim_mults=(1, 1, 1), embed_dim=16, num_timesteps=args.timesteps,
                        inference_steps=args.steps, collect_timesteps=(args.timesteps - 1,),
                        guidance_scale=args.guidance, backend=backend).to(device).eval()
        weights = weights or head.state_dict()
        head.load_state_dict(weights)
        final, _ = head.sample(cond)
        times = measure(lambda: head.sample(cond), max(1, args.repeats // 10), device)
        label = "reference" if backend == "reference" else "fused"
        print(f"  {label:9s} median {statistics.median(times) * 1e3:9.1f} ms   final logits {tuple(final.shape)}, "
              f"{final.argmax(1).unique().numel()} classes predicted")
    return 0


def bench(args) -> int:
    from . import bench as bench_mod

    return bench_mod.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddps", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ddps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="measure ddps against the original implementation on this machine (the main job)",
        description="Measure every sampling and denoiser op, the denoiser modules and the whole ADE20K head "
                    "(one denoiser step, full inference with T=20 / 3 steps / guidance 0.4, one training step "
                    "at B=2): the original's eager ops (reference), torch.compile of them, plain-torch "
                    "formulations and each ddps backend, side by side in one process. The quick profile "
                    "(default) runs B=1 and leaves torch.compile out of the fwd+bwd and end-to-end cases; "
                    "--full adds B=4 and every provider.")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (default: cpu)")
    b.add_argument("--full", action="store_true", help="the full profile instead of the quick one")
    b.add_argument("--cases", nargs="+", metavar="NAME",
                   help="run only these cases (op, module or head names; see --list)")
    b.add_argument("--list", action="store_true", help="list the profile's cases and exit")
    b.add_argument("--size", type=int, default=128,
                   help="mask size S (default: 128, the ADE20K head's); the ops and modules take their "
                        "shapes from it (attention at S/4, the Block at S/2)")
    b.add_argument("--repeats", type=int, default=None,
                   help="timed calls per provider (default: 5; 2 for end-to-end cases in the quick profile; "
                        "short calls repeat until 0.3 s have passed)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON")
    b.add_argument("--csv", metavar="FILE", help="write one CSV row per provider, with device, versions and commit")
    b.add_argument("--plot", metavar="FILE.png", help="plot the speedups (needs matplotlib)")
    b.add_argument("--markdown", metavar="FILE", nargs="?", const="benchmarks/RESULTS.md",
                   help="write the results as markdown (default file: benchmarks/RESULTS.md)")
    b.set_defaults(func=bench)
    p = sub.add_parser("demo", help="run the DDPS sampling loop on random features and time the sampling op",
                       description="Run the DDPS sampling loop on random features; time q_sample on every "
                                   "available backend against the reference.")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (default: cpu)")
    p.add_argument("--batch", type=int, default=4, help="batch size B (default: 4)")
    p.add_argument("--classes", type=int, default=151, help="number of classes K (default: 151, ADE20K)")
    p.add_argument("--size", type=int, default=128, help="mask height and width (default: 128)")
    p.add_argument("--timesteps", type=int, default=20, help="diffusion steps T (default: 20)")
    p.add_argument("--steps", type=int, default=2, help="inference steps (default: 2, as released)")
    p.add_argument("--guidance", type=float, default=0.4, help="guidance scale (default: 0.4, as released)")
    p.add_argument("--dim", type=int, default=32, help="denoiser width (default: 32; the ADE20K head uses 256)")
    p.add_argument("--cond-channels", type=int, default=64, help="condition channels (default: 64)")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default: 0)")
    p.set_defaults(func=demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    for name in ("batch", "classes", "size", "timesteps", "steps", "dim", "cond_channels", "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.command == "bench" and args.size % 4:
        parser.error(f"--size must be a multiple of 4 (the UNet halves it twice), got {args.size}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
