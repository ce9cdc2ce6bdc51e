"""Every Triton kernel of ddps compiled for real for NVIDIA targets, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``, what the tests run on CPU) checks what a kernel computes,
not whether Triton can compile it, nor what it costs a GPU: type errors that the interpreter
tolerates, register spills and shared memory over a target's per-block limit show only when the
kernel goes through Triton's compiler and ptxas (both ship in the triton wheel; no driver is
needed). This module calls every launcher in ``ddps.kernels`` with meta tensors shaped, typed and
laid out as the ops hand them over, records the launches instead of running them (kernel,
specialisation, constexprs, options: what the launcher picks), compiles each distinct variant
for sm_80, sm_86 and sm_90, and checks the result against the budgets below.

``python -m ddps.bench.gpu_compile --markdown benchmarks/GPU_COMPILE.md [--triton DIR ...]``
(``make gpu-compile-check``): ``--triton DIR`` runs the same check once more with the Triton
installed in DIR (``pip install --target DIR triton==X``) ahead on the path; exit status 1 on any
failure.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from .gpu_launches import HEAD_DIMS, SHIPPED_D, SHORT, Launch, capture

# name -> (compute capability, the largest shared memory one block may use, bytes: the
# cudaDevAttrMaxSharedMemoryPerBlockOptin of the A100 / RTX 30xx and 40xx / H100 class)
TARGETS = {"sm_80": (80, 163 * 1024), "sm_86": (86, 99 * 1024), "sm_90": (90, 227 * 1024)}

# The spill budget, bytes per thread (spill stores + spill loads as ptxas reports them): none in
# the configurations the shipped model runs (head width 32 in float32, bfloat16 and float16); a
# few words elsewhere (head widths 16, 64 and 128 and float64 spill up to 24 B with Triton 3.9
# and 32 B with 3.7.1, in a few variants; smaller tiles would cost every variant speed).
SPILL_BUDGET = {"shipped": 0, "other": 64}

# Kernels whose samples the package promises bitwise equal on every backend: compiled without
# floating-point contraction, so their PTX holds no fma (the CPU build has -ffp-contract=off, the
# CUDA kernels __fmul_rn/__fadd_rn) and no flush-to-zero arithmetic.
NO_CONTRACTION = ("_q_sample_fwd_kernel", "_q_posterior_sample_fwd_kernel", "_p_posterior_sample_fwd_kernel",
                  "_renoise_fwd_kernel", "_maskige_decode_fwd_kernel")

@dataclass
class Result:
    kernel: str
    variant: str
    target: str
    triton: str
    cases: list = field(default_factory=list)
    shipped: bool = False
    registers: int | None = None
    spill_bytes: int | None = None
    shared: int | None = None
    fma: int | None = None
    ftz: int | None = None
    error: str | None = None
    problems: list = field(default_factory=list)
    seconds: float | None = None
    cached: bool = False


def _specialise(launch: Launch, target):
    """(key, ASTSource, options) of a launch, as triton.jit's own launch path would build them."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    key = json.dumps([_name(kernel), signature, sorted((str(k), str(v)) for k, v in constexprs.items()),
                      sorted((str(k), str(v)) for k, v in attrs.items()),
                      sorted((k, str(v)) for k, v in options.__dict__.items())])
    return key, ASTSource(kernel, signature, constexprs, attrs), options


def _name(kernel) -> str:
    """module.kernel: several modules have a ``_fwd_kernel``."""
    return f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"


def _variant(launch: Launch) -> str:
    """What distinguishes a launch of one kernel in the table: its dtypes and constexprs."""
    dtypes = sorted({SHORT.get(a.dtype, str(a.dtype)) for a in launch.args if isinstance(a, torch.Tensor)})
    consts = [f"{k}={v}" for k, v in launch.kwargs.items() if k not in ("enable_fp_fusion",)]
    return " ".join(["/".join(dtypes), *consts])


PTXAS = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(launch_index: int, target_name: str, shipped: bool) -> dict:
    """Compile one captured launch (found again by index: kernels do not pickle) for one target,
    and judge it against the budgets (``shipped``: whether a shipped configuration launches it)."""
    launch = _LAUNCHES[launch_index]
    result = _figures(launch, target_name)
    result.shipped = shipped
    result.problems = ["compile error"] if result.error else problems(result, launch.kernel.__name__, shipped,
                                                                       TARGETS[target_name][1])
    return asdict(result)


