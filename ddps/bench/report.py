"""The outputs of ``ddps bench``: the live table, JSON, CSV, a PNG plot and benchmarks/RESULTS.md."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from .measure import machine_line

COLUMNS = ("median ms", "q20", "q80", "speedup", "GB/s", "copy GB/s", "GFLOP/s", "peak MB")
CSV_FIELDS = ("case", "group", "mode", "shape", "provider", "median_ms", "q20_ms", "q80_ms", "speedup", "gbps",
              "copy_gbps", "gflops", "peak_mb", "floor_ms", "gpu_floor_ms", "floor_pct", "check", "error", "device", "threads",
              "torch", "triton", "python", "ddps", "commit")


def header(machine: dict, profile: str, size: int, dtype: str = "fp32") -> str:
    lowp = f"; rows 'provider[{dtype}]' run under torch.autocast({dtype})" if dtype != "fp32" else ""
    quick = "; torch.compile of the reference and the other cases run with --full" if profile == "quick" else ""
    return (f"{machine_line(machine)}\nprofile: {profile}, mask size {size}{lowp}; speedup = reference (float32) "
            f"median / provider median, both measured in this run{quick}")


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def cells(row: dict) -> list[str]:
    """The table cells of a row, in COLUMNS order, then the note (check or error)."""
    if "median_ms" not in row:
        return [""] * len(COLUMNS) + [f"ERROR {row.get('error')}"]
    note = row.get("check", "")
    if "floor_ms" in row:
        note += f"; FLOP floor {row['floor_ms']:.0f} ms"
    if "floor_pct" in row:
        note += f"; {row['floor_pct']:.1f}% of the GPU floor ({row['gpu_floor_ms']:.4f} ms)"
    return [_num(row["median_ms"], ".3f"), _num(row["q20_ms"], ".3f"), _num(row["q80_ms"], ".3f"),
            _num(row["speedup"], ".2f") + "x", _num(row.get("gbps"), ".1f"), _num(row.get("copy_gbps"), ".1f"),
            _num(row.get("gflops"), ".0f"), _num(row.get("peak_mb"), ".1f"), note]


class LivePrinter:
    """Prints each row as it is measured, with a title line whenever the case changes."""

    def __init__(self):
        self.last = None

    def __call__(self, row: dict) -> None:
        key = (row["case"], row["mode"], row["shape"])
        if key != self.last:
            self.last = key
            print(f"\n{row['case']} {row['mode']}  {row['shape']}")
            print(f"  {'provider':20s}" + "".join(f"{c:>11s}" for c in COLUMNS) + "  check")
        values = cells(row)
        print(f"  {row['provider']:20s}" + "".join(f"{v:>11s}" for v in values[:-1]) + f"  {values[-1]}", flush=True)


def summary_lines(result: dict, headline, written=()) -> str:
    """What a run comes to: for each of the ``headline`` cases ((case, mode, shape) keys) that ran,
    the fastest ddps provider's speedup over the reference; the FLOP floors, failures, the machine
    and the files written."""
    lines = [f"\nSummary: {result['profile']} profile, {len(result['rows'])} rows in {result['seconds']:.0f} s; "
             "speedup of ddps's fastest provider over the original's eager ops (reference), both measured here"]
    best = {}
    for r in result["rows"]:
        key = (r["case"], r["mode"], r["shape"])
        ddps = r["provider"] not in ("reference", "plain-torch") and not r["provider"].startswith("compile")
        if key in headline and ddps and "speedup" in r and r["speedup"] > best.get(key, {}).get("speedup", 0):
            best[key] = r
    for (case, mode, shape), r in best.items():
        ms = r["median_ms"]
        lines.append(f"  {case:20s} {mode:8s} {r['provider']:6s} {r['speedup']:7.2f}x  "
                     f"{ms:{'.0f' if ms >= 100 else '.3g'}} ms   {shape}")
    if "peak_conv_gflops" in result:
        lines.append(f"peak convolution throughput (3x3, 256->256, 128x128): {result['peak_conv_gflops']:.0f} GFLOP/s")
    for r in result["rows"]:
        if "floor_ms" in r:
            lines.append(f"{r['case']}: ddps {r['median_ms']:.0f} ms, FLOP floor {r['floor_ms']:.0f} ms "
                         f"(its FLOPs at the peak convolution throughput)"
                         + (f", {r['floor_f4_ms']:.0f} ms with conv3x3 at F(4x4, 3x3)" if "floor_f4_ms" in r else ""))
    for r in result["rows"]:
        if "op_ms" in r:
            lines.append(f"{r['case']} {r['provider']}, time by op (one profiled call): " + op_shares(r["op_ms"]))
    errors = [r for r in result["rows"] if "error" in r]
    if errors:
        lines.append(f"{len(errors)} provider(s) failed: " + ", ".join(f"{r['case']}/{r['provider']}" for r in errors))
    lines.append(machine_line(result["machine"]))
    lines.append("results: " + (", ".join(written) if written else "printed above only (--json, --csv, --plot, "
                                "--markdown write them to files)"))
    return "\n".join(lines)


def op_shares(op_ms: dict) -> str:
    """'conv3x3 66.7%, 1x1 convolutions 12.6%, ...' in ``op_ms``'s order."""
    total = sum(op_ms.values()) or 1.0
    return ", ".join(f"{kind} {100 * ms / total:.1f}%" for kind, ms in op_ms.items())


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory and rename it: a reader never sees a
    half-written file, and an interrupted run leaves the old one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make a report only its writer can read
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(result: dict, path: str) -> None:
    _atomic_write(path, lambda f: json.dump(result, f, indent=1))


