"""``ddps bench``: ddps against the original implementation on the machine at hand.

Every case (see ``ddps.bench.cases``) runs each of its providers in one process: a warm-up call
(which compiles ``compile(reference)``), one call under the memory profiler and FLOP counter that
gives the peak memory and the output compared with the reference's, then the timed calls. Speedups are against the
reference of the same case, measured in the same run.
"""
from __future__ import annotations

import functools
import gc
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from .. import _backend
from . import breakdown, cases as cases_mod
from .profiles import FULL, QUICK, select
from .measure import copy_gbps, machine, measure, profiled_call, summary

def relative_difference(out, expected) -> float:
    """Max |out - expected| / max |expected| over the tensors of an output."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst = 0.0
    for o, r in zip(outs, refs, strict=True):
        o, r = o.detach().double(), r.detach().double()
        worst = max(worst, ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst


def shapes(out):
    return [tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else (out,))]


def _check(case, out, expected) -> str:
    if expected is None:
        return "baseline"
    if case.compare == "values":
        return f"max rel diff {relative_difference(out, expected):.1e}"
    return "same shape" if shapes(out) == shapes(expected) else f"SHAPE {shapes(out)} != {shapes(expected)}"


@functools.cache
def _count_winograd_flops() -> None:
    """Teach the FLOP counter ddps::conv3x3: the FLOPs it does (16 products of Cin x Cout per 2x2
    output tile), not the direct convolution's 2.25x more, so that a head's FLOP floor is what is
    left after the algebraic savings."""
    if _backend.extension() is None:
        return

    @register_flop_formula(torch.ops.ddps.conv3x3)
    def _(x_shape, weight_shape, *_args, out_shape=None, **_kwargs) -> int:
        b, cin, h, w = x_shape
        return 2 * 16 * b * -(-h // 2) * -(-w // 2) * cin * weight_shape[0]


def _counted(fn, counter: FlopCounterMode):
    """fn under ``counter`` (matmul and convolution FLOPs)."""
    def call():
        with counter:
            return fn()
    return call


def run(cases, device: torch.device, profile: str = QUICK, repeats: int | None = None, log=None,
        dtype: str = "fp32") -> dict:
    """Measure every case; ``log(row)`` is called as each row is ready (for live printing).
    ``dtype``: see ``cases.with_dtype``. The quick profile leaves torch.compile out (its compile
    time), and its end-to-end cases warm up in their profiled call (one call less each)."""
    from . import floor  # not at import: `python -m ddps.bench.floor` would find it imported twice
    _count_winograd_flops()
    # Every case compiles its own shapes of the same module code: past dynamo's default of 8
    # graphs per code object the compile(reference) rows would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    rows = []
    for case in cases:
        providers = case.build(device)
        if list(providers) != case.provider_names(device):
            raise RuntimeError(f"case {case.name}: built {list(providers)}, declared {case.provider_names(device)}")
        if profile == QUICK:
            providers = {name: fn for name, fn in providers.items() if not name.startswith("compile")}
        providers = cases_mod.with_dtype(case, providers, dtype, device)
        copy = copy_gbps(case.nbytes, device, 5) if case.nbytes else None
        # On a GPU: the case's floor on paper (ddps.bench.floor), of which each row reaches a fraction.
        gpu_floor = floor.floor_ms(*floor.case_work(case, providers["reference"]),
                                   floor.gpu_of(torch.cuda.get_device_name(device)),
                                   "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32") \
            if device.type == "cuda" else None
        expected = base = None
        for name, fn in providers.items():
            row = dict(case=case.name, group=case.group, shape=case.shape, mode=case.mode, provider=name)
            try:
                out = _measure(row, case, name, fn, device, profile, repeats)
            except Exception as exc:  # reported in the table; the run goes on and exits non-zero
                row = dict(row, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            else:
                if case.breakdown and name not in cases_mod.PLAIN:
                    row["op_ms"] = breakdown.op_times(fn, device)
                row["check"] = _check(case, out, expected)
                expected = out if expected is None else expected
                del out
                base = base or row["median_ms"]
                row["speedup"] = base / row["median_ms"]
                if case.nbytes:
                    row["gbps"], row["copy_gbps"] = case.nbytes / row["median_ms"] / 1e6, copy
                if gpu_floor is not None:
                    row["gpu_floor_ms"], row["floor_pct"] = gpu_floor, 100 * gpu_floor / row["median_ms"]
            rows.append(row)
            log and log(row)
        del providers, expected
        gc.collect()
    return dict(machine=machine(device), profile=profile, dtype=dtype, rows=rows)


def _measure(row: dict, case, name: str, fn, device, profile: str, repeats: int | None):
    """One provider of a case into ``row`` (peak memory, GFLOP/s, timings); returns its output."""
    compiled = name.startswith("compile")
    heavy_quick = case.heavy and profile == QUICK
    if not heavy_quick:
        fn()  # warm-up (caches, compilation) outside the profiler: the peak is a steady call's
    counter = FlopCounterMode(display=False)
    out, peak = profiled_call(_counted(fn, counter) if case.flops and not compiled else fn, device)
    row["peak_mb"] = peak / 2**20
    reps = repeats or (1 if heavy_quick else 5)
    row.update(summary(measure(fn, reps, device, 0.0 if case.heavy else 0.3)))
    if case.flops and not compiled:
        row["gflops"] = counter.get_total_flops() / row["median_ms"] / 1e6
        conv3x3 = counter.get_flop_counts()["Global"].get(getattr(torch.ops.ddps, "conv3x3", None), 0)
        if conv3x3:
            row["conv3x3_gflop"] = conv3x3 / 1e9
    return out


def peak_conv_gflops(device: torch.device) -> float:
    """The best throughput of the head's dominant convolution (3x3, 256 -> 256, 128 x 128) over both
    memory formats: the rate at which the FLOP floor of a head is priced."""
    best = 0.0
    w = torch.randn(256, 256, 3, 3, device=device)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 256, 128, 128, device=device).contiguous(memory_format=fmt)
        wf = w.contiguous(memory_format=fmt)
        torch.nn.functional.conv2d(x, wf, padding=1)
        sec = summary(measure(lambda: torch.nn.functional.conv2d(x, wf, padding=1), 3, device))["median_ms"] / 1e3
        best = max(best, 2 * 256 * 256 * 9 * 128 * 128 / sec / 1e9)
    return best


# Winograd's products per output of a 3x3 convolution: F(2x2, 3x3), conv3x3's today, multiplies 16
# times per 2x2 tile, F(4x4, 3x3) 36 times per 4x4 tile
PRODUCTS_F2, PRODUCTS_F4 = 16 / 4, 36 / 16


def add_floor(result: dict, device: torch.device) -> None:
    """The FLOP floor of each ddps head row: its FLOPs (after the head-level savings) at the
    measured peak convolution throughput; and the floor with conv3x3's multiply stage at
    F(4x4, 3x3)'s products, the next bound."""
    rows = [r for r in result["rows"] if r["provider"] == "ddps" and "gflops" in r]
    if not rows:
        return
    peak = peak_conv_gflops(device)
    result["peak_conv_gflops"] = peak
    for r in rows:
        gflop = r["gflops"] * r["median_ms"] / 1e3
        r["floor_ms"] = gflop / peak * 1e3
        if "conv3x3_gflop" in r:
            saved = r["conv3x3_gflop"] * (1 - PRODUCTS_F4 / PRODUCTS_F2)
            r["floor_f4_ms"] = (gflop - saved) / peak * 1e3