def _figures(launch: Launch, target_name: str) -> Result:
    """What the compiler reports for a launch on a target: from the cache of earlier runs when it
    holds this exact compile, else compiled now (and kept there)."""
    import triton
    from triton.backends.compiler import GPUTarget
    capability = TARGETS[target_name][0]
    result = Result(_name(launch.kernel), _variant(launch), target_name, triton.__version__)
    start = time.time()
    target = GPUTarget("cuda", capability, 32)
    _, src, options = _specialise(launch, target)
    cache = _cache_path(src, options, target_name, triton.__version__)
    if cache and os.path.exists(cache):
        with open(cache) as f:
            return Result(**{**json.load(f), "cached": True})
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit runs no ptxas, hence no report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # a compile error is the finding, reported with the kernel it hit
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return result
    text = log.getvalue()
    registers, spills = PTXAS.search(text), SPILLS.findall(text)
    result.registers = int(registers.group(1)) if registers else None
    result.spill_bytes = sum(int(s) + int(l) for s, l in spills)
    result.shared = compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    result.fma = len(re.findall(r"\bfma\.", ptx))
    # tl.floor is cvt.rmi.ftz: exact here, since exp_neg floors x * log2(e) + 0.5, which is 0 or at
    # least 2^-25 in magnitude (floats near 0.5 are 2^-25 apart), never a denormal to flush.
    result.ftz = len([x for x in re.findall(r"\b[\w.]*\.ftz\.[\w.]*", ptx) if not x.startswith("cvt.rmi.")])
    result.seconds = round(time.time() - start, 1)
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            json.dump(asdict(result), f)
        os.replace(cache + ".tmp", cache)
    return result


def problems(result: Result, kernel: str, shipped: bool, shared_limit: int) -> list[str]:
    """What fails the check in a compiled kernel's figures."""
    found = []
    budget = SPILL_BUDGET["shipped" if shipped else "other"]
    if result.spill_bytes > budget:
        found.append(f"spills {result.spill_bytes} B > budget {budget} B")
    if result.shared > shared_limit:
        found.append(f"shared memory {result.shared} B > {shared_limit} B per block")
    if kernel in NO_CONTRACTION and (result.fma or result.ftz):
        found.append(f"{result.fma} fma / {result.ftz} ftz in a kernel promised bitwise across backends")
    return found


def _cache_path(src, options, target_name, version):
    """Where the compiler's figures for this exact compile are kept between runs (the kernel's
    source and every function it calls, the specialisation, the options, the target and the Triton
    version): the same inputs give the same machine code, so a rerun on a machine that kept its
    cache compiles only what changed; the budgets are applied afresh on every run.
    DDPS_GPU_COMPILE_CACHE=0 turns it off."""
    root = os.environ.get("DDPS_GPU_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ddps",
                                                                    "gpu-compile"))
    if root == "0":
        return None
    import hashlib
    key = hashlib.sha256(f"{src.hash()} {options.hash()} {target_name} {version}".encode())
    return os.path.join(root, key.hexdigest() + ".json")


# The launches of this process (the pool's workers capture their own: kernels do not pickle).
_LAUNCHES: list[Launch] = []


def _capture_once():
    if not _LAUNCHES:
        _LAUNCHES.extend(capture())


def _unique(capability: int, cases=None) -> list[tuple[int, list[str], bool]]:
    """(index of the first launch of each distinct compile for ``capability``, the cases that
    launch it, whether one of them is a shipped configuration), of the cases whose names start
    with one of ``cases`` (all when None)."""
    from triton.backends.compiler import GPUTarget
    _capture_once()
    seen: dict[str, tuple[int, list[str], list[bool]]] = {}
    for i, launch in enumerate(_LAUNCHES):
        if cases and not launch.case.startswith(tuple(cases)):
            continue
        key, _, _ = _specialise(launch, GPUTarget("cuda", capability, 32))
        entry = seen.setdefault(key, (i, [], []))
        entry[1].append(launch.case)
        entry[2].append(launch.shipped)
    return [(index, cases, any(shipped)) for index, cases, shipped in seen.values()]


def _job(args):
    return _compile_one(*args)


def run(targets=tuple(TARGETS), cases=None, workers: int | None = None) -> list[dict]:
    """Compile every distinct variant (of ``cases``: name prefixes) for each target with the Triton
    on the path."""
    jobs, names_of = [], {}
    for name in targets:
        capability = TARGETS[name][0]
        for index, names, shipped in _unique(capability, cases):
            jobs.append((index, name, shipped))
            names_of[(name, index)] = names
    workers = workers or os.cpu_count() or 1
    results = []
    with ProcessPoolExecutor(workers, initializer=_capture_once) as pool:
        for result in pool.map(_job, jobs, chunksize=4):
            results.append(result)
            if len(results) % 100 == 0:
                print(f"gpu-compile-check: {len(results)}/{len(jobs)} compiled", file=sys.stderr, flush=True)
    for result, (index, name, _) in zip(results, jobs):
        result["cases"] = names_of[(name, index)]
    return results


