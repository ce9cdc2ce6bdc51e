"""ddps.ops.q_sample against the exact q(x_t | x_0) of ddps.reference."""
import pytest
import torch

import ddps
from ddps import DiffusionSchedule, reference
from ddps.ops import _tables, q_sample
from helpers.sampling import assert_thread_count_invariant, DIST_IDS, DISTRIBUTION, FUSED, IDS, TRANSITIONS, assert_distribution, generator, q_sample_probs


def test_compiled_and_triton_backends_are_present():
    # Both are part of every supported install (the dev extra brings Triton): absent is a failure.
    status = ddps.backends()
    assert status["cpu"]["available"], status["cpu"]["reason"]
    assert status["triton"]["available"], status["triton"]["reason"]


CASES = [(tr, kind, T, K, s) for tr in TRANSITIONS for kind, T, K, s in
         (("linear", 20, 151, 0), ("linear", 20, 151, 10), ("linear", 20, 151, 19), ("cos", 100, 20, 99))]
CASES += [("uniform", "linear", 5, 3, 2), ("uniform", "cos", 100, 20, 50)]


@pytest.mark.parametrize("backend,device", DISTRIBUTION, ids=DIST_IDS)
@pytest.mark.parametrize("transition,kind,T,K,level", CASES, ids=[f"{c[0]}-{c[1]}-T{c[2]}-K{c[3]}-s{c[4]}" for c in CASES])
def test_distribution_is_exact(backend, device, transition, kind, T, K, level):
    schedule = DiffusionSchedule(T, K, kind, transition).to(device)
    label = K // 3
    x0 = torch.full((4, 500, 500), label, dtype=torch.int64, device=device)  # 1e6 draws
    out = q_sample(x0, level, schedule, generator=generator(1000 + level), backend=backend)
    assert_distribution(out, q_sample_probs(label, level, schedule.to("cpu")))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_identity_level_keeps_every_label(backend, device, transition):
    # Level T (the identity, att = 1) is reached only inside the posterior; the kernels must keep
    # every label there: the threshold 2^32 must not wrap to "never keep".
    schedule = DiffusionSchedule(20, 151, transition=transition).to(device)
    table = schedule.table("q_sample", _tables.q_sample_table)
    assert int(table[20, 0]) == 2**32
    x0 = torch.randint(0, 151, (2, 33, 31), device=device)
    t = torch.tensor([20, 20], device=device)
    out = ddps.ops._common.launch("q_sample", backend, x0, t, table, torch.tensor(7), 151,
                                  ddps.ops._common.mask_index(schedule), None)
    assert torch.equal(out, x0)


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_per_sample_levels(backend, device):
    schedule = DiffusionSchedule(20, 151).to(device)
    x0 = torch.zeros(2, 300, 300, dtype=torch.int64, device=device)
    out = q_sample(x0, torch.tensor([0, 19], device=device), schedule, generator=generator(0), backend=backend)
    kept = (out == 0).double().mean(dim=(1, 2)).cpu()
    expected = (schedule.att[[0, 19]] + schedule.btt[[0, 19]]).double().cpu()
    assert torch.allclose(kept, expected, atol=5 * float((expected * (1 - expected) / 9e4).sqrt().max()))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_seeds(backend, device):
    schedule = DiffusionSchedule(20, 151).to(device)
    x0 = torch.randint(0, 151, (3, 33, 17), device=device)
    draw = lambda seed: q_sample(x0, 10, schedule, generator=generator(seed), backend=backend)  # noqa: E731
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    torch.manual_seed(5)
    a = q_sample(x0, 10, schedule, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(a, q_sample(x0, 10, schedule, backend=backend))


def test_thread_count_does_not_change_samples():
    schedule = DiffusionSchedule(20, 151, transition="mask_and_replace")
    x0 = torch.randint(0, 151, (4, 128, 128))
    assert_thread_count_invariant(lambda: q_sample(x0, 7, schedule, generator=generator(9), backend="cpu"))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 5), (2, 1, 9, 4), (5,), (1, 1100)], ids=str)
def test_dtypes_and_shapes(backend, device, dtype, shape):
    schedule = DiffusionSchedule(20, 151).to(device)
    x0 = torch.randint(0, 151, shape, dtype=dtype, device=device)
    out = q_sample(x0, 19, schedule, generator=generator(3), backend=backend)
    assert out.dtype == dtype and out.shape == x0.shape
    assert torch.equal(out.long(), q_sample(x0.long(), 19, schedule, generator=generator(3), backend=backend).long())
    assert ((out >= 0) & (out < 151)).all()


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_non_contiguous_input_is_read_as_its_values(backend, device):
    schedule = DiffusionSchedule(20, 151).to(device)
    x0 = torch.randint(0, 151, (6, 40, 40), device=device)[::2, :, ::2].transpose(1, 2)
    assert not x0.is_contiguous()
    assert torch.equal(q_sample(x0, 0, schedule, generator=generator(11), backend=backend),
                       q_sample(x0.contiguous(), 0, schedule, generator=generator(11), backend=backend))


