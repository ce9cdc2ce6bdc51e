"""Shared pieces of the sampling-op tests: the backends to run, exact probabilities from
ddps.reference, and the chi-square acceptance test."""
import torch

import ddps
from ddps import reference
from .stats import P_REJECT, chi_square_pvalue

TRANSITIONS = ("uniform", "absorbing", "mask_and_replace")
ZERO = 1e-15  # the reference's "zero" probabilities (its log floors are 1e-30 and exp(-70))


def _targets():
    status = ddps.backends()
    targets = []
    if status["cpu"]["available"]:
        targets.append(("cpu", "cpu"))
    if status["cuda"]["available"]:
        targets.append(("cuda", "cuda"))
    if status["triton"]["available"]:
        targets.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    return targets


# (backend, device) pairs of the fused kernels available here.
FUSED = _targets()
# Where the full-size distribution tests run: compiled kernels, and Triton on a GPU. Under the
# interpreter Triton is checked bitwise against the CPU kernels instead (same draws, hence the
# same distribution).
DISTRIBUTION = [(b, d) for b, d in FUSED if not (b == "triton" and d == "cpu")]
IDS = [f"{b}-{d}" for b, d in FUSED]
DIST_IDS = [f"{b}-{d}" for b, d in DISTRIBUTION]


def assert_distribution(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """``samples``: many draws of one distribution ``probs`` [S] (exact, from the reference)."""
    probs = probs.double().cpu()
    counts = torch.bincount(samples.reshape(-1).long().cpu(), minlength=probs.numel())
    assert counts.numel() == probs.numel(), "a label outside the distribution's support was drawn"
    never = probs < ZERO
    assert counts[never].sum() == 0, f"zero-probability classes drawn: {never.nonzero().flatten().tolist()}"
    p = chi_square_pvalue(counts, probs)
    assert p > P_REJECT, f"chi-square p = {p:.3g} (counts {counts.tolist()[:8]}..., probs {probs.tolist()[:8]}...)"


def one_hot_log(label: int, schedule) -> torch.Tensor:
    return reference.index_to_log_onehot(torch.tensor([[label]]), schedule.num_states)


def q_sample_probs(x0: int, level: int, schedule) -> torch.Tensor:
    return reference.q_pred_log(one_hot_log(x0, schedule), level, schedule)[0, :, 0].double().softmax(0)


def q_posterior_probs(x0: int, x_t: int, level: int, schedule) -> torch.Tensor:
    log_p = reference.q_posterior_log(one_hot_log(x0, schedule), one_hot_log(x_t, schedule), level, schedule)
    return log_p[0, :, 0].double().softmax(0)


def p_posterior_probs(logits: torch.Tensor, x_t: int, level: int, schedule) -> torch.Tensor:
    """logits [K] of one pixel."""
    log_p = reference.p_posterior_log(logits.reshape(1, -1, 1), torch.tensor([[x_t]]), level, schedule)
    return log_p[0, :, 0].double().exp()


def assert_thread_count_invariant(draw) -> None:
    """``draw()`` gives identical tensors with 1, 2 and 3 torch threads."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(draw())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


__all__ = ["TRANSITIONS", "FUSED", "DISTRIBUTION", "IDS", "DIST_IDS", "assert_distribution", "q_sample_probs",
           "q_posterior_probs", "p_posterior_probs", "generator", "assert_thread_count_invariant", "P_REJECT"]
