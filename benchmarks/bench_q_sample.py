"""q_sample, side by side: the original's dense log-space sampling vs the fused kernels.

Run: ``pytest benchmarks/bench_q_sample.py --benchmark-only`` (kept out of the default test run).
"""
import pytest
import torch

import ddps
from ddps import DiffusionSchedule
from ddps.cli import machine_line
from ddps.ops import q_sample

PROVIDERS = ["reference"] + [b for b in ("cpu",) if ddps.backends()[b]["available"]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_q_sample(benchmark, provider):
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, (4, 128, 128))
    t = torch.tensor([3, 8, 12, 19])
    benchmark.extra_info["machine"] = machine_line(torch.device("cpu"))
    benchmark.group = "q_sample B=4 K=151 128x128"
    out = benchmark(q_sample, x0, t, schedule, backend=provider)
    assert out.shape == x0.shape
