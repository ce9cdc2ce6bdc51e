"""ddps demo: the DDPS sampling loop on random features, the sampling op timed per backend."""
from __future__ import annotations

import statistics
import sys

import torch

from ... import backends
from ...bench.measure import machine, machine_line, measure
from ...nn import DDPSHead
from ...nn.head import ADE20K_HEAD
from ...ops import q_sample
from ...schedule import DiffusionSchedule
from .common import at_least, positive

NAME = "demo"
HELP = "run the DDPS sampling loop on random features and time the sampling op"
DESCRIPTION = ("Run the DDPS sampling loop on random features (the ADE20K head's structure at the width given); "
               "time q_sample on every available backend against the reference, and the head's sampling with "
               "the reference and the fused ops.")


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (default: cpu)")
    p.add_argument("--batch", type=positive, default=4, help="batch size B (default: 4)")
    p.add_argument("--classes", type=at_least(2), default=151, help="number of classes K, >= 2 (default: 151, ADE20K)")
    p.add_argument("--size", type=positive, default=128, help="mask height and width (default: 128)")
    p.add_argument("--timesteps", type=positive, default=20, help="diffusion steps T (default: 20)")
    p.add_argument("--steps", type=positive, default=2, help="inference steps (default: 2, as released)")
    p.add_argument("--guidance", type=float, default=0.4, help="guidance scale (default: 0.4, as released)")
    p.add_argument("--dim", type=positive, default=32, help="denoiser width (default: 32; the ADE20K head uses 256)")
    p.add_argument("--cond-channels", type=positive, default=64, help="condition channels (default: 64)")
    p.add_argument("--repeats", type=positive, default=10, help="timed repetitions per measurement (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default: 0)")


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ddps demo: --device cuda needs a visible CUDA device", file=sys.stderr)
        return 2
    if args.size % 4:
        print(f"ddps demo: --size {args.size}: the demo head's UNet halves the mask twice, so the size must be a "
              "multiple of 4", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    print(machine_line(machine(device)))
    for name, entry in backends().items():
        print(f"  backend {name:9s} {'yes' if entry['available'] else 'no ':3s}  {entry['reason']}")
    _time_q_sample(args, device)
    _time_head(args, device)
    return 0


def _time_q_sample(args, device) -> None:
    schedule = DiffusionSchedule(args.timesteps, args.classes).to(device)
    x0 = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    print(f"\nq_sample: x_t ~ q(x_t | x_0), B={args.batch}, K={args.classes}, {args.size}x{args.size} labels")
    usable = ["reference"] + [b for b in ("cpu", "cuda") if backends()[b]["available"] and b == device.type]
    baseline = None
    for backend in usable:
        fn = lambda: q_sample(x0, args.timesteps // 2, schedule, backend=backend)  # noqa: E731
        fn()
        median = statistics.median(measure(fn, args.repeats, device))
        baseline = baseline or median
        print(f"  {backend:9s} median {median * 1e3:9.3f} ms   speedup vs reference {baseline / median:8.1f}x")


def _time_head(args, device) -> None:
    cond = torch.randn(args.batch, args.cond_channels, args.size, args.size, device=device)
    print(f"\nDDPSHead.sample: T={args.timesteps}, {args.steps} inference steps, guidance {args.guidance}, "
          f"dim {args.dim}, cond [{args.batch}, {args.cond_channels}, {args.size}, {args.size}] (random weights, "
          "the same in both heads)")
    shape = {**ADE20K_HEAD, "num_classes": args.classes, "cond_channels": args.cond_channels, "dim": args.dim,
             "out_dim": args.dim, "num_timesteps": args.timesteps, "inference_steps": args.steps,
             "collect_timesteps": (args.timesteps - 1,), "guidance_scale": args.guidance}
    weights = None
    for backend in ("reference", "auto"):
        head = DDPSHead(**shape, backend=backend).to(device).eval()
        weights = weights or head.state_dict()
        head.load_state_dict(weights)
        final, _ = head.sample(cond)
        times = measure(lambda: head.sample(cond), max(1, args.repeats // 10), device)
        label = "reference" if backend == "reference" else "fused"
        print(f"  {label:9s} median {statistics.median(times) * 1e3:9.1f} ms   final logits {tuple(final.shape)}, "
              f"{final.argmax(1).unique().numel()} classes predicted")
