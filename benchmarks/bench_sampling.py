"""Sampling ops side by side: the original's dense ops (reference), torch.compile of them, the best
plain-torch formulation on labels, and each ddps backend.

    python benchmarks/bench_sampling.py [--batch 4] [--size 128] [--classes 151] [--json FILE]
    pytest benchmarks/bench_sampling.py --benchmark-only

Every figure of one run comes from the same process, so ratios are side by side. "GB/s" counts
the bytes an op must move (its inputs read once, its output written once) against a measured copy
of the same number of bytes; "alloc MB" is what the call allocated (torch profiler).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import pytest
import torch

import ddps
from ddps import DiffusionSchedule, reference
from ddps.cli import machine_line
from ddps.ops import _tables, p_posterior_sample, q_posterior_sample, q_sample, renoise

FUSED = [b for b in ("cpu",) if ddps.backends()[b]["available"]]


# --- the best plain-torch formulations on labels (no [B, K, ...] tensors) ---------------------
def plain_q_sample(x0, t, schedule):
    table = schedule.table("q_sample", _tables.q_sample_table).double() / 2**32
    u = torch.rand(x0.shape, dtype=torch.float64)
    level = table[t].reshape(-1, *([1] * (x0.dim() - 1)), 2)
    noised = torch.where(u < level[..., 1], schedule.num_classes, torch.randint_like(x0, schedule.num_classes))
    return torch.where(u < level[..., 0], x0, noised)


def plain_q_posterior_sample(x0, x_t, t, schedule):
    table = schedule.table("q_posterior_sample", _tables.q_posterior_table).double() / 2**32
    case = torch.where(x_t == x0, 0, 1)
    b = torch.arange(x0.shape[0]).reshape(-1, *([1] * (x0.dim() - 1)))
    to_xt, to_x0 = table[t[b], case].unbind(-1)
    u = torch.rand(x0.shape, dtype=torch.float64)
    lo, hi = torch.minimum(x0, x_t), torch.maximum(x0, x_t)
    idx = torch.randint_like(x0, schedule.num_classes - 2)
    idx = idx + (idx >= lo)
    idx = idx + ((hi != lo) & (idx >= hi))
    return torch.where(u < to_xt, x_t, torch.where(u < to_x0, x0, idx))


def plain_renoise(logits, t, schedule):
    return plain_q_sample(logits.argmax(1), t, schedule)


def make_cases(batch: int, size: int, classes: int):
    schedule = DiffusionSchedule(20, classes)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, classes, (batch, size, size), generator=g)
    x_t = torch.randint(0, classes, (batch, size, size), generator=g)
    logits = torch.randn(batch, classes, size, size, generator=g)
    t = torch.arange(batch) * 19 // max(batch - 1, 1)
    labels = x0.numel() * 8
    return {
        "q_sample": dict(bytes=2 * labels, providers={
            "reference": lambda: reference.q_pred(x0, t, schedule),
            "compile(reference)": (reference.q_pred, (x0, t, schedule)),
            "plain-torch": lambda: plain_q_sample(x0, t, schedule),
            **{b: (lambda b=b: q_sample(x0, t, schedule, backend=b)) for b in FUSED}}),
        "q_posterior_sample": dict(bytes=3 * labels, providers={
            "reference": lambda: reference.q_posterior(x0, x_t, t, schedule),
            "compile(reference)": (reference.q_posterior, (x0, x_t, t, schedule)),
            "plain-torch": lambda: plain_q_posterior_sample(x0, x_t, t, schedule),
            **{b: (lambda b=b: q_posterior_sample(x0, x_t, t, schedule, backend=b)) for b in FUSED}}),
        "renoise": dict(bytes=logits.numel() * 4 + labels, providers={
            "reference": lambda: reference.q_pred(logits.argmax(1), t, schedule),
            "compile(reference)": (lambda l: reference.q_pred(l.argmax(1), t, schedule), (logits,)),
            "plain-torch": lambda: plain_renoise(logits, t, schedule),
            **{b: (lambda b=b: renoise(logits, t, schedule, backend=b)) for b in FUSED}}),
        "p_posterior_sample": dict(bytes=logits.numel() * 4 + 2 * labels, providers={
            "reference": lambda: reference.p_posterior(logits, x_t, t, schedule),
            **{b: (lambda b=b: p_posterior_sample(logits, x_t, t, schedule, backend=b)) for b in FUSED}}),
    }


def _callable(spec):
    if isinstance(spec, tuple):  # (function, args): torch.compile of the reference
        fn, args = spec
        compiled = torch.compile(fn)
        return lambda: compiled(*args)
    return spec


def measure(fn, repeats: int, min_time: float = 0.2) -> list[float]:
    fn()  # warm-up (and compilation)
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def allocated_bytes(fn) -> int:
    """Bytes allocated by the call's top-level ATen ops (what it allocates, freed or not)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and e.cpu_parent is None)


