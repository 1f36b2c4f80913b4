"""The JIN hierarchical encoder: levels, masking, spatial bias, adaptive computation, zoom."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jin import HierarchicalEncoder
from jin.layers import SpatialBias, grid_coords, unit_layout

IMG = 32


def encoder(**kw) -> HierarchicalEncoder:
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=4, dims=[16, 24, 32], depths=[1, 1, 1], num_heads=[2, 2, 2])
    args.update(kw)
    return HierarchicalEncoder(**args).eval()


def test_unit_layout_groups_2x2_merges_contiguously():
    grid = grid_coords(8)  # [8, 8, 3]
    units = unit_layout(grid, 4)  # 4 units of 4×4 tokens
    assert units.shape == (4, 16, 3)
    # unit 1 is the top-right 4×4 block
    assert torch.allclose(units[1, 0, :2], torch.tensor([4.5 / 8, 0.5 / 8]))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_per_level_token_counts_under_masking(levels):
    enc = encoder(dims=[16, 24, 32][:levels], depths=[1] * levels, num_heads=[2] * levels)
    unit = 2 ** (levels - 1)
    assert enc.unit_grid == (IMG // 4) // unit
    units = torch.stack([torch.randperm(enc.num_units)[:3] for _ in range(2)])
    out = enc(torch.randn(2, 3, IMG, IMG), units)
    for l, lv in enumerate(out):
        side = unit // 2**l
        assert lv.features.shape == (2, 3, side * side, [16, 24, 32][l])
        assert lv.coords.shape == (2, 3, side * side, 3)
        # coordinates of level l are those of a (grid / 2^l)-sided grid
        assert torch.allclose(lv.coords[..., 2], torch.tensor(-math.log2((IMG / 4) / 2**l)))
    full = enc(torch.randn(2, 3, IMG, IMG))
    assert full[0].features.shape[1] == enc.num_units


def test_merged_tokens_sit_at_the_centre_of_their_children():
    enc = encoder()
    c0, c1 = enc.coords(0)[0], enc.coords(1)[0]  # [U, 16, 3], [U, 4, 3]
    children = c0.view(-1, 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 4, 3)
    assert torch.allclose(children[..., :2].mean(2), c1[..., :2])


@pytest.mark.parametrize(
    "kw", [{}, {"spatial_bias": True}, {"adaptive": True}, {"zoom_factors": [0.5, 0.25], "zoom_tokens": 2}]
)
def test_context_features_ignore_hidden_pixels(kw):
    """The context encoder sees only its units: changing any hidden pixel changes nothing."""
    enc = encoder(**kw)
    units = torch.tensor([[0, 1, 3]])  # of the 2×2 unit grid; unit 2 (bottom-left) is hidden
    x = torch.randn(1, 3, IMG, IMG)
    y = x.clone()
    y[:, :, IMG // 2 :, : IMG // 2] = torch.randn(1, 3, IMG // 2, IMG // 2)  # repaint unit 2
    with torch.no_grad():
        a, b = enc(x, units), enc(y, units)
    for la, lb in zip(a, b):
        torch.testing.assert_close(la.features, lb.features)


def test_spatial_bias_depends_on_relative_position_and_scale_only():
    torch.manual_seed(0)
    bias = SpatialBias(num_heads=2, hidden=8, grid=8)
    c = torch.rand(1, 5, 3)
    b = bias(c)
    assert b.shape == (1, 2, 5, 5)
    shifted = c + torch.tensor([0.125, -0.25, 0.5])  # a common translation in position and scale
    torch.testing.assert_close(bias(shifted), b)
    moved = c.clone()
    moved[0, 0, 0] += 0.3  # Δpos of token 0 changes
    assert not torch.allclose(bias(moved)[0, :, 0], b[0, :, 0])
    rescaled = c.clone()
    rescaled[0, 0, 2] += 1.0  # Δscale of token 0 changes
    assert not torch.allclose(bias(rescaled)[0, :, 0], b[0, :, 0])


def test_spatial_bias_changes_attention_output():
    with_bias = encoder(spatial_bias=True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        a = with_bias(x)[0].features
        for stage in with_bias.stages:
            torch.nn.init.normal_(stage.spatial_bias.mlp[-1].weight, std=1.0)
        b = with_bias(x)[0].features
    assert not torch.allclose(a, b)


def test_every_spatial_bias_parameter_is_trained_and_older_checkpoints_load():
    """A per-head constant in the bias shifts every logit of a row alike, which softmax ignores: such a parameter
    gets no gradient (it was the MLP's output bias until 2026-12-02; checkpoints holding it still load)."""
    enc = encoder(spatial_bias=True)
    for stage in enc.stages:  # a bias that varies with the offset, so the gradients are not all at rounding level
        torch.nn.init.normal_(stage.spatial_bias.mlp[-1].weight, std=1.0)
    enc(torch.randn(2, 3, IMG, IMG))[-1].features.square().sum().backward()
    for stage in enc.stages:  # rounding leaves ~1e-6 of the largest gradient on a parameter softmax ignores
        grads = {n: p.grad.abs().max() for n, p in stage.spatial_bias.named_parameters()}
        assert all(g > 1e-3 * max(grads.values()) for g in grads.values()), grads
    state = enc.state_dict()
    state["stages.0.spatial_bias.mlp.2.bias"] = torch.zeros(enc.stages[0].spatial_bias.mlp[-1].out_features)
    encoder(spatial_bias=True).load_state_dict(state)
    # the bias is drawn and dropped: the generator ends where it did with it, so a seed's weights stay the same
    torch.manual_seed(0)
    SpatialBias(4, 16, 8)
    after_bias_free = torch.rand(3)
    torch.manual_seed(0)
    torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    assert torch.equal(after_bias_free, torch.rand(3))


def test_adaptive_computation_lowers_measured_flops_by_its_capacity():
    """The FLOPs saved are set by the static capacity (measured, not derived from α)."""
    x = torch.randn(4, 3, IMG, IMG)

    def flops(**kw) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            encoder(**kw)(x)
        return counter.get_total_flops()

    full = flops()
    assert flops(adaptive=True) == pytest.approx(full, rel=0.02)  # capacity 1: every token (+ the router)
    half = flops(adaptive=True, capacity=[0.5, 0.5, 0.5])
    assert half < 0.7 * full, f"capacity 0.5 computed {half} FLOPs vs {full} at capacity 1"


def router_that_varies(enc: HierarchicalEncoder) -> HierarchicalEncoder:
    """α differs between images: the router's last layer scaled up (issue 17's reproduction)."""
    torch.manual_seed(1)
    for stage in enc.stages:
        torch.nn.init.normal_(stage.alpha[0].weight, std=3.0)
        torch.nn.init.normal_(stage.alpha[-1].weight, std=3.0)
        torch.nn.init.constant_(stage.alpha[-1].bias, 0.0)
    return enc


@pytest.mark.parametrize("capacity", [[1.0, 1.0, 1.0], [0.75, 0.5, 0.5]])
def test_adaptive_features_of_an_image_do_not_depend_on_its_batch_mates(capacity):
    enc = router_that_varies(encoder(adaptive=True, capacity=capacity, spatial_bias=True))
    x = torch.randn(8, 3, IMG, IMG) + torch.linspace(-2, 2, 8)[:, None, None, None]  # images of different brightness
    with torch.no_grad():
        batch = enc(x)
        alphas = batch[-1].alpha
        assert alphas.max() - alphas.min() > 0.2, "the router must give the images different α"
        for i in (0, 5):
            alone = enc(x[i : i + 1])
            for lb, la in zip(batch, alone):
                torch.testing.assert_close(lb.features[i : i + 1], la.features, atol=1e-5, rtol=1e-5)
        # and with a context (masked) view
        units = torch.stack([torch.randperm(enc.num_units)[:3] for _ in range(8)])
        ctx = enc(x, units)[-1].features
        torch.testing.assert_close(ctx[3:4], enc(x[3:4], units[3:4])[-1].features, atol=1e-5, rtol=1e-5)


def test_an_image_computes_only_its_own_fraction_of_tokens():
    """Below the capacity, α decides: tokens past the image's own ⌈α·N⌉ pass through unchanged."""
    from jin.layers import AdaptiveStage

    torch.manual_seed(0)
    stage = AdaptiveStage(16, 1, 2, 4.0, [0.0], None, capacity=1.0).eval()
    stage.init_router()
    torch.nn.init.zeros_(stage.alpha[-1].weight)
    torch.nn.init.constant_(stage.alpha[-1].bias, math.log(0.25 / 0.75))  # α = 0.25 for every image
    x, coords = torch.randn(2, 8, 16), torch.rand(2, 8, 3)
    with torch.no_grad():
        out, alpha = stage(x, coords)
    changed = (out - x).abs().sum(-1) > 0
    torch.testing.assert_close(alpha, torch.full((2,), 0.25))
    assert changed.sum(1).tolist() == [2, 2]  # ⌈0.25 · 8⌉ tokens each


def test_adaptive_router_receives_task_gradients():
    enc = encoder(adaptive=True).train()
    out = enc(torch.randn(2, 3, IMG, IMG))
    sum(lv.features.square().mean() for lv in out).backward()
    assert all(stage.score.weight.grad.abs().sum() > 0 for stage in enc.stages)


def test_zoom_tokens_carry_true_coordinates_and_follow_the_roi():
    enc = encoder(zoom_factors=[0.5, 0.25], zoom_tokens=2)
    x = torch.randn(2, 3, IMG, IMG)
    level0 = torch.randn(2, 4, 16, 16)
    z = enc.zoom(x, level0, None, enc.patch_embed)
    assert z.x.shape == (2, 8, 16) and z.coords.shape == (2, 8, 3)
    assert torch.allclose(z.coords[0, :4, 2], torch.tensor(-2.0))  # log2(0.5 / 2)
    assert torch.allclose(z.coords[0, 4:, 2], torch.tensor(-3.0))  # log2(0.25 / 2)
    centre = enc.zoom.roi_centre(level0)
    spread = z.coords[:, 4:, :2].mean(1)
    torch.testing.assert_close(spread, centre.clamp(0.125, 0.875))
    # the ROI is learned: its parameters receive gradients through the crops
    enc.train()
    enc(x)[-1].features.sum().backward()
    assert enc.zoom.roi[0].weight.grad.abs().sum() > 0


def test_bad_geometry_fails_clearly():
    with pytest.raises(ValueError, match="divisible"):
        HierarchicalEncoder(img_size=36, patch_size=4, dims=[8, 8, 8], depths=[1, 1, 1], num_heads=[1, 1, 1])


def test_spatial_bias_is_exact_on_token_grids():
    """The gathered table equals the MLP applied to each pair's log-spaced offset."""
    torch.manual_seed(0)
    bias = SpatialBias(num_heads=3, hidden=8, grid=8)
    enc = encoder()
    coords = torch.cat([enc.coords(l)[0].reshape(-1, 3) for l in range(3)])[None]  # all levels at once
    delta = coords[:, :, None] - coords[:, None]
    pos = delta[..., :2] * 8
    direct = bias.mlp(torch.cat([torch.sign(pos) * torch.log2(1 + pos.abs()), delta[..., 2:]], -1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(bias(coords), direct, rtol=1e-5, atol=1e-5)


def test_mask_unit_attention_keeps_units_independent():
    enc = encoder(global_from=2, spatial_bias=True)
    x = torch.randn(1, 3, IMG, IMG)
    y = x.clone()
    y[:, :, IMG // 2 :, : IMG // 2] = torch.randn(1, 3, IMG // 2, IMG // 2)  # unit 2 only
    with torch.no_grad():
        a, b = enc(x), enc(y)
    for level in (0, 1):  # local levels: the other units are untouched
        keep = [0, 1, 3]
        torch.testing.assert_close(a[level].features[:, keep], b[level].features[:, keep])
    assert not torch.allclose(a[2].features[:, 0], b[2].features[:, 0])  # global level mixes units


class TaggedSlices(torch.nn.Module):
    """A stem whose level-0 token at slice ``s``, cell ``(x, y)`` is ``(x, y, s, 0)``: ``[B, S, G, G, 4]``."""

    def __init__(self, grid: int, slices: int):
        super().__init__()
        self.grid, self.slices = grid, slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = grid_coords(self.grid)[..., :2].expand(self.slices, -1, -1, -1)  # [S, G, G, 2]
        index = torch.arange(self.slices, dtype=torch.float32)[:, None, None, None].expand(-1, self.grid, self.grid, 1)
        tags = torch.cat([cells, index, torch.zeros_like(index)], -1)
        return tags.expand(x.shape[0], -1, -1, -1, -1)


@pytest.mark.parametrize("levels, slices", [(2, 2), (3, 2), (3, 4), (4, 4)])
def test_slices_reach_every_level_in_the_order_its_coordinates_say(levels, slices):
    """With blocks, norms and embeddings that change nothing and merges that only max-pool, each token of every level
    must read the cells and slices its coordinates and slice position say: its (x, y) tag is the largest child
    centre, half of ``2^l − 1`` fine cells right of and below its own centre, and its slice tag the last of the
    ``2^l`` slices it merged — for the context units a mask keeps, in the order the encoder returns them."""
    grid = 2**levels
    enc = HierarchicalEncoder(grid, 1, [4] * levels, [0] * levels, [1] * levels, stem=TaggedSlices(grid, slices),
                              slices=slices)
    enc.pos_embed.zero_()
    enc.slice_embed.data.zero_()
    enc.norms = torch.nn.ModuleList(torch.nn.Identity() for _ in range(levels))
    for merge in enc.merges:
        merge.proj.weight.data.copy_(torch.eye(4))
        merge.proj.bias.data.zero_()
    units = torch.tensor([[0, 3], [2, 1]])
    for level, out in enumerate(enc(torch.zeros(2), units)):
        features, coords = out.features, out.coords
        assert features.shape[2] == enc.tokens_per_unit(level)
        shift = (2**level - 1) / (2 * grid)
        torch.testing.assert_close(features[..., :2] - coords[..., :2], torch.full_like(coords[..., :2], shift))
        per_slice = features.shape[2] // enc.slices[level]
        slice_of = torch.arange(features.shape[2]) // per_slice
        last = ((slice_of + 1) * 2**level).clamp(max=slices) - 1
        assert torch.equal(features[..., 2], last.float().expand(2, 2, -1))
