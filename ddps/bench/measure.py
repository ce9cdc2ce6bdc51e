"""Timing, memory and machine facts for ``ddps bench``: every figure of a run is taken by these, in
one process, so ratios between providers are side by side."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


# Both fixed for the life of the process; machine() is asked at the start and end of every run.
@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@functools.cache
def cpu_features() -> str:
    """The vector instructions of this CPU that ddps's kernels and torch's choose by, from
    /proc/cpuinfo: what every CPU figure must be read with."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "flags unknown"
    named = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_bf16", "AMX-BF16"))
    return ", ".join(name for flag, name in named if flag in flags) or "no AVX2"


@functools.cache
def _commit() -> str:
    """The source checkout's commit (with "+dirty" for local changes), or "unknown" for an install
    outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def machine(device: torch.device) -> dict:
    """What every figure is printed with: device, core and thread counts, versions, commit."""
    from .. import __version__

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # any import failure only means "no triton" here
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} cores ({cpu_features()})"
    return dict(device=name, threads=torch.get_num_threads(), torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), ddps=__version__, commit=_commit())


def machine_line(m: dict) -> str:
    """One line naming the machine and versions of ``machine()``'s dict."""
    return (f"device: {m['device']} | torch {m['torch']} | triton {m['triton']} | ddps {m['ddps']} "
            f"({m['commit']}) | torch threads {m['threads']} | python {m['python']}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, repeats: int, device: torch.device, min_time: float = 0.0) -> list[float]:
    """Seconds per call: at least ``repeats`` calls, more (up to 50x) until ``min_time`` has passed,
    so that short calls get enough samples for stable quantiles. The caller has warmed ``fn`` up."""
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50 * repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    """Median and 20/80 % quantiles in ms."""
    med = statistics.median(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [med] * 4
    return dict(median_ms=med * 1e3, q20_ms=q[0] * 1e3, q80_ms=q[3] * 1e3)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints two lines to the stderr file descriptor per profiled call, whatever its log
    level; the call has already run once unprofiled, so nothing else is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiled_call(fn, device: torch.device):
    """(fn's output, the peak memory the call holds above what was live before it). CUDA: the
    caching allocator's peak; CPU: the profiler's allocation and free events, summed in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


def copy_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bandwidth of a copy that moves ``nbytes`` (half read, half written): the yardstick of the
    memory-bound ops' effective GB/s."""
    src = torch.ones(max(nbytes // 8, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return nbytes / statistics.median(measure(lambda: dst.copy_(src), repeats, device, min_time=0.2)) / 1e9
