"""`ddps bench` (ddps/bench/) and its pytest-benchmark suite (benchmarks/), at tiny sizes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import ddps
from ddps import bench
from ddps.app import cli
from ddps.bench import breakdown, cases as registry
from ddps.bench.measure import measure, profiled_call, summary

from helpers import ROOT  # noqa: E402
from helpers.app import run_cli  # noqa: E402
from helpers.markdown import tables  # noqa: E402
SIZE = 8


def test_every_op_and_the_head_have_cases():
    # quick: what a user decides by; full: every op too, and B = 4
    quick = bench.select("quick", 128)
    assert {c.name for c in quick} == {"q_sample", "q_posterior_sample", "renoise", "p_posterior_sample",
                                       "posterior_log_probs", "Attention", "LinearAttention", "UNet", "head.sample",
                                       "head.train_step"}
    assert {c.shape for c in quick if c.name == "LinearAttention"} == {"x [1,256,128,128] NCHW",
                                                                       "x [1,256,128,128] channels-last"}
    full = bench.select("full", 128)
    assert set(ddps.ops.__all__) | {c.name for c in quick} | {"head.step"} <= {c.name for c in full}
    assert {c.shape for c in full if c.name == "attention"} == {"q,k,v [1,4,32,32x32]", "q,k,v [4,4,32,32x32]"}


def test_built_providers_match_the_declared_ones():
    device = torch.device("cpu")
    for case in bench.select("quick", SIZE):
        if case.heavy:  # building the heads is covered by the end-to-end run below
            continue
        assert list(case.build(device)) == case.provider_names(device), case.name
        assert case.provider_names(device)[0] == "reference"


def test_unknown_case_names_are_an_error():
    with pytest.raises(ValueError, match=r"unknown case.*'nope'\] \(attention: in the full profile, add --full\)"):
        bench.select("quick", SIZE, ["attention", "nope"])
    with pytest.raises(ValueError, match=r"unknown case\(s\) \['nope'\]; the full profile has"):
        bench.select("full", SIZE, ["attention", "nope"])


def test_profiled_call_sees_the_peak_and_measure_repeats():
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB, freed before the 8 MiB one is made
        del a
        b = torch.ones(1 << 21)
        return b.sum()

    out, peak = profiled_call(fn, torch.device("cpu"))
    assert out.item() == 1 << 21
    assert 8 << 20 <= peak < 12 << 20
    times = measure(fn, 3, torch.device("cpu"))
    assert len(times) >= 3 and all(t > 0 for t in times)
    s = summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["median_ms"] == 3000.0 and s["q20_ms"] < s["median_ms"] < s["q80_ms"]


def test_bench_end_to_end_outputs(tmp_path, capsys):
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "png", "md")}
    printed = run_cli(capsys, "bench", "--size", SIZE, "--repeats", 2, "--cases", "q_sample", "Attention",
                      "head.sample", "--json", out["json"], "--csv", out["csv"], "--plot", out["png"],
                      "--markdown", out["md"])
    assert printed.returncode == 0, printed.stderr
    result = json.loads(out["json"].read_text())
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"q_sample", "Attention", "head.sample"} and result["profile"] == "quick"
    assert not [r for r in rows if "error" in r]
    for r in rows:
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] and r["peak_mb"] >= 0
        if r["provider"] == "reference":
            assert r["speedup"] == 1.0 and r["check"] == "baseline"
        elif r["case"] in ("q_sample", "head.sample"):  # samplers: other draws, the same shapes
            assert r["check"] == "same shape"
        else:  # deterministic: each provider agrees with the reference, measured in the same run
            assert float(r["check"].split()[-1]) <= 1e-4, r
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["mode"], r["shape"]), []).append(r)
    # no rows for providers that did not run: torch.compile is the full profile's
    assert {k[0]: [r["provider"] for r in g] for k, g in groups.items()} == {
        "q_sample": ["reference", "plain-torch", "cpu"], "Attention": ["reference", "fused"],
        "head.sample": ["reference", "ddps"]}
    assert [r["gbps"] > 0 and r["copy_gbps"] > 0 for r in rows if r["case"] == "q_sample"] == [True] * 3
    sample = [r for r in rows if r["case"] == "head.sample" and r["provider"] == "ddps"][0]
    assert sample["gflops"] > 0 and sample["floor_ms"] > 0 and result["peak_conv_gflops"] > 0
    # where the fused head's time goes, and its floor with conv3x3's products at F(4x4, 3x3): 36 per 16
    # outputs where F(2x2, 3x3) does 16 per 4
    assert list(sample["op_ms"]) == list(breakdown.KINDS) and sample["op_ms"]["conv3x3"] > 0
    assert sample["op_ms"]["1x1 convolutions"] > 0 and sample["op_ms"]["norms"] > 0
    saved_ms = sample["conv3x3_gflop"] * (1 - (36 / 16) / (16 / 4)) / result["peak_conv_gflops"] * 1e3
    assert sample["floor_f4_ms"] == pytest.approx(sample["floor_ms"] - saved_ms, rel=1e-9)
    assert 0 < sample["conv3x3_gflop"] < sample["gflops"] * sample["median_ms"] / 1e3
    assert "op_ms" not in [r for r in rows if r["case"] == "head.sample" and r["provider"] == "reference"][0]
    assert result["machine"]["torch"] == torch.__version__

    # the run ends with the summary: each case's best ddps speedup, the machine, the files
    summary = printed.stdout[printed.stdout.index("Summary: quick profile"):]
    assert len(groups) == 6  # q_sample, Attention fwd / fwd+bwd on two layouts, head.sample
    for (case, mode, shape), group in groups.items():
        best = max(r["speedup"] for r in group if r["provider"] in ("cpu", "fused", "ddps"))
        assert f"{best:7.2f}x" in summary and shape in summary
    assert f"device: {result['machine']['device']}" in summary
    assert "head.sample ddps, time by op (one profiled call): conv3x3 " in summary
    assert f"{sample['floor_f4_ms']:.0f} ms with conv3x3 at F(4x4, 3x3)" in summary
    assert f"results: {out['json']}, {out['csv']}, {out['png']}, {out['md']}" in summary

    with open(out["csv"], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(r["device"] == result["machine"]["device"] and r["commit"] and r["torch"] for r in csv_rows)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out["md"].read_text()
    assert md.startswith("# ddps benchmark results") and "| Attention | fwd |" in md
    assert result["machine"]["device"] in md and "## end-to-end" in md and "## Where the time goes" in md
    # every row of every table one row of its header's columns, each measured row in one of them
    assert sum(len(t) - 1 for t in tables(md)) >= len(rows)


def test_compile_of_the_reference_runs_in_the_full_profile_only():
    calls = []

    def build(device):
        return {name: (lambda name=name: calls.append(name) or torch.ones(3))
                for name in ("reference", "compile(reference)", "cpu")}

    case = registry.Case("demo", "test", "[3]", "fwd", build, ("reference", "compile(reference)", "cpu"))
    for profile, providers in ((bench.QUICK, ["reference", "cpu"]),
                               (bench.FULL, ["reference", "compile(reference)", "cpu"])):
        calls.clear()
        rows = bench.run([case], torch.device("cpu"), profile=profile, repeats=1)["rows"]
        assert [r["provider"] for r in rows] == providers and set(calls) == set(providers)
    # and for real: torch.compile of the original's q_sample, at B = 1 and 4
    rows = bench.run(bench.select(bench.FULL, SIZE, ["q_sample"]), torch.device("cpu"), bench.FULL, repeats=1)["rows"]
    compiled = [r for r in rows if r["provider"] == "compile(reference)"]
    assert len(compiled) == 2 and all(r["check"] == "same shape" and r["median_ms"] > 0 for r in compiled)


def test_bench_list_and_bad_arguments(capsys):
    printed = run_cli(capsys, "bench", "--list")
    assert printed.returncode == 0 and "head.train_step" in printed.stdout and "linear_attention" not in printed.stdout
    printed = run_cli(capsys, "bench", "--list", "--full")
    assert printed.returncode == 0 and "linear_attention" in printed.stdout and "head.step" in printed.stdout
    printed = run_cli(capsys, "bench", "--cases", "Attention", "bogus")
    assert printed.returncode == 2 and "bogus" in printed.stderr
    for bad, message in ((["--size", "30"], "argument --size: must be a multiple of 4 (the UNet halves it twice)"),
                         (["--repeats", "0"], "argument --repeats: must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        printed = run_cli(capsys, "bench", "--device", "cuda", "--cases", "Attention")
        assert printed.returncode == 2 and "CUDA" in printed.stderr


def test_modules_run_on_both_layouts_and_dtype_adds_autocast_rows(tmp_path, capsys):
    shapes = {c.shape for c in bench.select("quick", 128) if c.name == "LinearAttention" and c.mode == "fwd"}
    assert {s.split("] ")[1] for s in shapes} == {"NCHW", "channels-last"}
    out = tmp_path / "r.json"
    printed = run_cli(capsys, "bench", "--size", SIZE, "--repeats", 1, "--dtype", "bf16", "--cases", "Attention",
                      "q_sample", "--json", out)
    assert printed.returncode == 0, printed.stderr
    assert "torch.autocast(bf16)" in printed.stdout
    rows = json.loads(out.read_text())["rows"]
    attention = [r for r in rows if r["case"] == "Attention" and r["mode"] == "fwd" and "NCHW" in r["shape"]]
    assert [r["provider"] for r in attention] == ["reference", "fused", "fused[bf16]"]
    # The sampling ops take labels and logits as given: no autocast rows.
    assert {r["provider"] for r in rows if r["case"] == "q_sample"} == {"reference", "plain-torch", "cpu"}
    bf16 = attention[-1]
    assert bf16["check"].startswith("max rel diff") and float(bf16["check"].split()[-1]) < 0.1
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "fp64"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_failing_provider_is_reported_and_fails_the_run():
    def build(device):
        def broken():
            raise RuntimeError("kernel exploded")
        return {"reference": lambda: torch.ones(3), "broken": broken}

    case = registry.Case("demo", "test", "[3]", "fwd", build, ("reference", "broken"))
    rows = bench.run([case], torch.device("cpu"), repeats=1)["rows"]
    assert rows[0]["check"] == "baseline"
    assert rows[1]["error"] == "RuntimeError: kernel exploded"


def test_pytest_benchmark_suite_runs(tmp_path):
    """benchmarks/bench_cases.py, once per case and provider (--benchmark-disable), on two cases."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "--ddps-size", str(SIZE), "-k", "renoise or Attention"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_gpu_floor_counts_each_input_once_and_each_output():
    from ddps.bench import floor
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    nbytes, flops = floor.work(lambda: (a @ b).relu() + a.sum())  # a read twice, intermediates internal
    assert flops == 2 * 64 * 32 * 16
    assert nbytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    h100 = floor.GPUS["H100"]
    assert floor.floor_ms(nbytes, flops, "H100", "fp32") == max(nbytes / h100["bandwidth"], flops / h100["fp32"]) * 1e3
    assert floor.gpu_of("NVIDIA H200") == "H200" and floor.gpu_of("NVIDIA A100-SXM4-80GB") == "A100"