def copy_seconds(nbytes: int, repeats: int) -> float:
    """Median time of a copy that reads and writes nbytes / 2 each (nbytes moved)."""
    src = torch.ones(max(nbytes // 8, 1), dtype=torch.float32)
    dst = torch.empty_like(src)
    return statistics.median(measure(lambda: dst.copy_(src), repeats))


def run(batch: int, size: int, classes: int, repeats: int, ops=None) -> dict:
    rows = []
    for op, case in make_cases(batch, size, classes).items():
        if ops and op not in ops:
            continue
        copy = copy_seconds(case["bytes"], repeats)
        base = None
        for provider, spec in case["providers"].items():
            fn = _callable(spec)
            times = measure(fn, repeats)
            quintiles = statistics.quantiles(times, n=5)
            med = statistics.median(times)
            base = base or med
            rows.append(dict(op=op, provider=provider, median_ms=med * 1e3, q20_ms=quintiles[0] * 1e3,
                             q80_ms=quintiles[3] * 1e3, speedup=base / med, gbps=case["bytes"] / med / 1e9,
                             copy_gbps=case["bytes"] / copy / 1e9,
                             # The profiler does not see the buffers inside an Inductor kernel.
                             alloc_mb=None if isinstance(spec, tuple) else allocated_bytes(fn) / 2**20))
    return dict(machine=machine_line(torch.device("cpu")), torch=torch.__version__, batch=batch, size=size,
                classes=classes, rows=rows)


def print_table(result: dict) -> None:
    print(result["machine"])
    print(f"B={result['batch']}, K={result['classes']}, {result['size']}x{result['size']}; speedup vs reference")
    print(f"{'op':20s} {'provider':20s} {'median ms':>10s} {'q20':>9s} {'q80':>9s} {'speedup':>9s} "
          f"{'GB/s':>7s} {'copy GB/s':>9s} {'alloc MB':>9s}")
    for r in result["rows"]:
        print(f"{r['op']:20s} {r['provider']:20s} {r['median_ms']:10.3f} {r['q20_ms']:9.3f} {r['q80_ms']:9.3f} "
              f"{r['speedup']:8.1f}x {r['gbps']:7.2f} {r['copy_gbps']:9.2f} "
              + (f"{r['alloc_mb']:9.2f}" if r["alloc_mb"] is not None else f"{'n/a':>9s}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, default=151)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ops", nargs="*", help="subset of ops (default: all)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    result = run(args.batch, args.size, args.classes, args.repeats, args.ops)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


@pytest.fixture(scope="module")
def cases():
    return make_cases(4, 128, 151)


@pytest.mark.parametrize("op,provider", [(op, p) for op, c in make_cases(1, 8, 151).items() for p in c["providers"]])
def test_sampling(benchmark, cases, op, provider):
    benchmark.group = f"{op} B=4 K=151 128x128"
    benchmark.extra_info["machine"] = machine_line(torch.device("cpu"))
    fn = _callable(cases[op]["providers"][provider])
    fn()
    assert benchmark(fn).shape == (4, 128, 128)


if __name__ == "__main__":
    sys.exit(main())
