"""The cases of ``ddps bench`` under pytest-benchmark, one test per case and provider:

    pytest benchmarks/ --benchmark-only [--ddps-size 128] [--ddps-full] [--ddps-device cuda]

Kept out of ``make test`` (pytest's testpaths is tests/). Each provider's output is checked
against the reference's of the same case before it is timed: max relative difference <= 1e-4
for deterministic cases, the same shapes for the samplers and noisy loops.
"""
from __future__ import annotations

import pytest
import torch

from ddps.bench import relative_difference, shapes
from ddps.bench.measure import machine
from ddps.bench.profiles import all_cases


def pytest_generate_tests(metafunc):
    if "case_provider" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = torch.device(config.getoption("--ddps-device"))
    params, full = [], config.getoption("--ddps-full")
    for index, case in enumerate(all_cases(full, config.getoption("--ddps-size"))):
        # as ddps bench: torch.compile of the reference in the full profile only
        for provider in (p for p in case.provider_names(device) if full or not p.startswith("compile")):
            params.append(pytest.param((index, provider), id=f"{case.name}-{case.mode}-{case.shape}-{provider}"))
    metafunc.parametrize("case_provider", params)


_current: dict = {}  # the providers and reference output of the case being run (one at a time)


@pytest.fixture
def setup(request):
    config = request.config
    device = torch.device(config.getoption("--ddps-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--ddps-device cuda needs a visible CUDA device")
    return all_cases(config.getoption("--ddps-full"), config.getoption("--ddps-size")), device


def test_case(benchmark, setup, case_provider):
    cases, device = setup
    index, provider = case_provider
    case = cases[index]
    if _current.get("index") != index:
        _current.clear()
        providers = case.build(device)
        _current.update(index=index, providers=providers, expected=providers["reference"]())
    fn = _current["providers"][provider]
    out = fn()  # warm-up (and compilation)
    if case.compare == "values":
        assert relative_difference(out, _current["expected"]) <= 1e-4
    else:
        assert shapes(out) == shapes(_current["expected"])
    benchmark.group = f"{case.name} {case.mode} {case.shape}"
    benchmark.extra_info.update(machine(device))
    benchmark(fn)
