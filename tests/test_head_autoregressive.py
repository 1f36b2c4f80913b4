"""Autoregressive head: the autoregressive structure, and sequential sampling against the density."""
from __future__ import annotations

import pytest
import torch

from conftest import HEAD_CONFIGS
from prob_jepa.heads import build_head
from test_head_mdn import quadrature_moments


def make(dim: int, **options):
    torch.manual_seed(0)
    return build_head("autoregressive", dim=dim, cond_dim=5, **{**HEAD_CONFIGS["autoregressive"], **options}).eval()


def test_coordinate_parameters_depend_on_earlier_coordinates_only():
    head = make(dim=4)
    y, context = torch.randn(6, 4), head.embed(torch.randn(6, 5))
    with torch.no_grad():
        base = torch.stack(head._params(y, context))  # [3, N, K, D]
        for i in range(4):  # the one-coordinate path used by sample and mean computes the same numbers
            alone = torch.stack(head._coordinate_params(y, context, head._direct(context), i))
            torch.testing.assert_close(alone, base[..., i])
        for j in range(4):
            moved = y.clone()
            moved[:, j] += 1.0
            changed = (torch.stack(head._params(moved, context)) - base).abs().amax(dim=(0, 1, 2)) > 0  # [D]
            assert not changed[: j + 1].any(), f"moving y_{j} changed coordinates {changed.nonzero().flatten().tolist()}"
            assert changed[j + 1 :].all(), f"coordinates after {j} ignore y_{j}"


@pytest.mark.parametrize("components", [1, 4])  # pyro's MADE returns [N, D], not [N, 1, D], for K = 1
@pytest.mark.parametrize("distribution", ["gaussian", "logistic"])
def test_sequential_samples_agree_with_log_prob(distribution, components):
    head = make(dim=2, distribution=distribution, num_components=components)
    cond = torch.randn(1, 5)
    mass, mean, cov = quadrature_moments(head, cond)
    assert abs(mass.item() - 1) < 1e-2
    with torch.no_grad():
        samples = head.sample(cond, 20_000)[:, 0]
        first = head.mean(cond)[0, 0]  # the sequential mean is exact for the first coordinate
    torch.testing.assert_close(first, mean[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.T.cov(), cov, atol=0.1, rtol=0.05)
