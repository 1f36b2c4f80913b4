"""MDN head: what the contract does not cover — mean and samples agree with the density."""
from __future__ import annotations

import torch

from conftest import HEAD_CONFIGS
from prob_jepa.heads import build_head


def quadrature_moments(head, cond: torch.Tensor, half_width: float = 8.0, points: int = 241):
    """Mass, mean ``[2]`` and covariance ``[2, 2]`` of a 2-D head's density at one condition, on a grid."""
    axis = torch.linspace(-half_width, half_width, points)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        p = head.log_prob(grid, cond.expand(len(grid), -1)).exp() * (axis[1] - axis[0]) ** 2
    mean = p @ grid / p.sum()
    centred = grid - mean
    return p.sum(), mean, (p[:, None] * centred).T @ centred / p.sum()


def test_mdn_mean_and_samples_agree_with_log_prob():
    torch.manual_seed(0)
    head = build_head("mdn", dim=2, cond_dim=5, **HEAD_CONFIGS["mdn"]).eval()
    cond = torch.randn(1, 5)
    mass, mean, cov = quadrature_moments(head, cond)
    assert abs(mass.item() - 1) < 1e-3
    with torch.no_grad():
        samples = head.sample(cond, 20_000)[:, 0]
        torch.testing.assert_close(head.mean(cond)[0], mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.T.cov(), cov, atol=0.1, rtol=0.05)
