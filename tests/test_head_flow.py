"""Flow-head behaviour beyond the contract: the affine variant's scale, 1-D splines, a reproducible mean,
our bins-first spline coupling against nflows' own."""
from __future__ import annotations

import math

import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform

from conftest import HEAD_CONFIGS
from prob_jepa.heads import build_head
from prob_jepa.heads.flow import _SplineCoupling
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


def test_spline_coupling_matches_nflows_inside_and_outside_the_tail_bound():
    torch.manual_seed(0)
    dim, ctx = 6, 4
    mask = (torch.arange(dim) >= dim // 2).float()

    def net(i: int, o: int) -> ResidualNet:
        return ResidualNet(i, o, 16, context_features=ctx, num_blocks=1)

    kw = dict(num_bins=5, tails="linear", tail_bound=2.0)
    ours, ref = _SplineCoupling(mask, net, **kw), PiecewiseRationalQuadraticCouplingTransform(mask, net, **kw)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref.load_state_dict(ours.state_dict())
    x, c = 2.0 * torch.randn(512, dim), torch.randn(512, ctx)  # about a third beyond ±2
    assert ((x.abs() > 2.0).float().mean() > 0.2).item()
    (y, lad), (y_ref, lad_ref) = ours(x, c), ref(x, c)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(lad, lad_ref)
    grads = torch.autograd.grad(y.square().sum() + lad.sum(), list(ours.parameters()))
    grads_ref = torch.autograd.grad(y_ref.square().sum() + lad_ref.sum(), list(ref.parameters()))
    for g, g_ref in zip(grads, grads_ref):  # the same math in another order: float32 rounding only
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    x_back, lad_inv = ours.inverse(y, c)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lad_inv, -lad, atol=1e-4, rtol=1e-4)