def main(args) -> int:
    """``ddps bench`` with parsed arguments (see ``ddps.app.cli.bench``)."""
    from . import report

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ddps bench: --device cuda needs a visible CUDA device (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    profile = FULL if args.full else QUICK
    try:
        cases = select(profile, args.size, args.cases)
    except ValueError as exc:
        print(f"ddps bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(f"{c.name:22s} {c.group:12s} {c.mode:8s} {c.shape}")
        return 0
    if args.plot:
        report.check_plotting()
    start = time.perf_counter()
    print(report.header(machine(device), profile, args.size, args.dtype))
    printer = report.LivePrinter()
    result = run(cases, device, profile, args.repeats, printer, args.dtype)
    add_floor(result, device)
    result.update(size=args.size, seconds=time.perf_counter() - start, command=" ".join(["ddps bench", *args.argv]))
    written = []
    for path, writer in ((args.json, report.write_json), (args.csv, report.write_csv), (args.plot, report.write_plot),
                         (args.markdown, report.write_markdown)):
        if path:
            writer(result, path)
            written.append(path)
    headline = {(c.name, c.mode, c.shape) for c in select(QUICK, args.size)}
    print(report.summary_lines(result, headline, written))
    failed = [r for r in result["rows"] if "error" in r]
    return 1 if failed else 0
