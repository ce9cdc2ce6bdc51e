"""ddps.ops.renoise equals q_sample(argmax(logits)) exactly."""
import pytest
import torch

import ddps
from ddps import DiffusionSchedule
from ddps.ops import q_sample, renoise
from helpers.sampling import FUSED, IDS, TRANSITIONS, generator


@pytest.mark.parametrize("backend,device", FUSED + [("reference", "cpu")], ids=IDS + ["reference-cpu"])
@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_equals_q_sample_of_argmax(backend, device, transition, dtype):
    schedule = DiffusionSchedule(20, 151, transition=transition).to(device)
    logits = torch.randn(3, 151, 21, 13, device=device).to(dtype)
    t = torch.tensor([0, 9, 19], device=device)
    out = renoise(logits, t, schedule, generator=generator(4), backend=backend)
    expected = q_sample(logits.argmax(1), t, schedule, generator=generator(4), backend=backend)
    assert out.dtype == torch.int64 and torch.equal(out, expected)


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_ties_and_nan_resolve_like_torch_argmax(backend, device):
    schedule = DiffusionSchedule(20, 7).to(device)
    logits = torch.zeros(1, 7, 4)
    logits[0, [2, 5], 0] = 3.0  # tie: lowest class wins
    logits[0, 4, 1] = float("nan")  # NaN wins
    logits[0, [1, 6], 2] = float("nan")  # first NaN wins
    logits[0, :, 3] = float("-inf")
    # At the identity level renoise is the argmax itself.
    table = schedule.table("q_sample", ddps.ops._tables.q_sample_table)
    args = (logits.to(device), torch.tensor([20], device=device), table, torch.tensor(1), 7, -1)
    out = ddps.ops._common.launch("renoise", backend, *args).cpu()
    assert torch.equal(out, logits.argmax(1))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
@pytest.mark.parametrize("plane", [1, 15, 16, 17, 128, 300], ids=lambda p: f"plane{p}")
def test_nan_and_inf_anywhere_in_a_tile(backend, device, plane):
    # The CPU kernel works on tiles of 128 pixels, then groups of 16, then single pixels; a NaN
    # (or +inf beside -inf) in any of them must still resolve exactly as torch.argmax does.
    g = torch.Generator().manual_seed(plane)
    logits = torch.randn(2, 151, plane, generator=g)
    for b, k, p, v in [(0, 0, 0, float("nan")), (0, 90, plane // 2, float("nan")), (1, 150, plane - 1, float("nan")),
                       (1, 3, plane // 3, float("inf")), (1, 4, plane // 3, float("-inf")), (0, 7, plane // 4, float("-inf"))]:
        logits[b, k, p] = v
    table = ddps.ops._tables.q_sample_table(DiffusionSchedule(20, 151))
    args = (logits.to(device), torch.tensor([20, 20], device=device), table.to(device), torch.tensor(1), 151, -1)
    out = ddps.ops._common.launch("renoise", backend, *args).cpu()
    assert torch.equal(out, logits.argmax(1))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_skipped_argmax_does_not_change_samples(backend, device):
    # At level T-1 almost no pixel keeps its label, so the CPU kernel skips reading most tiles;
    # the samples must still be q_sample's of the argmax, for a batch mixing levels.
    schedule = DiffusionSchedule(20, 151).to(device)
    logits = torch.randn(4, 151, 40, 33, device=device)
    t = torch.tensor([19, 0, 19, 10], device=device)
    out = renoise(logits, t, schedule, generator=generator(8), backend=backend)
    assert torch.equal(out, q_sample(logits.argmax(1), t, schedule, generator=generator(8), backend=backend))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_non_contiguous_and_empty(backend, device):
    schedule = DiffusionSchedule(20, 151).to(device)
    logits = torch.randn(4, 151, 10, 8, device=device)[::2, :, ::3]
    assert torch.equal(renoise(logits, 5, schedule, generator=generator(1), backend=backend),
                       renoise(logits.contiguous(), 5, schedule, generator=generator(1), backend=backend))
    assert renoise(torch.randn(2, 151, 0, device=device), 5, schedule, backend=backend).shape == (2, 0)


def test_bad_input_is_a_clear_error():
    schedule = DiffusionSchedule(20, 7)
    with pytest.raises(ValueError, match=r"logits must be \[B, K=7"):
        renoise(torch.randn(2, 6, 3), 1, schedule)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        renoise(torch.randint(0, 7, (2, 7, 3)), 1, schedule)
    with pytest.raises(ValueError, match=r"t\[1\]=20 is outside"):
        renoise(torch.randn(2, 7, 3), torch.tensor([1, 20]), schedule)
