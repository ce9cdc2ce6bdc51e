"""What the module and head benchmarks share: timing a call, a row of statistics, the table."""
from __future__ import annotations

import json
import statistics
import time


def measure(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timing_row(times: list[float], base: float, **fields) -> dict:
    """fields + median and 20/80 % quantiles in ms, and the speedup over ``base`` seconds."""
    med = statistics.median(times)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [med] * 4
    return dict(fields, median_ms=med * 1e3, q20_ms=q[0] * 1e3, q80_ms=q[3] * 1e3, speedup=base / med)


def print_rows(rows: list[dict], columns: list[tuple[str, int]], extras) -> None:
    """One line per row: the named columns (key, width), the timings, then ``extras(row)``."""
    head = " ".join(f"{key:{width}s}" for key, width in columns)
    print(f"{head} {'median ms':>10s} {'q20':>9s} {'q80':>9s} {'speedup':>8s}  extra")
    for r in rows:
        cells = " ".join(f"{r[key]:{width}s}" for key, width in columns)
        print(f"{cells} {r['median_ms']:10.2f} {r['q20_ms']:9.2f} {r['q80_ms']:9.2f} {r['speedup']:7.2f}x  "
              f"{'; '.join(extras(r))}")


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
