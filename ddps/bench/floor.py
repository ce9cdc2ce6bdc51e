"""The GPU floor on paper: for a case of ``ddps bench``, the bytes it must move (each input the
original reads once, each output written once) and the FLOPs it must do (the original's matmul and
convolution FLOPs), and the time those take at a GPU's published memory bandwidth and dense fp32 /
tf32 / bf16 peaks. No implementation runs faster than the larger of the two times; ``ddps bench
--device cuda`` prints the fraction of it that each provider reaches.

``python -m ddps.bench.floor --markdown benchmarks/GPU_FLOOR.md`` writes the table for every case
of the full profile at the ADE20K shapes, counted on the CPU.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .profiles import select

# Published (vendors' datasheets): HBM bandwidth in bytes/s and dense (no sparsity) peaks in FLOP/s.
GPUS = {
    "A100": dict(name="A100 SXM4 80 GB", bandwidth=2.039e12, fp32=19.5e12, tf32=156e12, bf16=312e12),
    "H100": dict(name="H100 SXM5 80 GB", bandwidth=3.35e12, fp32=67e12, tf32=494.7e12, bf16=989.4e12),
    "H200": dict(name="H200 SXM 141 GB", bandwidth=4.8e12, fp32=67e12, tf32=494.7e12, bf16=989.4e12),
}
PRECISIONS = ("fp32", "tf32", "bf16")


class _Reads(TorchDispatchMode):
    """Bytes of the storages an operation sequence reads that it did not make itself (its inputs
    and parameters), each counted once."""

    def __init__(self):
        super().__init__()
        self.made, self.read = set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                if key not in self.made:
                    self.read[key] = t.untyped_storage().nbytes()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.add(t.untyped_storage().data_ptr())
        return out


def work(fn) -> tuple[int, int]:
    """(bytes, FLOPs) of one call of ``fn``: its external reads plus the bytes of what it returns;
    matmul and convolution FLOPs."""
    counter, reads = FlopCounterMode(display=False), _Reads()
    with counter, reads:
        out = fn()
    written = sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    return sum(reads.read.values()) + written, counter.get_total_flops()


def floor_ms(nbytes: int, flops: int, gpu: str, precision: str) -> float:
    spec = GPUS[gpu]
    return max(nbytes / spec["bandwidth"], flops / spec[precision]) * 1e3


def gpu_of(device_name: str) -> str:
    """The GPUS entry whose figures fit a device (by name); H100's for other Hopper parts."""
    for key in ("H200", "H100", "A100"):
        if key in device_name:
            return key
    return "H100"


def case_work(case, reference) -> tuple[int, int]:
    """(bytes, FLOPs) of a case. The memory-bound ops declare their bytes, and their fused kernels
    do elementwise work only (the original's one-hot matmuls are not work the result needs): no
    FLOPs. Other cases: counted on a call of ``reference`` (the case's reference provider), after a
    warm-up call."""
    if case.nbytes:
        return case.nbytes, 0
    reference()
    return work(reference)


def rows(size: int = 128, full: bool = True, names=None) -> list[dict]:
    out = []
    for case in select("full" if full else "quick", size, names):
        nbytes, flops = case_work(case, case.build(torch.device("cpu"))["reference"])
        out.append(dict(case=case.name, mode=case.mode, shape=case.shape, bytes=nbytes, flops=flops))
    return out


def markdown(table: list[dict], size: int) -> str:
    lines = ["# The GPU floor of every benchmark case, on paper", "",
             f"Written by `python -m ddps.bench.floor` (mask size {size}, the ADE20K head's shapes; counted on the "
             "CPU with torch's FLOP counter and a dispatch mode that records what the original's operations "
             "read). Bytes: each input and parameter the original reads, once, plus each output, once. FLOPs: the "
             "original's matmuls and convolutions (elementwise work is left out: it hides under the bytes). "
             "The memory-bound ops (the samplers, posterior_log_probs and the norms) count the bytes `ddps "
             "bench` declares for them and no FLOPs: their fused kernels do elementwise work only. Floor = max(bytes / "
             "bandwidth, FLOPs / peak), in ms, at the published dense peaks:", ""]
    lines += [f"- {g['name']}: {g['bandwidth'] / 1e12:.2f} TB/s; fp32 {g['fp32'] / 1e12:.1f}, tf32 "
              f"{g['tf32'] / 1e12:.1f}, bf16 {g['bf16'] / 1e12:.1f} TFLOP/s" for k, g in GPUS.items() if k != "H200"]
    lines += ["", "`ddps bench --device cuda` prints, for each provider, the fraction of the floor it reaches on the "
              "device at hand (H200's 4.8 TB/s with the H100's peaks on an H200).", ""]
    heads = [f"{gpu} {p}" for gpu in ("A100", "H100") for p in PRECISIONS]
    lines += ["| case | mode | shape | MB | GFLOP | " + " | ".join(f"{h} ms" for h in heads) + " |",
              "|" + " --- |" * (5 + len(heads))]
    for r in table:
        floors = [floor_ms(r["bytes"], r["flops"], gpu, p) for gpu in ("A100", "H100") for p in PRECISIONS]
        lines.append(f"| {r['case']} | {r['mode']} | {r['shape']} | {r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | "
                     + " | ".join(f"{f:.4f}" for f in floors) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddps.bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="mask size S (default 128, the ADE20K head's)")
    parser.add_argument("--cases", nargs="+", help="only these cases")
    parser.add_argument("--markdown", metavar="FILE", help="write the table to FILE (default: print it)")
    args = parser.parse_args(argv)
    try:
        table = rows(args.size, True, args.cases)
    except ValueError as exc:  # an unknown case, named by ddps.bench.profiles.select
        parser.error(str(exc))
    text = markdown(table, args.size)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
        print(f"wrote {args.markdown}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
