"""ddps.ops.renoise equals q_sample(argmax(logits)) exactly."""
import pytest
import torch

from ddps import DiffusionSchedule
from ddps.ops import q_sample, renoise
from sampling import FUSED, IDS, TRANSITIONS, generator


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
    table = schedule.table("q_sample", __import__("ddps").ops._tables.q_sample_table)
    args = (logits.to(device), torch.tensor([20], device=device), table, torch.tensor(1), 7, -1)
    out = __import__("ddps").ops._common.launch("renoise", backend, *args).cpu()
    assert torch.equal(out, logits.argmax(1))


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
