"""Mixture-of-experts MLP: every token reaches exactly its top-k experts, gradients, load balancing, gates."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jin.layers import MoEMLP


def reference(moe: MoEMLP, x: torch.Tensor, gate: int = 0) -> torch.Tensor:
    """Token by token: the weighted sum of its top-k experts' outputs."""
    _, expert, weight = moe.route(x, gate)
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for e, w in zip(expert[t].tolist(), weight[t]):
            h = F.gelu(x[t] @ moe.w1[e] + moe.b1[e, 0])
            out[t] += w * (h @ moe.w2[e] + moe.b2[e, 0])
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_every_token_is_processed_by_exactly_its_top_k_experts(top_k):
    torch.manual_seed(0)
    moe = MoEMLP(dim=16, hidden=32, num_experts=4, top_k=top_k)
    with torch.no_grad():  # non-zero biases, so a token sent to a wrong or extra expert shows
        moe.b1.normal_()
        moe.b2.normal_()
    x = torch.randn(2, 37, 16)
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten(0, 1), reference(moe, x.flatten(0, 1)), rtol=1e-5, atol=1e-5)
    assert moe.load.sum().item() == pytest.approx(1.0)
    assert (moe.load * 2 * 37 * top_k).round().sum().item() == 2 * 37 * top_k  # no assignment dropped


def test_gradients_reach_the_router_and_every_used_expert():
    torch.manual_seed(0)
    moe = MoEMLP(dim=8, hidden=16, num_experts=4, top_k=2)
    x = torch.randn(64, 8, requires_grad=True)
    (moe(x).square().sum() + moe.aux_loss).backward()
    used = moe.load > 0
    assert moe.gates[0].weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert (moe.w1.grad.flatten(1).abs().sum(1) > 0)[used].all()


def test_balancing_loss_spreads_a_skewed_router_over_the_experts():
    torch.manual_seed(0)
    moe = MoEMLP(dim=16, hidden=16, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.gates[0].bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # almost everything goes to expert 0
    x = torch.randn(512, 16)
    moe(x)
    skewed_loss, skewed_load = moe.aux_loss.item(), moe.load.clone()
    assert skewed_load[0] > 0.7 and skewed_loss > 2.0
    opt = torch.optim.Adam(moe.gates.parameters(), lr=0.05)
    for _ in range(200):
        moe(x)
        opt.zero_grad()
        moe.aux_loss.backward()
        opt.step()
    moe(x)
    assert moe.load.max() < 0.35 and moe.load.min() > 0.15, moe.load
    assert moe.aux_loss.item() < 1.1


def test_gates_route_independently_and_a_bad_gate_is_named():
    torch.manual_seed(0)
    moe = MoEMLP(dim=8, hidden=16, num_experts=4, top_k=1, num_gates=2)
    x = torch.randn(128, 8)
    a, b = moe.route(x, 0)[1], moe.route(x, 1)[1]
    assert not torch.equal(a, b)
    torch.testing.assert_close(moe(x, gate=1), reference(moe, x, gate=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 gate"):
        moe(x, gate=2)
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(dim=8, hidden=16, num_experts=2, top_k=3)


def test_a_moe_trunk_trains_inside_the_jepa(compose, tiny_overrides):
    from prob_jepa.masks import MaskCollator
    from prob_jepa.model import build_model

    cfg = compose(*tiny_overrides, "model.predictor.moe_experts=4", "model.predictor.moe_top_k=2")
    torch.manual_seed(0)
    model = build_model(cfg)
    masks = MaskCollator(model.context_encoder.unit_grid, seed=0, **cfg.mask)(4, 0)
    images = torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size)
    out = model(images, masks.context, masks.targets)
    model.balance_weight = 0.0
    without = model(images, masks.context, masks.targets).loss
    assert torch.isfinite(out.loss) and out.terms["moe_balance"] > 0
    torch.testing.assert_close(out.loss - without, cfg.model.predictor.moe_balance_weight * out.terms["moe_balance"])
    out.loss.backward()
    moe = model.predictor.stage.blocks[0].mlp
    assert isinstance(moe, MoEMLP) and moe.gates[0].weight.grad.abs().sum() > 0 and moe.w1.grad.abs().sum() > 0
    dense = build_model(compose(*tiny_overrides))
    assert dense.predictor.balance_loss() is None
