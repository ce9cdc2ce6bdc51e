"""Denoiser modules side by side: reference (the original's ops) and fused (ddps.ops), with the
same weights, forward and forward + backward, at the ADE20K denoiser's shapes.

    python benchmarks/bench_denoiser.py [--batch 1 4] [--unet-size 128] [--json FILE]

Every figure of one run comes from one process, so ratios are side by side. The UNet row also
reports the share of the reference forward spent in convolutions (torch profiler) and the
achieved GFLOP/s of both (FLOPs of the convolutions and matmuls counted by torch's FlopCounterMode).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddps
from ddps.cli import machine_line
from ddps.nn.unet import Attention, LinearAttention, Block, UNet


def measure(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _pair(cls, *args, **kwargs):
    torch.manual_seed(0)
    ref = cls(*args, **kwargs)
    fused = cls(*args, **kwargs, backend="fused")
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def cases(batches, unet_size):
    for b in batches:
        yield f"Attention mid [{b},256,32,32]", _pair(Attention, 256), (torch.randn(b, 256, 32, 32),)
        for s in (128, 64, 32):
            yield f"LinearAttention [{b},256,{s},{s}]", _pair(LinearAttention, 256), (torch.randn(b, 256, s, s),)
        scale_shift = (torch.randn(b, 256, 1, 1), torch.randn(b, 256, 1, 1))
        yield f"Block [{b},256,64,64]", _pair(Block, 256, 256), (torch.randn(b, 256, 64, 64), scale_shift)
    yield (f"UNet ADE20K [1,272,{unet_size},{unet_size}]", _pair(UNet, 256, 256, 272, (1, 1, 1)),
           (torch.randn(1, 272, unet_size, unet_size), torch.tensor([5])))


def conv_share(module, args) -> float:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(*args)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
    return conv / total


def run(batches, unet_size, repeats) -> dict:
    rows = []
    for name, (ref, fused), args in cases(batches, unet_size):
        is_unet = name.startswith("UNet")
        for mode in ("fwd",) if is_unet else ("fwd", "fwd+bwd"):
            timings = {}
            for provider, module in (("reference", ref), ("fused", fused)):
                if mode == "fwd":
                    module.eval()

                    def fn(module=module):
                        with torch.no_grad():
                            return module(*args)
                else:
                    module.train()

                    def fn(module=module):
                        module(*args).sum().backward()
                timings[provider] = measure(fn, repeats)
            base = statistics.median(timings["reference"])
            for provider, times in timings.items():
                med = statistics.median(times)
                q = statistics.quantiles(times, n=5) if len(times) > 1 else [med] * 4
                row = dict(case=name, mode=mode, provider=provider, median_ms=med * 1e3, q20_ms=q[0] * 1e3,
                           q80_ms=q[3] * 1e3, speedup=base / med)
                if is_unet:
                    module = ref if provider == "reference" else fused
                    with torch.no_grad(), FlopCounterMode(display=False) as counter:
                        module(*args)
                    row["gflops"] = counter.get_total_flops() / med / 1e9
                    row["conv_share"] = conv_share(module, args)
                rows.append(row)
        with torch.no_grad():
            ref.eval(), fused.eval()
            err = ((fused(*args) - ref(*args)).abs().max() / ref(*args).abs().max()).item()
        rows[-1]["max_rel_error"] = err
    return dict(machine=machine_line(torch.device("cpu")), torch=torch.__version__, rows=rows)


def print_table(result: dict) -> None:
    print(result["machine"])
    print(f"{'case':34s} {'mode':8s} {'provider':10s} {'median ms':>10s} {'q20':>9s} {'q80':>9s} {'speedup':>8s}  extra")
    for r in result["rows"]:
        extra = []
        if "gflops" in r:
            extra.append(f"{r['gflops']:.0f} GFLOP/s, convolutions {100 * r['conv_share']:.0f}% of CPU time")
        if "max_rel_error" in r:
            extra.append(f"fused vs reference max rel. error {r['max_rel_error']:.1e}")
        print(f"{r['case']:34s} {r['mode']:8s} {r['provider']:10s} {r['median_ms']:10.2f} {r['q20_ms']:9.2f} "
              f"{r['q80_ms']:9.2f} {r['speedup']:7.2f}x  {'; '.join(extra)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--unet-size", type=int, default=128, help="mask size of the UNet case (default 128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    result = run(args.batch, args.unet_size, args.repeats)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
