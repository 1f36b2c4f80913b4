"""Flow-head behaviour beyond the contract: the affine variant's scale, 1-D splines, a reproducible mean."""
from __future__ import annotations

import math

import torch

from conftest import HEAD_CONFIGS
from prob_jepa.heads import build_head
from prob_jepa.synthetic import BimodalTask, cond_features, train_head


def make(dim: int, cond_dim: int = 8, **overrides):
    torch.manual_seed(0)
    return build_head("flow", dim=dim, cond_dim=cond_dim, **{**HEAD_CONFIGS["flow"], **overrides})


def test_affine_flow_fits_a_target_narrower_than_the_base():
    # nflows' own affine coupling scale is at most 1.001 (data → noise), so a stack of it cannot
    # put the NLL per dimension below the base's peak, 0.5·log(2π) ≈ 0.92 nats; N(0, 0.05²) has −1.58.
    head = make(dim=2, cond_dim=3, transform="affine")
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = head.loss(torch.randn(256, 3, generator=g), 0.05 * torch.randn(256, 2, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * math.log(2 * math.pi) - 2.0, loss.item()


def test_one_dimensional_spline_flow_is_bimodal():
    task = BimodalTask(dim=1, cond_dim=8, weight=0.5, sigma=0.3)
    head = make(dim=1)
    train_head(head, task, steps=300, batch_size=256, lr=3e-3)
    c = torch.tensor([0.1])
    mode = task.centre(c)  # [1, 1]; the other mode is its negation, the trough is at 0
    with torch.no_grad():
        lp = head.log_prob(torch.cat([mode, -mode, torch.zeros(1, 1)]), cond_features(c, 8).expand(3, -1))
    assert (lp[:2] > lp[2] + 2.0).all(), lp


def test_mean_is_reproducible_and_leaves_the_global_rng_alone():
    head = make(dim=3, cond_dim=5)
    cond = torch.randn(4, 5)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = head.mean(cond)
    torch.testing.assert_close(torch.rand(3), expected)
    torch.testing.assert_close(head.mean(cond), first)
