"""Exact distributional checks for the samplers: chi-square goodness of fit."""
import torch

P_REJECT = 1e-4  # fixed rejection threshold; seeds are fixed too, so every run is the same


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of observed ``counts`` [K] under ``probs`` [K]; bins expected to hold fewer than
    ``min_expected`` draws are pooled into one."""
    counts = counts.double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if exp[-1] < min_expected:  # the pooled bin is still too small: fold it into the largest bin
        big = int(exp[:-1].argmax())
        obs[big] += obs[-1]
        exp[big] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    dof = obs.numel() - 1
    if dof == 0:  # a single outcome carries all the mass: nothing to test beyond the support
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))