def run_with(triton_dir: str | None, targets, cases=None) -> list[dict]:
    """``run`` in a subprocess: with the Triton installed in ``triton_dir`` ahead on the path (None:
    the installed one), and without TRITON_INTERPRET, under which triton.jit makes interpreted
    functions that do not compile (the tests set it)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if triton_dir:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(triton_dir), *sys.path])
    cmd = [sys.executable, "-m", "ddps.bench.gpu_compile", "--json", "-", "--targets", *targets]
    out = subprocess.run(cmd + (["--cases", *cases] if cases else []), env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def markdown(results: list[dict], seconds: float) -> str:
    import platform
    versions = sorted({r["triton"] for r in results})
    targets = list(dict.fromkeys(r["target"] for r in results))
    failures = [r for r in results if r["problems"]]
    lines = [
        "# The Triton kernels compiled for NVIDIA targets",
        "",
        "Written by `make gpu-compile-check` (`python -m ddps.bench.gpu_compile`): every launch the",
        "launchers in `kernels/` make for the ops' inputs (dtypes, layouts, label dtypes, ignore_index,",
        f"head widths {', '.join(map(str, HEAD_DIMS))}, ADE20K and small shapes, TF32 on and off), compiled by",
        "Triton and ptxas for each target without a GPU. Registers and spills are ptxas' report",
        "(spill stores + loads, bytes per thread); shared memory is what the launch asks for.",
        "",
        f"Triton {', '.join(versions)}; torch {torch.__version__}; Python {platform.python_version()};"
        f" {len(results)} compiles ({sum(1 for r in results if r.get('cached'))} of them kept from an earlier run,"
        f" {sum(r['seconds'] or 0 for r in results):.0f} s of compiler time in all) in {seconds:.0f} s;"
        f" failures: {len(failures)}.",
        "",
        "Budgets (`ddps/bench/gpu_compile.py`): spills "
        f"{SPILL_BUDGET['shipped']} B in the shipped configurations (d = {SHIPPED_D}, fp32/bf16/fp16), "
        f"{SPILL_BUDGET['other']} B elsewhere; shared memory per block "
        + ", ".join(f"{t} {TARGETS[t][1] // 1024} KB" for t in targets)
        + "; no `fma` and no `.ftz` in the PTX of " + ", ".join(f"`{k}`" for k in NO_CONTRACTION) + ".",
        "",
    ]
    if failures:
        lines += ["## Failures", "", "| kernel | variant | target | triton | problem |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['kernel']} | {r['variant']} | {r['target']} | {r['triton']} | "
                  f"{'; '.join(r['problems'])}{' (' + r['error'] + ')' if r['error'] else ''} |" for r in failures]
        lines.append("")
    lines += ["## Per kernel: the largest figures over its variants", ""]
    head = "| kernel | variants | " + " | ".join(f"{t} regs / spill B / smem KB" for t in targets) + " |"
    lines += [head, "| --- | --- | " + " | ".join("---" for _ in targets) + " |"]
    for version in versions:
        for kernel in dict.fromkeys(r["kernel"] for r in results if r["triton"] == version):
            rows = [r for r in results if r["triton"] == version and r["kernel"] == kernel and not r["error"]]
            cells = []
            for t in targets:
                rs = [r for r in rows if r["target"] == t]
                cells.append(f"{max(r['registers'] or 0 for r in rs)} / {max(r['spill_bytes'] for r in rs)} / "
                             f"{max(r['shared'] for r in rs) / 1024:.1f}" if rs else "-")
            variants = len({r["variant"] for r in results if r["triton"] == version and r["kernel"] == kernel})
            lines.append(f"| {kernel} (triton {version}) | {variants} | " + " | ".join(cells) + " |")
    lines += ["", "## Every variant", "", "| triton | kernel | variant | target | regs | spill B | smem B | fma | cases |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        cases = r["cases"][0] + (f" (+{len(r['cases']) - 1})" if len(r["cases"]) > 1 else "")
        lines.append(f"| {r['triton']} | {r['kernel']} | {r['variant']} | {r['target']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared']} | {r['fma']} | {cases} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddps.bench.gpu_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--triton", action="append", default=[], metavar="DIR",
                        help="also check with the Triton installed in DIR (pip install --target DIR triton==X)")
    parser.add_argument("--cases", nargs="+", metavar="PREFIX",
                        help="only the cases whose names start so (e.g. 'attention fp64'); default: all")
    parser.add_argument("--markdown", metavar="FILE", help="write the table to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE (- for stdout)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, the check compiles for real")
    for triton_dir in args.triton:
        if not os.path.isfile(os.path.join(triton_dir, "triton", "__init__.py")):
            parser.error(f"--triton {triton_dir}: no Triton installed there (pip install --target {triton_dir} triton==X)")
    start = time.time()
    results = run(args.targets, args.cases)
    if not results:
        parser.error(f"no case starts with {args.cases}")
    for triton_dir in args.triton:
        results += run_with(triton_dir, args.targets, args.cases)
    seconds = time.time() - start
    if args.json == "-":
        json.dump(results, sys.stdout)
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, seconds))
    failures = [r for r in results if r["problems"]]
    for r in failures:
        print(f"FAIL {r['kernel']} [{r['variant']}] {r['target']} triton {r['triton']}: {'; '.join(r['problems'])}"
              + (f" ({r['error']})" if r["error"] else ""), file=sys.stderr)
    print(f"gpu-compile-check: {len(results)} compiles, {len(failures)} failures, {seconds:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
