"""ddps.ops.p_posterior_sample against the exact soft posterior of ddps.reference.p_posterior_log."""
import pytest
import torch

from ddps import DiffusionSchedule, reference
from ddps.ops import p_posterior_sample
from helpers.sampling import assert_thread_count_invariant, DIST_IDS, DISTRIBUTION, FUSED, IDS, TRANSITIONS, assert_distribution, generator, p_posterior_probs

T, K = 20, 20
CASES = [(tr, xt, s) for tr in TRANSITIONS for xt in ("real", "mask") for s in (0, 10, 19)
         if not (xt == "mask" and tr == "uniform")]


@pytest.mark.parametrize("backend,device", DISTRIBUTION, ids=DIST_IDS)
@pytest.mark.parametrize("transition,xt_kind,level", CASES, ids=[f"{a}-xt_{b}-s{c}" for a, b, c in CASES])
def test_distribution_is_exact(backend, device, transition, xt_kind, level):
    schedule = DiffusionSchedule(T, K, "linear", transition).to(device)
    pixel = torch.randn(K, generator=generator(level)) * 2
    x_t = 5 if xt_kind == "real" else K
    n = 1_000_000
    logits = pixel.reshape(1, K, 1).expand(1, K, n).contiguous().to(device)
    xt = torch.full((1, n), x_t, dtype=torch.int64, device=device)
    out = p_posterior_sample(logits, xt, level, schedule, generator=generator(77), backend=backend)
    assert_distribution(out, p_posterior_probs(pixel, x_t, level, schedule.to("cpu")))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_degenerate_one_hot_logits_at_level_zero_are_exact(backend, device, dtype):
    # softmax of (0 at c, -inf elsewhere) is exactly one-hot, and at s = 0 the posterior is p.
    schedule = DiffusionSchedule(T, K).to(device)
    target = torch.randint(0, K, (3, 17, 19))
    logits = torch.full((3, K, 17, 19), float("-inf"))
    logits.scatter_(1, target.unsqueeze(1), 0.0)
    x_t = torch.randint(0, K, (3, 17, 19))
    out = p_posterior_sample(logits.to(device, dtype), x_t.to(device), 0, schedule, generator=generator(2), backend=backend)
    assert torch.equal(out.cpu(), target)


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_nan_and_inf_logits_keep_x_t(backend, device):
    schedule = DiffusionSchedule(T, K).to(device)
    logits = torch.randn(2, K, 4, 4)
    logits[0, 3, 1, 1] = float("nan")
    logits[1, 0, 2, 2] = float("inf")
    logits[1, :, 3, 3] = float("-inf")
    x_t = torch.randint(0, K, (2, 4, 4))
    out = p_posterior_sample(logits.to(device), x_t.to(device), 19, schedule, generator=generator(1), backend=backend).cpu()
    for b, i, j in ((0, 1, 1), (1, 2, 2), (1, 3, 3)):
        assert out[b, i, j] == x_t[b, i, j]


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_seeds_dtypes_and_non_contiguous(backend, device):
    schedule = DiffusionSchedule(T, K, transition="mask_and_replace").to(device)
    logits = torch.randn(4, K, 12, 10, device=device)[::2, :, ::2]
    x_t = torch.randint(0, K + 1, (4, 12, 10), device=device)[::2, ::2].int()
    a = p_posterior_sample(logits, x_t, 7, schedule, generator=generator(5), backend=backend)
    assert a.dtype == torch.int32 and a.shape == x_t.shape
    assert torch.equal(a, p_posterior_sample(logits.contiguous(), x_t.contiguous(), 7, schedule,
                                             generator=generator(5), backend=backend))
    assert not torch.equal(a, p_posterior_sample(logits, x_t, 7, schedule, generator=generator(6), backend=backend))
    half = p_posterior_sample(logits.half(), x_t, 7, schedule, generator=generator(5), backend=backend)
    assert ((half >= 0) & (half <= K)).all()


def test_thread_count_does_not_change_samples():
    schedule = DiffusionSchedule(T, K)
    logits = torch.randn(2, K, 64, 64)
    x_t = torch.randint(0, K, (2, 64, 64))
    assert_thread_count_invariant(lambda: p_posterior_sample(logits, x_t, 9, schedule, generator=generator(3), backend="cpu"))


@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")], ids=IDS + ["reference-cpu"])
def test_empty_and_ignore(backend, device):
    schedule = DiffusionSchedule(T, K).to(device)
    x_t = torch.randint(0, K, (2, 5, 6), device=device)
    x_t[:, 0] = 255
    out = p_posterior_sample(torch.randn(2, K, 5, 6, device=device), x_t, 5, schedule, backend=backend, ignore_index=255)
    assert (out[:, 0] == 255).all() and (out[:, 1:] < K).all()
    empty = p_posterior_sample(torch.randn(0, K, 3, device=device), torch.zeros(0, 3, dtype=torch.long, device=device),
                               0, schedule, backend=backend)
    assert empty.shape == (0, 3)


S = DiffusionSchedule(20, 7)
L = torch.randn(2, 7, 4, 4)
X = torch.randint(0, 7, (2, 4, 4))


@pytest.mark.parametrize("backend", [b for b, d in FUSED if d == "cpu"] + ["reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: p_posterior_sample(L[:, :6], X, 3, S, backend=b), ValueError, r"logits must be \[B, K=7"),
    (lambda b: p_posterior_sample(L.double(), X, 3, S, backend=b), TypeError, "float32, float16 or bfloat16"),
    (lambda b: p_posterior_sample(L, X[:, :3], 3, S, backend=b), ValueError, "x_t has shape"),
    (lambda b: p_posterior_sample(L, X + 7, 3, S, backend=b), ValueError, r"x_t holds label"),
    (lambda b: p_posterior_sample(L, X, 20, S, backend=b), ValueError, r"t=20 is outside"),
    (lambda b: p_posterior_sample(L, X.to("meta"), 3, S, backend=b), ValueError, "x_t is on meta"),
])
def test_bad_input_is_a_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


def test_reference_backend_samples_the_reference_distribution():
    schedule = DiffusionSchedule(T, K)
    logits, x_t = torch.randn(2, K, 6, 6), torch.randint(0, K, (2, 6, 6))
    torch.manual_seed(0)
    a = p_posterior_sample(logits, x_t, 4, schedule, backend="reference")
    torch.manual_seed(0)
    assert torch.equal(a, reference.p_posterior(logits, x_t, 4, schedule))
