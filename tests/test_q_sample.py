"""ddps.ops.q_sample against the exact q(x_t | x_0) of ddps.reference."""
import pytest
import torch

import ddps
from ddps import DiffusionSchedule, reference
from ddps.ops import q_sample
from stats import P_REJECT, chi_square_pvalue

FUSED = [b for b in ("cpu",) if ddps.backends()[b]["available"]]


def test_cpu_backend_is_built():
    # The compiled CPU kernels are part of every supported install: their absence is a failure here.
    assert ddps.backends()["cpu"]["available"], ddps.backends()["cpu"]["reason"]


def exact_probs(x0_label: int, level: int, schedule) -> torch.Tensor:
    """P(x_t = k | x_0) as the reference's Gumbel-max draw realises it: softmax of its log-probs."""
    log_x0 = reference.index_to_log_onehot(torch.tensor([[x0_label]]), schedule.num_classes)
    return reference.q_pred_log(log_x0, level, schedule)[0, :, 0].double().softmax(0)


LEVELS = [("linear", 20, 151, 0), ("linear", 20, 151, 10), ("linear", 20, 151, 19),
          ("cos", 100, 20, 0), ("cos", 100, 20, 50), ("cos", 100, 20, 99), ("linear", 5, 3, 2)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind,T,K,level", LEVELS, ids=[f"{k}-T{T}-K{K}-s{s}" for k, T, K, s in LEVELS])
def test_distribution_is_exact(backend, kind, T, K, level):
    schedule = DiffusionSchedule(T, K, kind)
    label = K // 3
    x0 = torch.full((4, 500, 500), label, dtype=torch.int64)  # 1e6 draws
    gen = torch.Generator().manual_seed(1000 + level)
    out = q_sample(x0, level, schedule, generator=gen, backend=backend)
    counts = torch.bincount(out.reshape(-1), minlength=K)
    probs = exact_probs(label, level, schedule)
    assert chi_square_pvalue(counts, probs) > P_REJECT
    assert counts.sum() == x0.numel()


@pytest.mark.parametrize("backend", FUSED)
def test_identity_and_full_noise_extremes(backend):
    # att = 1 keeps every label; the threshold 2^32 must not overflow to "never keep".
    schedule = DiffusionSchedule(20, 151)
    schedule.keep_threshold = schedule.keep_threshold.clone()
    schedule.keep_threshold[3] = 2**32
    schedule.keep_threshold[4] = 0
    x0 = torch.randint(0, 151, (2, 64, 64))
    out = q_sample(x0, torch.tensor([3, 4]), schedule, backend=backend)
    assert torch.equal(out[0], x0[0])
    assert (out[1] != x0[1]).float().mean() > 0.95  # keep probability 1/151 only


@pytest.mark.parametrize("backend", FUSED)
def test_per_sample_levels(backend):
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.zeros(2, 300, 300, dtype=torch.int64)
    out = q_sample(x0, torch.tensor([0, 19]), schedule, generator=torch.Generator().manual_seed(0), backend=backend)
    kept = (out == 0).double().mean(dim=(1, 2))
    expected = schedule.att[[0, 19]].double() + schedule.btt[[0, 19]].double()
    assert torch.allclose(kept, expected, atol=5 * (expected * (1 - expected) / 9e4).sqrt().max())


@pytest.mark.parametrize("backend", FUSED)
def test_same_seed_same_samples_other_seed_other_samples(backend):
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, (3, 33, 17))
    draw = lambda seed: q_sample(x0, 10, schedule, generator=torch.Generator().manual_seed(seed), backend=backend)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    torch.manual_seed(5)
    a = q_sample(x0, 10, schedule, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(a, q_sample(x0, 10, schedule, backend=backend))


@pytest.mark.parametrize("backend", FUSED)
def test_thread_count_does_not_change_samples(backend):
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, (4, 128, 128))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(q_sample(x0, 7, schedule, generator=torch.Generator().manual_seed(9), backend=backend))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 5), (2, 1, 9, 4), (5,)], ids=str)
def test_dtypes_and_shapes(backend, dtype, shape):
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, shape, dtype=dtype)
    gen = lambda: torch.Generator().manual_seed(3)
    out = q_sample(x0, 19, schedule, generator=gen(), backend=backend)
    assert out.dtype == dtype and out.shape == x0.shape
    assert torch.equal(out.long(), q_sample(x0.long(), 19, schedule, generator=gen(), backend=backend).long())
    assert ((out >= 0) & (out < 151)).all()


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_input_is_read_as_its_values(backend):
    schedule = DiffusionSchedule(20, 151)
    base = torch.randint(0, 151, (6, 40, 40))
    x0 = base[::2, :, ::2].transpose(1, 2)
    assert not x0.is_contiguous()
    gen = lambda: torch.Generator().manual_seed(11)
    assert torch.equal(q_sample(x0, 0, schedule, generator=gen(), backend=backend),
                       q_sample(x0.contiguous(), 0, schedule, generator=gen(), backend=backend))


@pytest.mark.parametrize("backend", FUSED)
def test_empty_input(backend):
    schedule = DiffusionSchedule(20, 151)
    out = q_sample(torch.zeros(2, 0, 5, dtype=torch.long), 3, schedule, backend=backend)
    assert out.shape == (2, 0, 5)


def test_reference_backend_is_the_original_op():
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, (2, 9, 9))
    torch.manual_seed(4)
    a = q_sample(x0, torch.tensor([2, 17]), schedule, backend="reference")
    torch.manual_seed(4)
    assert torch.equal(a, reference.q_pred(x0, torch.tensor([2, 17]), schedule))


@pytest.mark.skipif(not FUSED, reason="needs the compiled CPU kernels")
def test_opcheck():
    schedule = DiffusionSchedule(20, 151)
    for x0 in (torch.randint(0, 151, (2, 8, 8)), torch.randint(0, 151, (3, 5), dtype=torch.uint8)):
        args = (x0, torch.arange(x0.shape[0]), schedule.keep_threshold, torch.tensor(123), 151)
        torch.library.opcheck(torch.ops.ddps.q_sample.default, args)


S = DiffusionSchedule(20, 7)
X = torch.randint(0, 7, (2, 4, 4))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: q_sample(X + 7, 3, S, backend=b), ValueError, r"x0 holds label \d+ at index \(0, 0, 0\)"),
    (lambda b: q_sample(X.float(), 3, S, backend=b), TypeError, "x0 must hold integer class labels"),
    (lambda b: q_sample(X.to(torch.int16), 3, S, backend=b), TypeError, "int64, int32 or uint8"),
    (lambda b: q_sample(X, 20, S, backend=b), ValueError, r"t=20 is outside \[0, 20\)"),
    (lambda b: q_sample(X, torch.tensor([3]), S, backend=b), ValueError, r"t must have shape \[2\]"),
    (lambda b: q_sample(X, 3, S.to("meta"), backend=b), ValueError, "schedule is on meta but x0 is on cpu"),
    (lambda b: q_sample(X.tolist(), 3, S, backend=b), TypeError, "x0 must be a torch.Tensor"),
])
def test_bad_input_is_a_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)