@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")], ids=IDS + ["reference-cpu"])
def test_empty_input(backend, device):
    schedule = DiffusionSchedule(20, 151).to(device)
    out = q_sample(torch.zeros(2, 0, 5, dtype=torch.long, device=device), 3, schedule, backend=backend)
    assert out.shape == (2, 0, 5)


@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")], ids=IDS + ["reference-cpu"])
def test_ignore_index_passes_through(backend, device):
    schedule = DiffusionSchedule(20, 7, transition="absorbing").to(device)
    x0 = torch.randint(0, 7, (2, 50, 50), device=device)
    x0[:, ::3] = 255
    out = q_sample(x0, 19, schedule, generator=generator(2), backend=backend, ignore_index=255)
    assert (out[x0 == 255] == 255).all()
    assert ((out[x0 != 255] >= 0) & (out[x0 != 255] <= 7)).all()
    assert (out[x0 != 255] == 7).float().mean() > 0.9  # absorbing at the last level: mostly [MASK]


def test_reference_backend_is_the_original_op():
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, (2, 9, 9))
    torch.manual_seed(4)
    a = q_sample(x0, torch.tensor([2, 17]), schedule, backend="reference")
    torch.manual_seed(4)
    assert torch.equal(a, reference.q_pred(x0, torch.tensor([2, 17]), schedule))


S = DiffusionSchedule(20, 7)
X = torch.randint(0, 7, (2, 4, 4))


@pytest.mark.parametrize("backend", [b for b, d in FUSED if d == "cpu"] + ["reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: q_sample(X + 7, 3, S, backend=b), ValueError, r"x0 holds label \d+ at index \(0, 0, 0\)"),
    (lambda b: q_sample(X.float(), 3, S, backend=b), TypeError, "x0 must hold integer class labels"),
    (lambda b: q_sample(X.to(torch.int16), 3, S, backend=b), TypeError, "int64, int32 or uint8"),
    (lambda b: q_sample(X, 20, S, backend=b), ValueError, r"t=20 is outside \[0, 20\)"),
    (lambda b: q_sample(X, torch.tensor([3]), S, backend=b), ValueError, r"t must have shape \[2\]"),
    (lambda b: q_sample(X, 3, S.to("meta"), backend=b), ValueError, "schedule is on meta but x0 is on cpu"),
    (lambda b: q_sample(X.tolist(), 3, S, backend=b), TypeError, "x0 must be a torch.Tensor"),
    (lambda b: q_sample(X, 3, S, backend=b, ignore_index=3), ValueError, "ignore_index=3 is a class"),
    (lambda b: q_sample(torch.full((2, 3), 7), 3, DiffusionSchedule(20, 7, transition="absorbing"), backend=b),
     ValueError, r"x0 holds label 7"),
])
def test_bad_input_is_a_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


def philox4x32_10(counter, key):
    """Philox4x32-10 written from the paper (Salmon et al., SC'11), independent of the kernels."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p2 >> 32) ^ c[1] ^ k0, p2 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


def test_python_philox_matches_the_published_known_answers():
    assert philox4x32_10([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def expected_q_sample(x0: int, index: int, seed: int, schedule, level: int) -> int:
    """The documented draw of element ``index``: counter index // 2, words (w0, w1) or (w2, w3)."""
    pair = index // 2
    w = philox4x32_10([pair & 0xFFFFFFFF, pair >> 32, 0, 0], (seed & 0xFFFFFFFF, seed >> 32))
    first, second = (w[2], w[3]) if index % 2 else (w[0], w[1])
    keep, keep_or_mask = _tables.q_sample_table(schedule)[level].tolist()
    if first < keep:
        return x0
    return schedule.num_classes if first < keep_or_mask else (second * schedule.num_classes) >> 32


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_draws_follow_the_documented_counter_layout(backend, device):
    schedule = DiffusionSchedule(20, 151, transition="mask_and_replace").to(device)
    x0 = torch.randint(0, 151, (2, 301), device=device)
    out = q_sample(x0, 15, schedule, generator=generator(8), backend=backend).cpu()
    seed = int(ddps.ops._common.draw_seed(generator(8)))
    for index in (0, 1, 2, 299, 300, 301, 601):
        label = int(x0.reshape(-1)[index])
        assert int(out.reshape(-1)[index]) == expected_q_sample(label, index, seed, schedule.to("cpu"), 15)


def test_labels_past_2_pow_31_elements_use_64_bit_indices():
    # 2^31 + 4096 uint8 labels (2 GiB in, 2 GiB out): an index kept in 32 bits would wrap and
    # fault or repeat the first elements' draws. The draws there follow the counter layout.
    n = 2**31 + 4096
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.zeros((1, n), dtype=torch.uint8)
    out = q_sample(x0, 19, schedule, generator=generator(0), backend="cpu")
    assert not torch.equal(out[0, 2**31:], out[0, :4096])
    seed = int(ddps.ops._common.draw_seed(generator(0)))
    for index in (2**31 - 1, 2**31, 2**31 + 1, n - 1):
        assert int(out[0, index]) == expected_q_sample(0, index, seed, schedule, 19)
