"""Denoiser modules side by side: reference (the original's ops) and fused (ddps.ops), with the
same weights, forward and forward + backward, at the ADE20K denoiser's shapes.

    python benchmarks/bench_denoiser.py [--batch 1 4] [--unet-size 128] [--json FILE]

Every figure of one run comes from one process, so ratios are side by side. The fused modules are
run as inside UNet(backend="fused"): channels-last weights and activations. The UNet row also
reports the share of the reference forward spent in convolutions (torch profiler) and the
achieved GFLOP/s of both (FLOPs of the convolutions and matmuls counted by torch's FlopCounterMode).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddps.cli import machine_line
from timing import measure, print_rows, timing_row, write_json
from ddps import ops
from ddps.nn.unet import Attention, Block, LinearAttention, UNet, op_backend


class Epilogue(torch.nn.Module):
    """The Block epilogue alone (GroupNorm -> FiLM -> SiLU), with GroupNorm(8)'s parameters."""

    def __init__(self, dim: int, backend: str = "reference"):
        super().__init__()
        self.backend = backend
        self.norm = torch.nn.GroupNorm(8, dim)

    def forward(self, x, scale_shift):
        return ops.group_norm_film_silu(x, self.norm.weight, self.norm.bias, *scale_shift, 8,
                                        backend=op_backend(self.backend))


def _pair(cls, *args, **kwargs):
    torch.manual_seed(0)
    ref = cls(*args, **kwargs)
    fused = cls(*args, **kwargs, backend="fused")
    fused.load_state_dict(ref.state_dict())
    # As inside UNet(backend="fused"): channels-last weights (the UNet converts its input once).
    return ref, fused.to(memory_format=torch.channels_last)


def _channels_last(args):
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def cases(batches, unet_size):
    """(name, (reference module, fused module), reference args, fused args): the fused modules get
    channels-last activations, as the fused UNet gives them; the UNet converts its input itself."""
    for b in batches:
        x32 = torch.randn(b, 256, 32, 32)
        yield f"Attention mid [{b},256,32,32]", _pair(Attention, 256), (x32,), _channels_last((x32,))
        for s in (128, 64, 32):
            x = torch.randn(b, 256, s, s)
            yield f"LinearAttention [{b},256,{s},{s}]", _pair(LinearAttention, 256), (x,), _channels_last((x,))
        scale_shift = (torch.randn(b, 256, 1, 1), torch.randn(b, 256, 1, 1))
        x64 = torch.randn(b, 256, 64, 64)
        yield f"Block [{b},256,64,64]", _pair(Block, 256, 256), (x64, scale_shift), _channels_last((x64,)) + (
            scale_shift,)
        # The epilogue's input carries a gradient in the UNet (the conv's output).
        x64 = x64.clone().requires_grad_()
        yield (f"Block epilogue [{b},256,64,64]", _pair(Epilogue, 256), (x64, scale_shift),
               (x64.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), scale_shift))
    args = (torch.randn(1, 272, unet_size, unet_size), torch.tensor([5]))
    yield f"UNet ADE20K [1,272,{unet_size},{unet_size}]", _pair(UNet, 256, 256, 272, (1, 1, 1)), args, args


def conv_share(module, args) -> float:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(*args)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
    return conv / total


def run(batches, unet_size, repeats) -> dict:
    rows = []
    for name, (ref, fused), ref_args, fused_args in cases(batches, unet_size):
        is_unet = name.startswith("UNet")
        for mode in ("fwd",) if is_unet else ("fwd", "fwd+bwd"):
            timings = {}
            for provider, module, args in (("reference", ref, ref_args), ("fused", fused, fused_args)):
                if mode == "fwd":
                    module.eval()

                    def fn(module=module, args=args):
                        with torch.no_grad():
                            return module(*args)
                else:
                    module.train()

                    def fn(module=module, args=args):
                        module(*args).sum().backward()
                timings[provider] = measure(fn, repeats)
            base = statistics.median(timings["reference"])
            for provider, times in timings.items():
                row = timing_row(times, base, case=name, mode=mode, provider=provider)
                if is_unet:
                    module, args = (ref, ref_args) if provider == "reference" else (fused, fused_args)
                    with torch.no_grad(), FlopCounterMode(display=False) as counter:
                        module(*args)
                    row["gflops"] = counter.get_total_flops() / (row["median_ms"] / 1e3) / 1e9
                    row["conv_share"] = conv_share(module, args)
                rows.append(row)
        with torch.no_grad():
            ref.eval(), fused.eval()
            expected = ref(*ref_args)
            err = ((fused(*fused_args) - expected).abs().max() / expected.abs().max()).item()
        rows[-1]["max_rel_error"] = err
    return dict(machine=machine_line(torch.device("cpu")), torch=torch.__version__, rows=rows)


def print_table(result: dict) -> None:
    def extras(r):
        if "gflops" in r:
            yield f"{r['gflops']:.0f} GFLOP/s, convolutions {100 * r['conv_share']:.0f}% of CPU time"
        if "max_rel_error" in r:
            yield f"fused vs reference max rel. error {r['max_rel_error']:.1e}"

    print(result["machine"])
    print_rows(result["rows"], [("case", 34), ("mode", 8), ("provider", 10)], extras)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--unet-size", type=int, default=128, help="mask size of the UNet case (default 128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    result = run(args.batch, args.unet_size, args.repeats)
    print_table(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
