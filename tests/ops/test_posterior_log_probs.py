"""ddps.ops.posterior_log_probs against the reference log-probabilities and their gradients."""
import pytest
import torch

from ddps import DiffusionSchedule, reference
from ddps.ops import posterior_log_probs
from helpers.sampling import TRANSITIONS

T, K = 20, 23


def _inputs(transition, seed=0):
    g = torch.Generator().manual_seed(seed)
    schedule = DiffusionSchedule(T, K, "cos", transition)
    x0 = torch.randint(0, K, (3, 7, 5), generator=g)
    x_t = torch.where(torch.rand(3, 7, 5, generator=g) < 0.4, x0,
                      torch.randint(0, schedule.num_states, (3, 7, 5), generator=g))
    if transition == "absorbing":  # only observations that can happen
        x_t = torch.where(x_t == x0, x0, K)
    return schedule, x0, x_t, torch.tensor([0, 9, 19])


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_label_x0_matches_reference(transition):
    schedule, x0, x_t, t = _inputs(transition)
    out = posterior_log_probs(x0, x_t, t, schedule)
    S = schedule.num_states
    ref = reference.q_posterior_log(reference.index_to_log_onehot(x0, S), reference.index_to_log_onehot(x_t, S),
                                    t, schedule).log_softmax(dim=1)
    assert out.shape == (3, S, 7, 5) and out.dtype == torch.float32
    assert torch.allclose(torch.logsumexp(out, dim=1), torch.zeros(3, 7, 5), atol=1e-5)
    finite = ref > -60  # entries at the original's clamp floor (~exp(-70)) carry no probability
    assert torch.equal(finite, out > -60)
    assert (out[finite] - ref[finite]).abs().max() <= 1e-5
    assert torch.allclose(posterior_log_probs(x0, x_t, t, schedule, backend="reference"), ref)


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_logits_match_reference_values_and_gradients(transition):
    schedule, _, x_t, t = _inputs(transition, seed=1)
    logits = (torch.randn(3, K, 7, 5, generator=torch.Generator().manual_seed(2)) * 3).requires_grad_()
    out = posterior_log_probs(logits, x_t, t, schedule)
    ref = reference.p_posterior_log(logits, x_t, t, schedule)
    finite = ref > float("-inf")
    assert torch.equal(finite, out > float("-inf"))
    assert (out[finite] - ref[finite]).abs().max() <= 1e-5
    weights = torch.randn(out.shape).where(finite, torch.zeros(()))
    (grad,) = torch.autograd.grad((out.where(finite, 0) * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref.where(finite, 0) * weights).sum(), logits)
    assert torch.allclose(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_in_double_precision():
    schedule, _, x_t, t = _inputs("mask_and_replace", seed=3)
    logits = torch.randn(3, K, 7, 5, dtype=torch.float64, requires_grad=True)
    # The op computes in float32; gradcheck its float32 output against finite differences loosely.
    assert torch.autograd.gradcheck(lambda l: posterior_log_probs(l.float(), x_t, t, schedule).double()[:, :K],
                                    (logits,), eps=1e-3, atol=2e-2, rtol=2e-2)


def test_bad_input():
    schedule, x0, x_t, t = _inputs("uniform")
    with pytest.raises(ValueError, match="x_t has shape"):
        posterior_log_probs(x0, x_t[:, :3], t, schedule)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        posterior_log_probs(x0, x_t, t, schedule, backend="gpu")
    with pytest.raises(ValueError, match=r"logits must be \[B, K=23"):
        posterior_log_probs(torch.randn(3, 5, 7, 5), x_t, t, schedule)