def test_report_files_are_readable_as_the_umask_allows(tmp_path):
    # mkstemp creates 0600 files: a JSON or CSV report only its writer could read.
    from ddps.bench import report
    umask = os.umask(0o022)
    try:
        for writer, name in ((report.write_json, "r.json"), (report.write_csv, "r.csv")):
            writer({"rows": [], "machine": {}}, str(tmp_path / name))
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


@pytest.mark.parametrize("name,weight,stride,expected", [
    ("ddps::conv3x3", None, None, "conv3x3"),
    ("ddps_triton::attention_fwd", None, None, "attention"),
    ("ddps_triton::linear_attention_bwd", None, None, "attention"),
    ("ddps::group_norm_film_silu", None, None, "norms"),
    ("ddps_triton::channel_layer_norm_fwd", None, None, "norms"),
    ("aten::layer_norm", None, None, "norms"),
    ("ddps::renoise", None, None, "sampling"),
    ("aten::randint", None, None, "sampling"),
    ("aten::convolution", [384, 256, 1, 1], [1, 1], "1x1 convolutions"),
    ("aten::convolution", [256, 256, 4, 4], [2, 2], "strided convolutions"),
    ("aten::convolution", [256, 16, 7, 7], [1, 1], "other convolutions"),
    ("aten::add", None, None, None),
    ("ddps::no_such_op", None, None, None),
])
def test_op_kinds(name, weight, stride, expected):
    assert breakdown.kind(name, weight, stride) == expected


