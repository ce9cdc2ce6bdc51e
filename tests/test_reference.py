"""ddps.reference against the original's golden outputs, and its input checks."""
import pytest
import torch

from ddps import DiffusionSchedule, reference


@pytest.fixture(scope="module")
def sampler_cases(official):
    spec = official["samplers"]
    return DiffusionSchedule(spec["T"], spec["K"], spec["schedule"]), spec["cases"]


@pytest.mark.parametrize("case", [0, 1])
def test_q_pred_bitwise(sampler_cases, case):
    schedule, cases = sampler_cases
    c = cases[case]
    torch.manual_seed(c["torch_seed"])
    out = reference.q_pred(c["x0"], c["t"], schedule)
    assert out.dtype == torch.int64 and torch.equal(out, c["q_pred"])


@pytest.mark.parametrize("case", [0, 1])
def test_q_posterior_bitwise(sampler_cases, case):
    schedule, cases = sampler_cases
    c = cases[case]
    torch.manual_seed(c["torch_seed"])
    out = reference.q_posterior(c["x0"], c["xt"], c["t"], schedule)
    assert torch.equal(out, c["q_posterior"])


def test_generator_gives_the_default_stream_draws(sampler_cases):
    schedule, cases = sampler_cases
    c = cases[1]
    gen = torch.Generator().manual_seed(c["torch_seed"])
    assert torch.equal(reference.q_pred(c["x0"], c["t"], schedule, generator=gen), c["q_pred"])


def test_q_pred_log_is_a_distribution_with_three_values():
    schedule = DiffusionSchedule(20, 151)
    x0 = torch.randint(0, 151, (2, 5, 3))
    x_t = torch.randint(0, 151, (2, 5, 3))
    t = torch.tensor([0, 13])
    p = reference.q_pred_log(reference.index_to_log_onehot(x0, 151), t, schedule).exp()
    assert torch.allclose(p.sum(1), torch.ones(2, 5, 3), atol=1e-5)
    post = reference.q_posterior_log(reference.index_to_log_onehot(x0, 151),
                                     reference.index_to_log_onehot(x_t, 151), t, schedule)
    assert post.max() <= 0 and post.min() >= -70
    for b in range(2):
        assert torch.unique(post[b, :, 0, 0]).numel() <= 3


def test_log_add_exp_matches_logaddexp():
    a, b = torch.randn(100), torch.randn(100)
    assert torch.allclose(reference.log_add_exp(a, b), torch.logaddexp(a, b), atol=1e-6)


S = DiffusionSchedule(20, 7)
X = torch.randint(0, 7, (2, 4, 4))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: reference.q_pred(torch.full((2, 4, 4), 7), 3, S), ValueError, r"x0 holds label 7 at index \(0, 0, 0\)"),
    (lambda: reference.q_pred(torch.tensor([[1, -2]]), 3, S), ValueError, r"label -2 at index \(0, 1\)"),
    (lambda: reference.q_pred(X.float(), 3, S), TypeError, "x0 must hold integer class labels"),
    (lambda: reference.q_pred(X, 20, S), ValueError, r"t=20 is outside \[0, 20\)"),
    (lambda: reference.q_pred(X, torch.tensor([0, -1]), S), ValueError, r"t\[1\]=-1 is outside"),
    (lambda: reference.q_pred(X, torch.tensor([1.0, 2.0]), S), TypeError, "t must be an integer tensor"),
    (lambda: reference.q_pred(X, torch.tensor([1, 2, 3]), S), ValueError, r"t must have shape \[2\]"),
    (lambda: reference.q_pred(X, 1.5, S), TypeError, "t must be an int"),
    (lambda: reference.q_pred(X, 3, "linear"), TypeError, "schedule must be"),
    (lambda: reference.q_posterior(X, X[:, :3], 3, S), ValueError, "x0 has shape .* but x_t has shape"),
    (lambda: reference.q_posterior(X, X + 7, 3, S), ValueError, "x_t holds label"),
    (lambda: reference.q_pred(X.to("meta"), 3, S), ValueError, "x0 is on meta but the schedule is on cpu"),
    (lambda: reference.q_pred(X, 3, S.to("meta")), ValueError, "x0 is on cpu but the schedule is on meta"),
    (lambda: reference.q_pred(X, torch.tensor([1, 2], device="meta"), S), ValueError, "t is on meta"),
    (lambda: reference.index_to_log_onehot(torch.tensor([[3, 9]]), 7), ValueError, "label 9"),
    (lambda: reference.q_pred_log(torch.zeros(2, 6, 3), 3, S), ValueError, r"log_x0 must be \[B, S=7"),
    (lambda: reference.q_pred_log(torch.zeros(2, 7, 3, dtype=torch.long), 3, S), TypeError, "floating-point"),
    (lambda: reference.q_posterior_log(torch.zeros(2, 7, 3), torch.zeros(2, 7, 4), 3, S), ValueError, "log_x_t has shape"),
])
def test_bad_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
