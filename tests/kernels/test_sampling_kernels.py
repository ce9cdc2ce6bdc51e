"""Every backend draws the same samples from the same seed, the compiled ops pass opcheck, and
torch.compile(fullgraph=True) traces the ops."""
import pytest
import torch

import ddps
from ddps import DiffusionSchedule
from ddps.ops import _common, _tables, p_posterior_sample, q_posterior_sample, q_sample, renoise
from helpers.sampling import FUSED, TRANSITIONS, generator

OTHERS = [(b, d) for b, d in FUSED if b != "cpu"]


def draws(backend, device, transition):
    """One call of each sampling op on mixed inputs (odd sizes, per-sample levels incl. 0 and T-1;
    K = 37 keeps the Triton interpreter's per-class loops short)."""
    K = 37
    schedule = DiffusionSchedule(20, K, transition=transition).to(device)
    g = torch.Generator().manual_seed(hash(transition) % 1000)
    x0 = torch.randint(0, K, (3, 37, 29), generator=g)
    states = schedule.num_states
    x_t = torch.where(torch.rand(3, 37, 29, generator=g) < 0.3, x0, torch.randint(0, states, (3, 37, 29), generator=g))
    logits = torch.randn(3, K, 37, 29, generator=g) * 3
    t = torch.tensor([0, 7, 19])
    x0, x_t, logits, t = (v.to(device) for v in (x0, x_t, logits, t))
    return {
        "q_sample": q_sample(x0, t, schedule, generator=generator(1), backend=backend),
        "q_posterior_sample": q_posterior_sample(x0, x_t, t, schedule, generator=generator(2), backend=backend),
        "p_posterior_sample": p_posterior_sample(logits, x_t, t, schedule, generator=generator(3), backend=backend),
        "renoise": renoise(logits.half(), t, schedule, generator=generator(4), backend=backend),
    }


@pytest.mark.skipif(not OTHERS, reason="only the CPU kernels are available")
@pytest.mark.parametrize("backend,device", OTHERS, ids=[f"{b}-{d}" for b, d in OTHERS])
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_backends_return_identical_samples(backend, device, transition):
    expected = draws("cpu", "cpu", transition)
    got = draws(backend, device, transition)
    for op, value in expected.items():
        assert torch.equal(got[op].cpu(), value), op


def test_triton_is_checked_against_the_cpu_kernels_here():
    # The identity test above is the Triton kernels' correctness test on machines without a GPU.
    assert any(b == "triton" for b, _ in OTHERS), ddps.backends()["triton"]["reason"]


def _op_args():
    K = 11
    schedule = DiffusionSchedule(10, K, transition="mask_and_replace")
    x0 = torch.randint(0, K, (2, 5, 3))
    x_t = torch.randint(0, K + 1, (2, 5, 3))
    logits = torch.randn(2, K, 5, 3)
    t = torch.tensor([0, 9])
    seed = torch.tensor(42)
    qs = schedule.table("q_sample", _tables.q_sample_table)
    qp = schedule.table("q_posterior_sample", _tables.q_posterior_table)
    pp = schedule.table("p_posterior_sample", _tables.p_posterior_table)
    return {
        "q_sample": (x0, t, qs, seed, K, K, None),
        "q_posterior_sample": (x0, x_t, t, qp, seed, K, K, 255),
        "p_posterior_sample": (logits, x_t, t, pp, seed, K, K, None),
        "renoise": (logits, t, qs, seed, K, K),
    }


@pytest.mark.parametrize("op", ["q_sample", "q_posterior_sample", "p_posterior_sample", "renoise"])
def test_opcheck(op):
    torch.library.opcheck(getattr(torch.ops.ddps, op).default, _op_args()[op])


@pytest.mark.parametrize("op", ["q_sample", "q_posterior_sample", "p_posterior_sample", "renoise"])
def test_triton_op_matches_and_passes_opcheck(op):
    args = _op_args()[op]
    triton_op = _common.triton_op(op, f"{op}_fwd", ddps._backend.FAKES[op])
    assert torch.equal(triton_op(*args), getattr(torch.ops.ddps, op)(*args))
    torch.library.opcheck(triton_op._opoverload, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_runs_the_ops():
    schedule = DiffusionSchedule(20, 151)

    def step(logits, x0, x_t, t, seed):
        return (renoise(logits, t, schedule, backend="cpu"), q_sample(x0, t, schedule, backend="cpu"),
                q_posterior_sample(x0, x_t, t, schedule, backend="cpu"),
                p_posterior_sample(logits, x_t, t, schedule, backend="cpu"))

    logits = torch.randn(2, 151, 8, 8)
    x0, x_t = torch.randint(0, 151, (2, 2, 8, 8))
    t = torch.tensor([3, 19])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(logits, x0, x_t, t, None)
    assert [o.shape for o in out] == [(2, 8, 8)] * 4
    assert all(((o >= 0) & (o < 151)).all() for o in out)