def test_op_times_count_each_op_under_its_kind():
    x, w1, w4 = torch.randn(1, 8, 32, 32), torch.randn(8, 8, 1, 1), torch.randn(8, 8, 4, 4)

    def call():
        y = torch.nn.functional.conv2d(x, w1)  # its GEMM inside counts as the convolution
        y = torch.nn.functional.conv2d(y, w4, stride=2, padding=1)
        return torch.nn.functional.layer_norm(y, y.shape[-1:]) + 1

    times = breakdown.op_times(call, torch.device("cpu"))
    assert list(times) == list(breakdown.KINDS)
    used = {"1x1 convolutions", "strided convolutions", "norms", "other"}
    assert all(times[k] > 0 for k in used) and all(times[k] == 0 for k in set(times) - used)




def test_op_times_sum_each_events_own_time_under_its_nearest_classified_caller(monkeypatch):
    # A profile of known events (times in microseconds, as torch's): each event's own time goes to
    # the kind of the nearest event up its caller chain that has one, else to "other"; in ms
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, own, parent=None, shapes=(), inputs=()):
        return SimpleNamespace(name=name, self_cpu_time_total=own, cpu_parent=parent, device_type=DeviceType.CPU,
                               input_shapes=list(shapes), concrete_inputs=list(inputs))

    conv = event("aten::convolution", 1500.0, shapes=[[1, 8, 4, 4], [8, 8, 1, 1]], inputs=[None, None, None, [1, 1]])
    strided = event("aten::convolution", 250.0, shapes=[[1, 8, 4, 4], [8, 8, 4, 4]], inputs=[None, None, None, [2, 2]])
    module = event("ddps::conv3x3", 4000.0)
    events = [conv, event("aten::mm", 700.0, parent=conv), strided, module,
              event("aten::empty", 30.0, parent=module), event("aten::add", 20.0),
              event("ddps_triton::attention_bwd", 125.0)]

    class Profile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return SimpleNamespace(events=lambda: events)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(breakdown, "profile", Profile)
    times = breakdown.op_times(lambda: None, torch.device("cpu"))
    assert times == pytest.approx({"conv3x3": 4.03, "1x1 convolutions": 2.2, "strided convolutions": 0.25,
                                   "other convolutions": 0.0, "attention": 0.125, "norms": 0.0, "sampling": 0.0,
                                   "other": 0.02}, rel=1e-12)