def write_csv(result: dict, path: str) -> None:
    def write(f):
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**result["machine"], **row})
    _atomic_write(path, write)


def check_plotting() -> None:
    """Fail before measuring, not after, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"ddps bench: --plot needs matplotlib ({exc}); pip install matplotlib") from exc


def write_plot(result: dict, path: str) -> None:
    """Horizontal bars: each provider's speedup over the reference, one bar group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "speedup" in r and r["provider"] != "reference"]
    labels = [f"{r['case']} {r['mode']} [{r['shape']}] {r['provider']}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.25 * len(rows) + 1.5))
    # ddps's providers in blue, the stock-torch ones (plain torch, torch.compile) in grey
    stock = [r["provider"] == "plain-torch" or r["provider"].startswith("compile") for r in rows]
    bars = ax.barh(range(len(rows)), [r["speedup"] for r in rows],
                   color=["tab:gray" if s else "tab:blue" for s in stock])
    ax.bar_label(bars, [f"{r['speedup']:.3g}x" for r in rows], fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over reference (log scale)")
    m = result["machine"]
    ax.set_title(f"ddps bench ({result['profile']}): {m['device']}, torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def markdown(result: dict) -> str:
    m = result["machine"]
    out = ["# ddps benchmark results", "",
           f"Generated by `{result['command']}` ({result['profile']} profile, mask size {result['size']}, "
           f"{result['seconds']:.0f} s).", "",
           f"- device: {m['device']} (torch threads {m['threads']})",
           f"- torch {m['torch']}, triton {m['triton']}, python {m['python']}, "
           f"ddps {m['ddps']} at commit {m['commit']}",
           "", "Median and 20/80 % quantiles in ms over repeated calls; speedup = reference median / provider "
           "median, measured side by side in this run. GB/s: bytes the op must move per second (copy GB/s: a "
           "plain copy of the same bytes). GFLOP/s: convolution and matmul FLOPs of the call per second. "
           "Peak MB: memory the call holds above what was live before it."]
    if "peak_conv_gflops" in result:
        out.append(f"FLOP floor of a ddps head row: its FLOPs at the peak convolution throughput measured here "
                   f"({result['peak_conv_gflops']:.0f} GFLOP/s).")
    group = None
    for row in result["rows"]:
        if row["group"] != group:
            group = row["group"]
            out += ["", f"## {group}", "", "| case | mode | shape | provider | " + " | ".join(COLUMNS) + " | check |",
                    "|" + " --- |" * (len(COLUMNS) + 5)]
        out.append(f"| {row['case']} | {row['mode']} | {row['shape']} | {row['provider']} | "
                   + " | ".join(cells(row)) + " |")
    broken_down = [r for r in result["rows"] if "op_ms" in r]
    if broken_down:
        out += ["", "## Where the time goes", "",
                "Each kind of op's own time in one call under torch's profiler (its overhead included), and its "
                "share of their sum.", "",
                "| case | provider | " + " | ".join(broken_down[0]["op_ms"]) + " |",
                "|" + " --- |" * (len(broken_down[0]["op_ms"]) + 2)]
        for r in broken_down:
            total = sum(r["op_ms"].values()) or 1.0
            out.append(f"| {r['case']} | {r['provider']} | "
                       + " | ".join(f"{ms:.0f} ms ({100 * ms / total:.1f}%)" for ms in r["op_ms"].values()) + " |")
        floors = [r for r in broken_down if "floor_f4_ms" in r]
        out += [""] + [f"{r['case']} ({r['provider']}): FLOP floor {r['floor_ms']:.0f} ms; with conv3x3's multiply "
                       f"stage at F(4x4, 3x3)'s products (36 per 16 outputs, against 16 per 4), "
                       f"{r['floor_f4_ms']:.0f} ms." for r in floors]
    return "\n".join(out) + "\n"


def write_markdown(result: dict, path: str) -> None:
    text = markdown(result)
    _atomic_write(path, lambda f: f.write(text))
