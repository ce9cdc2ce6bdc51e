"""A whole DDPS head, reference vs ddps, with identical weights, at the ADE20K config (K = 151,
128x128 mask, dim 256, cond 256 channels): one denoiser step (guidance included), the full
inference (T = 20, 3 steps, guidance 0.4) and one training step (forward + backward, B = 2).

    python benchmarks/bench_head.py [--repeats 3] [--cases step inference train] [--json FILE]

Every figure of one run comes from one process, so ratios are side by side. The step case also
compares the two heads' logits for the same mask (max relative difference); the inference and
training cases draw their noise differently on the two paths (dense Gumbel noise vs Philox), so
only their shapes are compared. "floor" is the FLOPs left after the head-level savings (torch's
FlopCounterMode over one fused call) at the GFLOP/s of the fastest convolution measured here.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddps.cli import machine_line
from timing import measure, print_rows, timing_row, write_json
from ddps.nn import DDPSHead

ADE20K = dict(num_classes=151, cond_channels=256, dim=256, out_dim=256, dim_mults=(1, 1, 1), embed_dim=16,
              num_timesteps=20, inference_steps=2, collect_timesteps=(0, 10, 19), guidance_scale=0.4)


def heads():
    torch.manual_seed(0)
    ref = DDPSHead(**ADE20K)
    fused = DDPSHead(**ADE20K, backend="auto")
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


def peak_conv_gflops() -> float:
    """The best throughput of the head's dominant convolution (3x3, 256 -> 256, 128x128), over
    both memory formats: the rate the FLOP floor is priced at."""
    best = 0.0
    w = torch.randn(256, 256, 3, 3)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 256, 128, 128).contiguous(memory_format=fmt)
        wf = w.contiguous(memory_format=fmt)
        sec = statistics.median(measure(lambda: F.conv2d(x, wf, padding=1), 3))
        best = max(best, 2 * 256 * 256 * 9 * 128 * 128 / sec / 1e9)
    return best


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run(size: int, repeats: int, cases) -> dict:
    ref, fused = heads()
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 256, size, size, generator=g)
    mask = torch.randint(0, 151, (1, size, size), generator=g)
    t = torch.tensor([10])
    cond2 = torch.randn(2, 256, size, size, generator=g)
    gt = torch.randint(0, 151, (2, 4 * size, 4 * size), generator=g)

    def step(head):
        def fn():
            with torch.no_grad():
                return head._step(cond)(mask, t)
        return fn

    def inference(head):
        return lambda: head.eval().sample(cond)

    def train(head):
        def fn():
            head.train()
            torch.manual_seed(1)  # same noise levels on both heads
            logits, _ = head.forward_train(cond2, gt)
            loss = F.cross_entropy(F.interpolate(logits, gt.shape[-2:], mode="bilinear"), gt)
            loss.backward()
            head.zero_grad(set_to_none=True)
        return fn

    makers = dict(step=step, inference=inference, train=train)
    peak = peak_conv_gflops()
    rows = []
    for case in cases:
        ref.eval(), fused.eval()
        timings = {name: measure(makers[case](head), repeats) for name, head in (("reference", ref), ("ddps", fused))}
        base = statistics.median(timings["reference"])
        rows += [timing_row(times, base, case=case, provider=name) for name, times in timings.items()]
        if case != "train":
            ref.eval(), fused.eval()
            work = flops(makers[case](fused))
            rows[-1]["gflop"] = work / 1e9
            rows[-1]["floor_ms"] = work / peak / 1e6
        if case == "step":
            expected = step(ref)()
            rows[-1]["max_rel_diff"] = ((step(fused)() - expected).abs().max() / expected.abs().max()).item()
    return dict(machine=machine_line(torch.device("cpu")), torch=torch.__version__, size=size,
                peak_conv_gflops=peak, rows=rows)


def print_table(result: dict) -> None:
    def extras(r):
        if "gflop" in r:
            yield f"{r['gflop']:.0f} GFLOP, floor {r['floor_ms']:.0f} ms"
        if "max_rel_diff" in r:
            yield f"ddps vs reference logits max rel. diff {r['max_rel_diff']:.1e}"

    print(result["machine"])
    print(f"ADE20K head, mask {result['size']}x{result['size']}; peak conv {result['peak_conv_gflops']:.0f} GFLOP/s")
    print_rows(result["rows"], [("case", 10), ("provider", 10)], extras)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="mask size (default 128, the ADE20K setting)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", choices=("step", "inference", "train"),
                   default=["step", "inference", "train"])
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    result = run(args.size, args.repeats, args.cases)
    print_table(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
