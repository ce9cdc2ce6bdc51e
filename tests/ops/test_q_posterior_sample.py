"""ddps.ops.q_posterior_sample against the exact posterior of ddps.reference.q_posterior_log."""
import pytest
import torch

from ddps import DiffusionSchedule, reference
from ddps.ops import q_posterior_sample
from helpers.sampling import assert_thread_count_invariant, DIST_IDS, DISTRIBUTION, FUSED, IDS, TRANSITIONS, assert_distribution, generator, q_posterior_probs

T, K = 20, 151
# (x0, x_t) per case: x_t == x0, x_t != x0, x_t = [MASK] (mask transitions only).
PAIRS = {"same": (40, 40), "differ": (40, 90), "mask": (40, K)}
CASES = [(tr, case, s) for tr in TRANSITIONS for case in PAIRS for s in (0, 1, 10, 19)
         if not (case == "mask" and tr == "uniform")]
# "absorbing" cannot produce a real x_t other than x0: that observation is impossible, tested apart.
CASES = [c for c in CASES if not (c[0] == "absorbing" and c[1] == "differ")]


@pytest.mark.parametrize("backend,device", DISTRIBUTION, ids=DIST_IDS)
@pytest.mark.parametrize("transition,case,level", CASES, ids=[f"{a}-{b}-s{c}" for a, b, c in CASES])
def test_distribution_is_exact(backend, device, transition, case, level):
    schedule = DiffusionSchedule(T, K, "linear", transition).to(device)
    x0_label, xt_label = PAIRS[case]
    x0 = torch.full((4, 500, 500), x0_label, dtype=torch.int64, device=device)  # 1e6 draws
    x_t = torch.full_like(x0, xt_label)
    out = q_posterior_sample(x0, x_t, level, schedule, generator=generator(level), backend=backend)
    assert_distribution(out, q_posterior_probs(x0_label, xt_label, level, schedule.to("cpu")))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_level_zero_returns_x0(backend, device, transition):
    # s = 0: q(x_{-1} | x0) is the identity level, so the posterior is x0 whatever x_t is.
    schedule = DiffusionSchedule(T, K, transition=transition).to(device)
    x0 = torch.randint(0, K, (2, 40, 40), device=device)
    x_t = torch.where(torch.rand(2, 40, 40, device=device) < 0.5, x0, torch.randint(0, K, (2, 40, 40), device=device))
    if transition == "absorbing":
        x_t = torch.where(x_t == x0, x0, K)  # only consistent observations
    out = q_posterior_sample(x0, x_t, 0, schedule, generator=generator(1), backend=backend)
    assert torch.equal(out, x0)


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_impossible_observation_keeps_x_t(backend, device):
    schedule = DiffusionSchedule(T, K, transition="absorbing").to(device)
    x0 = torch.full((1, 64), 3, device=device)
    x_t = torch.full((1, 64), 5, device=device)  # a real x_t != x0 cannot happen under absorbing
    out = q_posterior_sample(x0, x_t, 10, schedule, generator=generator(1), backend=backend)
    assert torch.equal(out, x_t)


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_seeds_and_non_contiguous_inputs(backend, device):
    schedule = DiffusionSchedule(T, K).to(device)
    x0 = torch.randint(0, K, (4, 30, 30), device=device)[::2, ::3]
    x_t = torch.randint(0, K, (4, 30, 30), device=device)[::2, ::3]
    a = q_posterior_sample(x0, x_t, 12, schedule, generator=generator(5), backend=backend)
    assert torch.equal(a, q_posterior_sample(x0.contiguous(), x_t.contiguous(), 12, schedule,
                                             generator=generator(5), backend=backend))
    assert not torch.equal(a, q_posterior_sample(x0, x_t, 12, schedule, generator=generator(6), backend=backend))


def test_thread_count_does_not_change_samples():
    schedule = DiffusionSchedule(T, K)
    x0, x_t = torch.randint(0, K, (2, 4, 128, 128))
    assert_thread_count_invariant(lambda: q_posterior_sample(x0, x_t, 9, schedule, generator=generator(3), backend="cpu"))


@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")], ids=IDS + ["reference-cpu"])
def test_dtypes_empty_and_ignore(backend, device):
    schedule = DiffusionSchedule(T, 7, transition="mask_and_replace").to(device)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        x0 = torch.randint(0, 7, (2, 9, 11), dtype=dtype, device=device)
        x_t = torch.randint(0, 8, (2, 9, 11), dtype=dtype, device=device)
        x_t[:, 0] = 255
        out = q_posterior_sample(x0, x_t, 5, schedule, generator=generator(1), backend=backend, ignore_index=255)
        assert out.dtype == dtype and out.shape == x0.shape
        assert (out[:, 0] == 255).all() and (out[:, 1:] <= 7).all()
    empty = torch.zeros(0, 3, dtype=torch.long, device=device)
    assert q_posterior_sample(empty, empty, 3, schedule, backend=backend).shape == (0, 3)


def test_reference_backend_is_the_original_op():
    schedule = DiffusionSchedule(T, K)
    x0, x_t = torch.randint(0, K, (2, 2, 9, 9))
    torch.manual_seed(4)
    a = q_posterior_sample(x0, x_t, torch.tensor([0, 17]), schedule, backend="reference")
    torch.manual_seed(4)
    assert torch.equal(a, reference.q_posterior(x0, x_t, torch.tensor([0, 17]), schedule))


S = DiffusionSchedule(20, 7)
# Every class, 0 among them (so that X - 1 holds -1), whatever the global RNG's state at collection:
# drawn at random, 32 labels missed class 0 once in 140 collections and the -1 case did not raise.
X = torch.arange(32).reshape(2, 4, 4) % 7


@pytest.mark.parametrize("backend", [b for b, d in FUSED if d == "cpu"] + ["reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: q_posterior_sample(X, X + 7, 3, S, backend=b), ValueError, r"x_t holds label \d+"),
    (lambda b: q_posterior_sample(X - 1, X, 3, S, backend=b), ValueError, r"x0 holds label -1"),
    (lambda b: q_posterior_sample(X, X[:, :3], 3, S, backend=b), ValueError, "x0 has shape .* but x_t has shape"),
    (lambda b: q_posterior_sample(X, X.int(), 3, S, backend=b), TypeError, "x0 has dtype torch.int64 but x_t"),
    (lambda b: q_posterior_sample(X, X.float(), 3, S, backend=b), TypeError, "x_t must hold integer"),
    (lambda b: q_posterior_sample(X, X, -1, S, backend=b), ValueError, r"t=-1 is outside"),
    (lambda b: q_posterior_sample(X, X.to("meta"), 3, S, backend=b), ValueError, "x_t is on meta but the schedule is on cpu"),
])
def test_bad_input_is_a_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)
