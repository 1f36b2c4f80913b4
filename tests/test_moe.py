"""Mixture-of-experts MLP: every token reaches exactly its top-k experts, gradients, load balancing, gates."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import jin.layers.moe as moe_module
from jin.layers import MoEMLP
from jin.layers.moe import Experts, RoutedBlock, _grouped_mm_runs


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
    out, routing = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten(0, 1), reference(moe, x.flatten(0, 1)), rtol=1e-5, atol=1e-5)
    assert routing.load.sum().item() == pytest.approx(1.0)
    assert (routing.load * 2 * 37 * top_k).round().sum().item() == 2 * 37 * top_k  # no assignment dropped


def test_gradients_reach_the_router_and_every_used_expert():
    torch.manual_seed(0)
    moe = MoEMLP(dim=8, hidden=16, num_experts=4, top_k=2)
    x = torch.randn(64, 8, requires_grad=True)
    out, routing = moe(x)
    (out.square().sum() + routing.balance).backward()
    used = routing.load > 0
    assert moe.gates[0].weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert (moe.w1.grad.flatten(1).abs().sum(1) > 0)[used].all()


def test_balancing_loss_spreads_a_skewed_router_over_the_experts():
    torch.manual_seed(0)
    moe = MoEMLP(dim=16, hidden=16, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.gates[0].bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # almost everything goes to expert 0
    x = torch.randn(512, 16)
    skewed_loss, skewed_load = moe(x)[1]
    assert skewed_load[0] > 0.7 and skewed_loss > 2.0
    opt = torch.optim.Adam(moe.gates.parameters(), lr=0.05)
    for _ in range(200):
        _, routing = moe(x)
        opt.zero_grad()
        routing.balance.backward()
        opt.step()
    balance, load = moe(x)[1]
    assert load.max() < 0.35 and load.min() > 0.15, load
    assert balance.item() < 1.1


def test_gates_route_independently_and_a_bad_gate_is_named():
    torch.manual_seed(0)
    moe = MoEMLP(dim=8, hidden=16, num_experts=4, top_k=1, num_gates=2)
    x = torch.randn(128, 8)
    a, b = moe.route(x, 0)[1], moe.route(x, 1)[1]
    assert not torch.equal(a, b)
    torch.testing.assert_close(moe(x, gate=1)[0], reference(moe, x, gate=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 gate"):
        moe(x, gate=2)
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(dim=8, hidden=16, num_experts=2, top_k=3)


def test_a_moe_trunk_trains_inside_the_jepa(compose, tiny_overrides):
    from prob_jepa.masks import ImageMasks, image_inputs
    from prob_jepa.model import build_model, image_terms
    from prob_jepa.step import TrainingStep

    cfg = compose(*tiny_overrides, "model.predictor.moe_experts=4", "model.predictor.moe_top_k=2")
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size)
    inputs = image_inputs(images, ImageMasks(cfg, model.level_jepa("image").context_encoder)(4, 0))
    terms = image_terms(cfg, model)
    out = TrainingStep(model, terms)(**inputs)
    without = TrainingStep(model, [t for t in terms if t.name != "moe_balance"])(**inputs).loss
    assert torch.isfinite(out.loss) and out.terms["moe_balance"] > 0
    torch.testing.assert_close(out.loss - without, cfg.model.predictor.moe_balance_weight * out.terms["moe_balance"])
    out.loss.backward()
    moe = model.predictor.stage.blocks[0].mlp
    assert isinstance(moe, MoEMLP) and moe.gates[0].weight.grad.abs().sum() > 0 and moe.w1.grad.abs().sum() > 0
    dense_cfg = compose(*tiny_overrides)
    dense = build_model(dense_cfg)
    assert "moe_balance" not in TrainingStep(dense, image_terms(dense_cfg, dense))(**inputs).terms


def starved_layer() -> MoEMLP:
    """Six experts with non-zero biases; the gate bias starves experts 0, 3 and 5 (first, middle and last group)."""
    torch.manual_seed(0)
    moe = MoEMLP(dim=16, hidden=32, num_experts=6, top_k=2)
    with torch.no_grad():
        moe.b1.normal_()
        moe.b2.normal_()
        moe.gates[0].bias.copy_(torch.tensor([-30.0, 0.0, 0.0, -30.0, 0.0, -30.0]))
    return moe


def output_and_grads(f, moe: MoEMLP, x: torch.Tensor, autocast: bool = False) -> list[torch.Tensor]:
    """``f(x)`` (its output, when ``f`` also returns the routing) and the gradients of ``x`` and of every parameter
    of ``moe`` for a fixed upstream gradient."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = f(x)
    out = out[0] if isinstance(out, tuple) else out
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out.detach(), *torch.autograd.grad(out, [x, *moe.parameters()], upstream)]


def test_matches_the_per_token_reference_in_values_and_gradients_with_idle_experts():
    moe = starved_layer()
    x = torch.randn(74, 16)
    _, expert, _ = moe.route(x)
    assert not torch.isin(expert, torch.tensor([0, 3, 5])).any()
    ours = output_and_grads(moe, moe, x)
    theirs = output_and_grads(lambda x: reference(moe, x), moe, x)
    names = ["out", "x", *dict(moe.named_parameters())]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    grads = dict(zip(names, ours))
    for name in ("w1", "b1", "w2", "b2"):  # an expert that got no token gets no gradient
        assert grads[name][[0, 3, 5]].abs().max() == 0 and grads[name].abs().max() > 0, name
    torch.testing.assert_close(moe(x)[1].load, torch.bincount(expert.flatten(), minlength=6) / expert.numel())