def test_op_times_keep_the_profilers_log_out_of_the_output():
    # kineto's per-stage lines would land in ddps bench's live table; a user's own level still wins
    code = ("import torch; from ddps.bench import breakdown; "
            "breakdown.op_times(lambda: torch.ones(4) + 1, torch.device('cpu'))")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "profiler_start" not in quiet.stdout + quiet.stderr and "Stage" not in quiet.stdout + quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], env={**env, "KINETO_LOG_LEVEL": "1"}, capture_output=True,
                          text=True, check=True)
    assert "Stage" in loud.stdout + loud.stderr

def _winograd_accuracy():
    import importlib.util
    spec = importlib.util.spec_from_file_location("winograd_accuracy", ROOT / "benchmarks" / "winograd_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("option, value", [("--size", "0"), ("--channels", "-1"), ("--seeds", "0"), ("--size", "x")])
def test_winograd_accuracy_refuses_what_is_not_a_positive_integer(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        _winograd_accuracy().main([option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: must be a positive integer, got '{value}'" in capsys.readouterr().err


def test_winograd_accuracy_transforms_convolve():
    # Each variant's Toom-Cook transforms compute the 3-tap correlation y_i = sum_k d_{i+k} g_k, in
    # one dimension and (emulated in float32) in two, against F.conv2d in float64
    module = _winograd_accuracy()
    gen = torch.Generator().manual_seed(0)
    for _, m, points in module.VARIANTS:
        a_t, g, b_t = module.transforms(m, points)
        d, taps = torch.randn(m + 2, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
        expected = torch.stack([(d[i:i + 3] * taps).sum() for i in range(m)])
        assert torch.allclose(a_t @ ((g @ taps) * (b_t @ d)), expected, atol=1e-12), points
        x, w = torch.randn(5, 8, 8, generator=gen), torch.randn(6, 5, 3, 3, generator=gen)
        exact = torch.nn.functional.conv2d(x[None].double(), w.double(), padding=1)[0]
        for block in (None, 2):
            assert torch.allclose(module.emulate(x, w, m, points, block).double(), exact, atol=1e-4), (points, block)
