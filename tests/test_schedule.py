import pytest
import torch

from ddps import DiffusionSchedule, reference
from ddps.ops import _tables

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


@pytest.mark.parametrize("transition", ["uniform", "absorbing", "mask_and_replace"])
@pytest.mark.parametrize("kind", ["linear", "cos"])
def test_transitions_are_markov_chains(kind, transition):
    schedule = DiffusionSchedule(20, 9, kind, transition)
    levels = torch.arange(20)
    one_step = reference.transition_matrix(schedule, levels, cumulative=False)
    cumulative = reference.transition_matrix(schedule, levels, cumulative=True)
    previous = reference.transition_matrix(schedule, levels - 1, cumulative=True)
    for q in (one_step, cumulative):
        assert torch.allclose(q.sum(-1), torch.ones_like(q.sum(-1)), atol=1e-6)
        assert (q >= 0).all()
    # q(x_s | x_0) = q(x_{s-1} | x_0) q(x_s | x_{s-1}), with the identity level before s = 0.
    assert torch.allclose(previous @ one_step, cumulative, atol=1e-6)
    assert torch.equal(previous[0], torch.eye(schedule.num_states, dtype=torch.float64))
    if transition != "uniform":
        assert schedule.mask_index == 9 and schedule.num_states == 10
        assert (schedule.ctt[:-1].diff() >= 0).all()  # masks only accumulate


def test_sampler_tables_reach_the_extremes():
    schedule = DiffusionSchedule(20, 151)
    table = _tables.q_sample_table(schedule)
    assert table.dtype == torch.int64 and table.shape == (21, 2)
    assert table[20].tolist() == [2**32, 2**32]  # identity level: always keep
    assert torch.allclose(table[:, 0].double() / 2**32, schedule.att.double(), atol=2**-32)
    posterior = _tables.q_posterior_table(schedule)
    assert posterior.shape == (20, 3, 2)
    assert posterior[0, 0].tolist() == [2**32, 2**32] and posterior[0, 1, 1] == 2**32  # s = 0 returns x0


def test_to_moves_every_tensor_and_keeps_the_original():
    s = DiffusionSchedule(20, 151)
    m = s.to("meta")
    assert s.to("cpu") is s
    assert all(getattr(m, n).device.type == "meta" for n in DiffusionSchedule.TENSORS)
    assert s.device.type == "cpu" and m.num_classes == 151 and m.kind == "linear"


@pytest.mark.parametrize("args,exc,match", [
    ((20, 151, "cosine"), ValueError, "kind='cosine'"),
    ((20, 151, "cos", "masked"), ValueError, "transition='masked'"),
    ((1, 151, "linear"), ValueError, "num_timesteps=1"),
    ((20, 1), ValueError, "num_classes=1"),
    ((20.0, 151), TypeError, "num_timesteps"),
    ((20, "151"), TypeError, "num_classes"),
])
def test_bad_schedule_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        DiffusionSchedule(*args)
