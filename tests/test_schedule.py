import pytest
import torch

from ddps import DiffusionSchedule

CASES = [(kind, T, K) for kind in ("linear", "cos") for T, K in ((20, 151), (100, 151), (100, 20))]


@pytest.mark.parametrize("kind,T,K", CASES, ids=[f"{k}-T{T}-K{K}" for k, T, K in CASES])
def test_schedule_matches_original(official, kind, T, K):
    schedule = DiffusionSchedule(T, K, kind)
    golden = official[f"schedule/{kind}/T{T}_K{K}"]
    for name in ("at", "bt", "att", "btt"):
        assert getattr(schedule, name).dtype == torch.float32
        assert torch.equal(getattr(schedule, name), golden[name]), name
    assert torch.equal(schedule.log_cumprod_at, torch.log(golden["att"]))
    assert torch.equal(schedule.log_cumprod_bt, torch.log(golden["btt"]))
    assert torch.equal(schedule.log_at, torch.log(golden["at"]))
    assert torch.equal(schedule.log_bt, torch.log(golden["bt"]))
    assert schedule.log_cumprod_bt[-1] == float("-inf") and schedule.att[-1] == 1


def test_keep_threshold_is_att_in_units_of_2_pow_minus_32():
    s = DiffusionSchedule(20, 151)
    assert s.keep_threshold.dtype == torch.int64
    assert s.keep_threshold[-1] == 2**32  # identity level: always keep
    assert torch.allclose(s.keep_threshold.double() / 2**32, s.att.double(), atol=2**-32)


def test_to_moves_every_tensor_and_keeps_the_original():
    s = DiffusionSchedule(20, 151)
    m = s.to("meta")
    assert s.to("cpu") is s
    assert all(getattr(m, n).device.type == "meta" for n in DiffusionSchedule.TENSORS)
    assert s.device.type == "cpu" and m.num_classes == 151 and m.kind == "linear"


@pytest.mark.parametrize("args,exc,match", [
    ((20, 151, "cosine"), ValueError, "kind='cosine'"),
    ((1, 151, "linear"), ValueError, "num_timesteps=1"),
    ((20, 1), ValueError, "num_classes=1"),
    ((20.0, 151), TypeError, "num_timesteps"),
    ((20, "151"), TypeError, "num_classes"),
])
def test_bad_schedule_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        DiffusionSchedule(*args)