def test_compiles_to_one_graph_that_matches_eager():
    """In bf16 (autocast, as in training) forward and backward trace without a break; a new routing reuses it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    moe = starved_layer()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(moe, fullgraph=True, backend=counter)
    for seed in (0, 1):
        x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(seed))
        eager = output_and_grads(moe, moe, x, autocast=True)
        for a, b in zip(output_and_grads(compiled, moe, x, autocast=True), eager):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_forward_and_backward_read_no_value_back_and_no_shape_depends_on_one():
    """On fake tensors (shapes, no values) a host sync or a data-dependent shape raises; in bf16, as in training."""
    moe = MoEMLP(dim=16, hidden=32, num_experts=6, top_k=2).to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 37, 16, dtype=torch.bfloat16, requires_grad=True)
        out, _ = moe(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, *moe.parameters()])
    assert out.shape == x.shape and [g.shape for g in grads] == [x.shape, *(p.shape for p in moe.parameters())]


def test_the_padded_fallback_matches_grouped_dispatch(monkeypatch):
    moe = starved_layer()
    x = torch.randn(74, 16)
    grouped = output_and_grads(moe, moe, x)
    monkeypatch.setattr(moe_module, "_grouped_mm_runs", lambda x, hidden: False)
    padded = output_and_grads(moe, moe, x)
    for a, b in zip(grouped, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim, hidden, dtype", [(6, 32, torch.float32), (16, 10, torch.float32),
                                                (16, 32, torch.float64)])
def test_widths_and_dtypes_grouped_mm_cannot_take_fall_back_correctly(dim, hidden, dtype):
    """grouped_mm needs rows of a multiple of 16 bytes and has no fp64 kernel."""
    assert _grouped_mm_runs(torch.zeros(1, 16), 32)
    assert not _grouped_mm_runs(torch.zeros(1, dim, dtype=dtype), hidden)
    torch.manual_seed(0)
    moe = MoEMLP(dim=dim, hidden=hidden, num_experts=4, top_k=2).to(dtype)
    x = torch.randn(50, dim, dtype=dtype)
    torch.testing.assert_close(moe(x)[0], reference(moe, x))


class RecordGroupedMM(TorchDispatchMode):
    """Records the dtypes of the operands of every ``grouped_mm``."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._grouped_mm.default:
            self.dtypes += [args[0].dtype, args[1].dtype]
        return func(*args, **(kwargs or {}))


def test_under_autocast_the_experts_run_in_bf16_and_the_output_keeps_the_input_dtype():
    moe = starved_layer()
    x = torch.randn(74, 16)
    with RecordGroupedMM() as record:
        out, *grads = output_and_grads(moe, moe, x, autocast=True)
    expected, *expected_grads = output_and_grads(lambda x: reference(moe, x), moe, x, autocast=True)
    assert record.dtypes and set(record.dtypes) == {torch.bfloat16}  # forward and backward
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    for a, b in zip([out, *grads], [expected, *expected_grads]):
        assert (a - b).norm() < 0.02 * b.norm()


def test_a_routed_block_routes_by_its_gate_and_returns_the_routing():
    """The block is timm's with the mixture as its MLP; the gate reaches the router and the routing comes back."""
    torch.manual_seed(0)
    block = RoutedBlock(8, 2, 2.0, Experts(4, top_k=1, gates=2), qkv_bias=True).eval()
    x = torch.randn(3, 5, 8)
    for gate in (0, 1):
        out, routing = block(x, gate=gate)
        h = x + block.attn(block.norm1(x))
        mlp, expected = block.mlp(block.norm2(h), gate)
        torch.testing.assert_close(out, h + mlp)
        torch.testing.assert_close(routing.load, expected.load)
    assert not torch.allclose(block(x, gate=0)[0], block(x, gate=1)[0])
    assert block.mlp.gates[1].weight.shape == (4, 8)


def test_checkpoints_keep_their_parameter_names_and_shapes():
    moe = MoEMLP(dim=8, hidden=16, num_experts=4, top_k=2, num_gates=2)
    assert {k: tuple(v.shape) for k, v in moe.state_dict().items()} == {
        "gates.0.weight": (4, 8), "gates.0.bias": (4,), "gates.1.weight": (4, 8), "gates.1.bias": (4,),
        "w1": (4, 8, 16), "b1": (4, 1, 16), "w2": (4, 16, 8), "b2": (4, 1, 8)}


def test_moe_vs_dense_times_a_mixture_with_as_many_active_parameters_as_the_dense_mlp():
    from prob_jepa.eval.cost import moe_vs_dense

    r = moe_vs_dense(dim=16, hidden=64, num_experts=4, top_k=2, tokens=32, steps=2, warmup=1)
    assert r["moe_ms"] > 0 and r["dense_ms"] > 0
    assert r["moe_vs_dense_throughput"] == pytest.approx(r["dense_ms"] / r["moe_ms"])
    assert r["moe_active_params"] - r["dense_params"] == (2 - 1) * 16 + 4 * (16 + 1)  # k-1 extra b2, the router
    assert 1 / 4 <= r["moe_load_max"] <= 1
