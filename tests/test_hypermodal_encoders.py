"""Modality encoders: token shapes and coordinates, the growable modality table, block masks."""
from __future__ import annotations

import pytest
import torch

from jin.cross_scale import CrossScalePredictors, children
from jin.encoder import HierarchicalEncoder
from jin.encoders import (
    AudioEncoder, ClipStem, HierarchicalModalityEncoder, ImageEncoder, PillarStem, PointEncoder, SpectrogramStem,
    TextEncoder, VideoEncoder, farthest_point_order, farthest_point_sample, gather_tokens, pillar_occupancy,
)
from jin.layers.stage import AdaptiveStage
from jin.hypermodal import HypermodalEncoder
from prob_jepa.masks import coordinate_block_masks

D, B = 24, 3


def encoders() -> dict:
    torch.manual_seed(0)
    return {
        "image": ImageEncoder(16, 4, D, num_heads=2),
        "audio": AudioEncoder(8, 16, (4, 4), D, num_heads=2),
        "text": TextEncoder(50, 8, D, num_heads=2),
        "video": VideoEncoder(4, 16, (2, 8), D, num_heads=2),
        "points": PointEncoder(8, 6, D, num_heads=2),
    }


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(B, 3, 16, 16, generator=g),
        "audio": torch.randn(B, 8, 16, generator=g),
        "text": torch.randint(0, 50, (B, 8), generator=g),
        "video": torch.randn(B, 4, 3, 16, 16, generator=g),
        "points": torch.rand(B, 64, 3, generator=g),
    }


def test_each_encoder_yields_tokens_with_their_coordinates():
    enc, x = encoders(), inputs()
    expected_tokens = {"image": 16, "audio": 8, "text": 8, "video": 8, "points": 8}
    out = {m: enc[m](x[m]) for m in enc}
    for m, tokens in out.items():
        assert tokens.features.shape == (B, expected_tokens[m], D) == (B, enc[m].num_tokens, D), m
        assert tokens.coords.shape == (B, expected_tokens[m], 3), m
        assert torch.isfinite(tokens.features).all(), m
    image = out["image"].coords[0]  # (x, y, scale): a 4×4 grid of patch centres, row-major
    assert torch.allclose(image[:4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(image[::4, 1], torch.tensor([0.125, 0.375, 0.625, 0.875])) and (image[:, 2] == -2).all()
    audio = out["audio"].coords[0]  # (time, frequency, 0): 2 mel rows × 4 time columns
    assert torch.allclose(audio[:4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875])) and audio[:4, 1].eq(0.25).all()
    assert audio[4:, 1].eq(0.75).all()
    text = out["text"].coords[0]
    assert torch.allclose(text[:, 0], (torch.arange(8) + 0.5) / 8) and text[:, 1:].eq(0).all()
    video = out["video"].coords[0]  # (x, y, t): two time steps of a 2×2 grid of tubelets
    assert video[:4, 2].eq(0.25).all() and video[4:, 2].eq(0.75).all()
    assert torch.equal(video[:4, :2], video[4:, :2])
    points, centres = x["points"], out["points"].coords  # patch centres are points of the cloud
    assert ((centres[:, :, None] - points[:, None]).abs().sum(-1).amin(-1) == 0).all()


def test_patches_see_their_own_region():
    enc, x = encoders(), inputs()
    image = enc["image"]
    x2 = x["image"].clone()
    x2[:, :, :4, :4] += 1.0  # only the first patch's pixels
    grid = image.token_coords(x2)
    changed = (image.embed(x2, grid) - image.embed(x["image"], grid)).abs().amax(-1) > 0
    assert changed[:, 0].all() and not changed[:, 1:].any()
    audio = enc["audio"]
    a2 = x["audio"].clone()
    a2[:, 4:, 12:] += 1.0  # the highest mel bands of the last frames
    grid = audio.token_coords(a2)
    changed = (audio.embed(a2, grid) - audio.embed(x["audio"], grid)).abs().amax(-1) > 0
    assert changed[:, 7].all() and not changed[:, :7].any()


def test_keep_selects_tokens_and_causal_text_ignores_later_tokens():
    enc, x = encoders(), inputs()
    keep = torch.tensor([[0, 2, 5]] * B)
    full = enc["image"].token_coords(x["image"])
    assert torch.equal(enc["image"](x["image"], keep).coords, full[:, [0, 2, 5]])
    torch.manual_seed(0)
    causal = TextEncoder(50, 8, D, num_heads=2, causal=True).eval()
    later = x["text"].clone()
    later[:, 5:] = (later[:, 5:] + 1) % 50
    a, b = causal(x["text"]).features, causal(later).features
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])
    bidirectional = enc["text"].eval()
    assert not torch.allclose(bidirectional(x["text"]).features[:, :5], bidirectional(later).features[:, :5])


def test_farthest_point_sampling_spreads_the_centres():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(4, 512, 3, generator=g)
    idx = farthest_point_sample(points, 16)
    assert idx.shape == (4, 16) and all(len(set(row.tolist())) == 16 for row in idx)
    centres = points.gather(1, idx[..., None].expand(-1, -1, 3))
    spread = lambda c: (torch.cdist(c, c) + 9 * torch.eye(16)).amin((1, 2))  # noqa: E731
    random = points[:, :16]
    assert (spread(centres) > spread(random)).all()


def test_a_cloud_is_ordered_once_and_the_encoder_reads_its_centres_from_the_order():
    g = torch.Generator().manual_seed(1)
    raw = torch.rand(3, 64, 3, generator=g)
    ordered = farthest_point_order(raw)
    gather = lambda x, i: x.gather(1, i[..., None].expand(-1, -1, 3))  # noqa: E731
    for k in (1, 8, 20, 64):  # every prefix is the k farthest-point samples of the raw cloud
        assert torch.equal(ordered[:, :k], gather(raw, farthest_point_sample(raw, k)))
    assert torch.equal(farthest_point_order(ordered), ordered)
    encoder = PointEncoder(8, 6, D, num_heads=2).eval()
    tokens = encoder(ordered)
    assert torch.equal(tokens.coords, gather(raw, farthest_point_sample(raw, 8)))
    rest = 8 + torch.randperm(56, generator=g)  # the points after the centres in any order: the same patches
    shuffled = torch.cat([ordered[:, :8], ordered[:, rest]], 1)
    torch.testing.assert_close(encoder(shuffled).features, tokens.features, rtol=0, atol=1e-6)
    doubled = raw.clone()
    doubled[:, 5] = doubled[:, 3]  # a duplicate point: once the rest are all at distance 0, none is picked twice
    assert (farthest_point_order(doubled).sort(1).values == doubled.sort(1).values).all()
    assert all(len(set(row.tolist())) == 64 for row in farthest_point_sample(doubled, 64))


def test_encoder_input_errors_are_clear():
    with pytest.raises(ValueError, match="must divide"):
        AudioEncoder(10, 16, (4, 4), D)
    with pytest.raises(ValueError, match="takes 8"):
        TextEncoder(50, 8, D)(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="at least"):
        PointEncoder(8, 6, D)(torch.rand(2, 5, 3))


def test_add_modality_grows_the_table_and_leaves_existing_outputs_bit_for_bit():
    enc, x = encoders(), inputs()
    model = HypermodalEncoder({"image": enc["image"], "text": enc["text"]}, D, 2, 2).eval()
    before = {m: model(m, x[m]).features for m in ("image", "text")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = model.add_modality("audio", enc["audio"])
    assert model.modality_embed.names == ["image", "text", "audio"]
    assert {id(p) for p in new} == {id(model.modality_embed.rows["audio"]), *map(id, enc["audio"].parameters())}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    for m in ("image", "text"):
        assert torch.equal(model(m, x[m]).features, before[m]), m
    assert model("audio", x["audio"]).features.shape == (B, 8, D)
    with pytest.raises(ValueError, match="already exists"):
        model.add_modality("audio", enc["audio"])
    with pytest.raises(KeyError, match="modalities: image, text, audio"):
        model("smell", x["audio"])
    with pytest.raises(ValueError, match="width"):
        model.add_modality("video", VideoEncoder(4, 16, (2, 8), 12, num_heads=2))


def test_block_masks_are_disjoint_fixed_size_and_follow_the_modality_geometry():
    enc, x = encoders(), inputs()
    g = torch.Generator().manual_seed(0)
    for m, e in enc.items():
        coords = e.token_coords(x[m])
        n = coords.shape[1]
        mask = coordinate_block_masks(coords, e.mask_weights, 2, 2, g)
        assert mask.context.shape == (B, n - 4) and mask.targets.shape == (B, 2, 2)
        for b in range(B):
            assert not set(mask.context[b].tolist()) & set(mask.targets[b].flatten().tolist()), m
    text = torch.linspace(0, 1, 32)[None, :, None].expand(64, -1, 3) * torch.tensor([1.0, 0, 0])
    spans = coordinate_block_masks(text, (1, 0, 0), 2, 5, g).targets.sort(-1).values
    assert (spans.diff(dim=-1) == 1).all()  # a text block is a contiguous span
    video = VideoEncoder(4, 32, (1, 8), D, num_heads=2).token_coords(torch.zeros(64, 4, 3, 32, 32))
    tubes = coordinate_block_masks(video, (1, 1, 0), 1, 8, g).targets[:, 0]  # 4 frames × 2 positions
    xy = video[0, :, :2][tubes]  # [64, 8, 2]
    assert all(len({tuple(p) for p in row.tolist()}) == 2 for row in xy)  # tubes through every frame
    again = coordinate_block_masks(video, (1, 1, 0), 1, 8, torch.Generator().manual_seed(0))
    first = coordinate_block_masks(video, (1, 1, 0), 1, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again.targets, first.targets) and torch.equal(again.context, first.context)
    with pytest.raises(ValueError, match="no context"):
        coordinate_block_masks(video, (1, 1, 0), 4, 16, g)


def test_block_masks_with_content_hide_the_units_that_hold_it():
    """With ``content``, each target block is centred on a unit with content and holds the units with content nearest
    it; empty units join a block only when fewer than its size hold content."""
    side = torch.arange(8.0) / 8
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    coords = torch.stack([xx.flatten(), yy.flatten(), torch.zeros(64)], -1).expand(32, -1, -1)
    content = torch.zeros(32, 64)
    content[:, [9, 10, 17, 18, 19, 26, 27, 45, 46, 53, 54, 60]] = torch.rand(32, 12) + 0.1  # two blobs of content
    content[0] = 0.0
    content[0, [5, 63]] = 1.0  # a cloud that fills two units only
    g = torch.Generator().manual_seed(0)
    mask = coordinate_block_masks(coords, (1, 1, 0), 2, 4, g, content)
    held = content.gather(1, mask.targets.flatten(1)) > 0
    assert held[1:].all() and held[0].sum() == 2 * 2  # each block of cloud 0 holds both units with content
    for b in range(32):
        assert not set(mask.context[b].tolist()) & set(mask.targets[b].flatten().tolist())
    # a block stays compact: within one blob (the blobs are 3 or more units apart)
    blob = torch.tensor([0 if i in (9, 10, 17, 18, 19, 26, 27) else 1 for i in range(64)])
    assert (blob[mask.targets[1:]].amin(-1) == blob[mask.targets[1:]].amax(-1)).all()
    with pytest.raises(ValueError, match=r"content of shape \[32, 16\] for 32 inputs of 64 tokens"):
        coordinate_block_masks(coords, (1, 1, 0), 2, 4, g, content[:, :16])


def test_a_point_hierarchy_reports_which_of_its_units_hold_points():
    """``unit_content`` of the pillar hierarchy: the share of each mask unit's pillars that hold a point (2×2 units of
    2×2 pillars here); the image's hierarchy has no empty units (``None``)."""
    from jin.encoders import pillar_occupancy

    backbone = HierarchicalEncoder(4, 1, [12, 24], [1, 1], [2, 2], stem=PillarStem(4, 12))
    enc = HierarchicalModalityEncoder(backbone, D, cell_content=lambda x: pillar_occupancy(x, 4))
    cloud = torch.tensor([[[0.1, 0.1, 0.5], [0.3, 0.1, 0.5], [0.9, 0.6, 0.2]],
                          [[0.6, 0.9, 0.5], [0.6, 0.9, 0.1], [0.6, 0.9, 0.9]]])
    # units row-major: (x < ½, y < ½), (x ≥ ½, y < ½), (x < ½, y ≥ ½), (x ≥ ½, y ≥ ½)
    assert enc.unit_content(cloud).tolist() == [[0.5, 0.0, 0.0, 0.25], [0.0, 0.0, 0.0, 0.25]]
    assert hierarchical("audio").unit_content(inputs()["audio"]) is None


def test_video_temporal_levels_cover_the_clip_at_each_resolution():
    torch.manual_seed(0)
    video = VideoEncoder(4, 16, (1, 8), D, num_heads=2, temporal_levels=3)  # tokens of 1, 2 and 4 frames
    clip = torch.randn(B, 4, 3, 16, 16)
    tokens = video(clip)
    assert tokens.features.shape == (B, (4 + 2 + 1) * 4, D) == (B, video.num_tokens, D)
    t = tokens.coords[0, :, 2]
    assert torch.equal(t[:16:4], torch.tensor([0.125, 0.375, 0.625, 0.875]))  # level 0: one frame each
    assert torch.equal(t[16:24:4], torch.tensor([0.25, 0.75])) and t[24:].eq(0.5).all()
    later = clip.clone()
    later[:, 3] += 1.0  # only the last frame changes: level 0 tokens of frames 0-2 do not see it
    grid = video.token_coords(clip)
    changed = (video.embed(later, grid) - video.embed(clip, grid)).abs().amax(-1)[0] > 0
    assert not changed[:12].any() and changed[12:16].all() and not changed[16:20].any() and changed[20:].all()
    mask = coordinate_block_masks(tokens.coords, video.mask_weights, 1, 7, torch.Generator().manual_seed(0))
    xy = tokens.coords[0, mask.targets[0, 0], :2]
    assert (xy == xy[0]).all()  # one place, through every frame and every level
    with pytest.raises(ValueError, match="temporal level"):
        VideoEncoder(4, 16, (2, 8), D, temporal_levels=3)


def hierarchical_image(levels=None) -> HierarchicalModalityEncoder:
    torch.manual_seed(0)  # 16 px, patch 2: an 8×8 level-0 grid, 4×4 mask units of 2×2 level-0 tokens
    return HierarchicalModalityEncoder(HierarchicalEncoder(16, 2, [12, 24], [1, 1], [2, 2], spatial_bias=True), D,
                                    levels=levels).eval()


def test_the_hierarchical_image_puts_the_chosen_levels_in_the_space_and_masks_whole_units():
    enc, x = hierarchical_image([0, 1]), inputs()["image"]
    assert (enc.num_units, enc.num_tokens) == (16, 16 * 5)
    full = enc(x)
    assert full.features.shape == (B, 80, D) and torch.equal(full.coords, enc.token_coords(x))
    assert full.coords[0, :64, 2].unique().numel() == 1 and full.coords[0, 64:, 2].unique().numel() == 1
    assert full.coords[0, 0, 2] < full.coords[0, 64, 2]  # the scale coordinate tells the levels apart
    units = torch.tensor([[0, 5, 15], [3, 6, 9], [1, 2, 14]])
    tokens = enc.unit_tokens(units)  # [B, 3 · 5]
    context = enc(x, units)
    assert torch.equal(context.coords, gather_tokens(full.coords, tokens))  # the kept units' tokens, in that order
    cell = (gather_tokens(full.coords, tokens)[..., :2] * 4).floor().long()  # the unit each token lies in
    unit_of = cell[..., 1] * 4 + cell[..., 0]
    assert torch.equal(unit_of, torch.cat([units.repeat_interleave(4, 1), units], 1))  # level 0's four, then level 1
    assert torch.equal(gather_tokens(full.coords, units + 64), enc.unit_coords(x).gather(
        1, units[..., None].expand(-1, -1, 3)))  # a unit's coarsest token sits at its centre


def test_the_hierarchical_image_defaults_to_its_coarsest_level_and_loads_checkpoints_from_before_levels():
    enc, x = hierarchical_image(), inputs()["image"]
    assert enc.levels == [1] and enc.num_tokens == enc.num_units == 16
    assert torch.equal(enc.unit_tokens(torch.tensor([[3, 1]])), torch.tensor([[3, 1]]))
    before = {k.replace("proj.0.", "proj.", 1): v for k, v in enc.state_dict().items()}  # its keys then
    assert "proj.weight" in before
    other = hierarchical_image()
    torch.nn.init.zeros_(other.proj[0].weight)
    other.load_state_dict(before)
    assert torch.equal(other(x).features, enc(x).features)
    frozen = [n for n, p in enc.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.norms.0.weight", "backbone.norms.0.bias"]  # no loss reads level 0's norm
    with pytest.raises(ValueError, match=r"levels \[2\]: distinct levels of the encoder's 2"):
        hierarchical_image([2])
    with pytest.raises(ValueError, match=r"levels \[1, 1\]"):
        hierarchical_image([1, 1])
    with pytest.raises(ValueError, match=r"levels \[0.9\]"):  # not rounded to a level
        hierarchical_image([0.9])


def test_level_positions_find_each_level_s_tokens_among_a_mask_s_target_tokens():
    """The loss weighs an image prediction's levels apart (model.level_weights): each level's positions among
    ``unit_tokens(targets).flatten(1)`` must hold exactly that level's tokens, every position once."""
    targets = torch.tensor([[[0, 5, 15], [3, 6, 9]], [[1, 2, 14], [4, 7, 8]]])  # [B, M, K]: 2 blocks of 3 units
    for levels, first in (([0, 1], {0: 0, 1: 64}), ([1, 0], {1: 0, 0: 16})):
        enc = hierarchical_image(levels)
        tokens = enc.unit_tokens(targets).flatten(1)  # [B, 2 · 3 · 5], indices among the 80 tokens
        parts = enc.level_positions(targets)
        assert sorted(torch.cat(list(parts.values())).tolist()) == list(range(30))
        for level, per_unit in ((0, 4), (1, 1)):
            span = range(first[level], first[level] + 16 * per_unit)  # where the encoder puts that level's tokens
            assert len(parts[level]) == 2 * 3 * per_unit
            assert all(int(t) in span for t in tokens[:, parts[level]].flatten())
    assert hierarchical_image().level_positions(targets) is None  # one level


def test_the_hierarchical_image_positions_resolve_its_finest_chosen_level():
    assert hierarchical_image().max_freq == 2 and hierarchical_image([0, 1]).max_freq == 4  # 4 units, 8 tokens a side


STEMS = {  # 8 mels × 16 frames is not square: a 4×4 grid of (2 mels × 4 frames) patches
    "audio": lambda: SpectrogramStem(8, 16, 4, 12),
    "video": lambda: ClipStem(4, 16, 2, 4, 12),
    "points": lambda: PillarStem(4, 12),
}


def hierarchical(name: str, levels=None) -> HierarchicalModalityEncoder:
    """Modality ``name`` through a 2-level JIN hierarchy over a 4×4 level-0 grid (2×2 mask units), as
    ``hypermodal.hierarchy`` builds it: spatial bias, adaptive computation, level 0 within units."""
    torch.manual_seed(0)
    backbone = HierarchicalEncoder(4, 1, [12, 24], [1, 1], [2, 2], spatial_bias=True, adaptive=True, global_from=1,
                                   stem=STEMS[name]())
    return HierarchicalModalityEncoder(backbone, D, levels=levels).eval()


@pytest.mark.parametrize("name", list(STEMS))
def test_every_modality_hierarchy_has_levels_whose_coordinates_carry_the_scale(name):
    """JIN §3.2.1: audio, video and points yield levels of tokens — 4 level-0 tokens per mask unit, 1 level-1 token,
    one octave apart in the scale coordinate — through the blocks the image's levels have."""
    enc, x = hierarchical(name, [0, 1]), inputs()[name]
    assert (enc.num_units, enc.num_tokens) == (4, 4 * 5)
    tokens = enc(x)
    assert tokens.features.shape == (B, 20, D) and [lv.features.shape[1:3] for lv in tokens.levels] == [(4, 4), (4, 1)]
    scale = tokens.coords[0, :, 2]
    assert (scale[:16] == -2).all() and (scale[16:] == -1).all()  # log2(token side / input side): 1/4, then 1/2
    assert torch.equal(tokens.coords[0, 16:], enc.unit_coords(x)[0])  # a unit's coarsest token at its centre
    level0 = tokens.coords[0, :16, :2].reshape(4, 4, 2)
    assert torch.allclose(level0.mean(1), tokens.coords[0, 16:, :2])  # its four children around it
    for stage in enc.backbone.stages:  # the spatial bias and adaptive computation, as the image's levels
        assert isinstance(stage, AdaptiveStage) and stage.spatial_bias is not None
    context = enc(x, torch.tensor([[0, 3]] * B))
    assert torch.equal(context.coords, gather_tokens(tokens.coords, enc.unit_tokens(torch.tensor([[0, 3]] * B))))


SLICED_STEMS = {  # level-0 grids of 2 slices: 1-frame tubelets joined in 2 time steps of 2 frames; half-height voxels
    "video with temporal levels": lambda: ClipStem(4, 16, 1, 4, 12, slices=2),
    "points in voxels": lambda: PillarStem(4, 12, slices=2),
}


def sliced(name: str = "video with temporal levels") -> HierarchicalModalityEncoder:
    """Modality ``name`` through a 2-level hierarchy whose level 0 has 2 slices, merged 2×2×2 into level 1."""
    torch.manual_seed(0)
    backbone = HierarchicalEncoder(4, 1, [12, 24], [1, 1], [2, 2], spatial_bias=True, adaptive=True, global_from=1,
                                   stem=SLICED_STEMS[name](), slices=2)
    return HierarchicalModalityEncoder(backbone, D).eval()


def test_video_has_temporal_levels_that_merge_time_steps_with_the_cells():
    """JIN §3.2.1, "3D CNN with temporal z-JEPA levels": level 0 holds each cell at two time steps (8 tokens a unit),
    level 1 one token per unit for the whole clip; a time step's tokens share their cell's (x, y, scale), and the
    merge and the cross-scale children group the same 2×2×2 blocks."""
    enc, clip = sliced(), inputs()["video"]
    backbone = enc.backbone
    assert backbone.slices == [2, 1] and [backbone.tokens_per_unit(lv) for lv in (0, 1)] == [8, 1]
    tokens = enc(clip)
    assert tokens.features.shape == (B, 4, D)  # the coarsest level, one token per unit, joins the shared space
    level0, level1 = tokens.levels
    assert level0.features.shape == (B, 4, 8, 12) and level1.features.shape == (B, 4, 1, 24)
    assert torch.equal(level0.coords[:, :, :4], level0.coords[:, :, 4:])  # the two time steps of the same cells
    assert (level0.coords[..., 2] == -2).all() and (level1.coords[..., 2] == -1).all()
    later = clip.clone()
    later[:, 3] += 1.0  # the last frame: the second time step of every cell
    stem = backbone.patch_embed
    changed = (stem(later) - stem(clip)).abs().amax((0, 2, 3, 4)) > 0
    assert changed.tolist() == [False, True]
    # the merge takes the max over each 2×2×2 block that children() groups (slice-major tokens inside a unit)
    merge = backbone.merges[0]
    fine = torch.randn(B, 4, 8, 12)
    grouped = children(merge.proj(fine), 2).view(B, 4, 1, 8, 24)
    torch.testing.assert_close(merge(fine), grouped.amax(3))
    cross = CrossScalePredictors([12, 24], slices=2)
    loss = cross([level0.features, level1.features])
    assert torch.isfinite(loss) and cross.up_sliced[0][0].in_features == 8 * 12
    with pytest.raises(ValueError, match=r"levels 0 and 1 merge 2×2×2 \(slices\); these predictors were built for 0"):
        CrossScalePredictors([12, 24])([level0.features, level1.features])
    with pytest.raises(ValueError, match=r"level\(s\) \[0\] have \[2\] slices .* \(from 1 up\)"):
        HierarchicalModalityEncoder(backbone, D, levels=[0, 1])
    for slices, stem in [(3, ClipStem(4, 16, 1, 4, 12, slices=2)), (4, ClipStem(4, 16, 1, 4, 12, slices=4)), (2, None)]:
        with pytest.raises(ValueError, match=rf"slices={slices} must be a power of 2 up to 2\^\(levels-1\) = 2"):
            HierarchicalEncoder(4, 1, [12, 24], [1, 1], [2, 2], stem=stem, slices=slices)
    with pytest.raises(ValueError, match="in 4 time step"):
        ClipStem(4, 16, 2, 4, 12, slices=4)
    unsliced = HierarchicalEncoder(4, 1, [12, 24], [1, 1], [2, 2], stem=ClipStem(4, 16, 1, 4, 12, slices=2))
    with pytest.raises(ValueError, match=r"the stem gave \[3, 2, 4, 4, 12\]; this encoder has slices=1"):
        unsliced(clip)


def test_points_in_voxels_put_each_point_in_the_slice_of_its_height():
    """JIN §3.2.1's "voxel hierarchy": with 2 slices each pillar is two voxels, the lower and upper half of the
    height; a point changes only its own voxel, an empty voxel is the learned empty token, and the coarsest level
    (one pillar per unit) is what joins the shared space."""
    torch.manual_seed(0)
    stem = PillarStem(4, 12, slices=2)
    cloud = torch.tensor([[[0.1, 0.1, 0.2], [0.6, 0.3, 0.7], [0.65, 0.35, 0.9]]])
    grid = stem(cloud)  # [1, 2, 4, 4, 12]
    occupied = (grid[0] != stem.norm(stem.empty)).any(-1)
    assert grid.shape == (1, 2, 4, 4, 12) and occupied.nonzero().tolist() == [[0, 0, 0], [1, 1, 2]]  # slice, y, x
    moved = cloud.clone()
    moved[0, 0, 2] = 0.8  # the first point rises into the upper half of its pillar
    assert ((stem(moved) - grid).abs().amax(-1)[0] > 0).nonzero().tolist() == [[0, 0, 0], [1, 0, 0]]
    assert torch.equal(stem(cloud[:, [2, 0, 1]]), grid)  # the order of the points does not matter
    enc, clouds = sliced("points in voxels"), inputs()["points"]
    tokens = enc(clouds)
    assert tokens.features.shape == (B, 4, D) and [lv.features.shape[2] for lv in tokens.levels] == [8, 1]
    voxels = (stem(clouds) != stem.norm(stem.empty)).any(-1)  # [B, 2, 4, 4] voxels that hold a point
    assert torch.equal(voxels.any(1).float(), pillar_occupancy(clouds, 4))  # a pillar holds one where a voxel does
    assert voxels.sum() > voxels.any(1).sum()  # and some hold points in both halves


def test_the_stems_put_each_input_at_its_coordinates():
    """A token's (x, y) is where its content is: audio (time, frequency), video (x, y) through every frame, points
    the pillar under them — so masks, the spatial bias and the cross-scale children see the input's geometry."""
    torch.manual_seed(0)
    changed = lambda a, b: (a - b).abs().amax(-1)[0] > 0  # noqa: E731  [G, G] cells that differ
    audio, spec = SpectrogramStem(16, 16, 4, 12), torch.randn(1, 16, 16)  # patches of 4 mels × 4 frames
    louder = spec.clone()
    louder[0, 9, 6] += 1.0  # mel 9 (row 2), frame 6 (column 1), inside the patch: the 3×3 conv stays in it
    assert changed(audio(louder), audio(spec)).nonzero().tolist() == [[2, 1]]
    video, clip = STEMS["video"](), torch.randn(1, 4, 3, 16, 16)
    later = clip.clone()
    later[0, 3, :, 5, 13] += 1.0  # the last frame, pixel row 5, column 13: cell (1, 3) of 4-px cells
    assert changed(video(later), video(clip)).nonzero().tolist() == [[1, 3]]
    points, cloud = STEMS["points"](), torch.tensor([[[0.1, 0.1, 0.5], [0.6, 0.3, 0.2], [0.65, 0.35, 0.9]]])
    grid = points(cloud)
    occupied = (grid[0] != points.norm(points.empty)).any(-1)
    assert occupied.nonzero().tolist() == [[0, 0], [1, 2]]  # rows y, columns x: (0.1, 0.1) and (0.6, 0.3), (0.65, 0.35)
    assert torch.equal(points(cloud[:, [2, 0, 1]]), grid)  # the order of the points does not matter
    moved = cloud.clone()
    moved[0, 0, 2] = 0.9  # a point's height changes only its pillar
    assert changed(points(moved), grid).nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="must divide the spectrogram"):
        SpectrogramStem(8, 16, 3, 12)
    with pytest.raises(ValueError, match="zoom crops images"):
        HierarchicalEncoder(4, 1, [12, 24], [1, 1], [2, 2], zoom_factors=[0.5], stem=PillarStem(4, 12))


@pytest.mark.parametrize("name", [*STEMS, *SLICED_STEMS])
def test_a_context_never_reads_the_input_of_a_hidden_unit(name):
    """Masks hide whole mask units; what a stem makes of the kept units must not depend on the hidden ones' input
    (the 3×3 convolution of the spectrogram stem read across patch edges before it was applied patch by patch)."""
    enc = sliced(name) if name in SLICED_STEMS else hierarchical(name)
    name = name.split()[0]  # the modality
    x = inputs()[name]
    edited = x.clone()
    if name == "audio":  # [B, 8, 16]: unit 3 = the bottom-right quarter, mels 4-7, frames 8-15
        edited[:, 4:, 8:] += torch.randn(B, 4, 8)
    elif name == "video":  # [B, 4, 3, 16, 16]: rows and columns 8-15 of every frame
        edited[..., 8:, 8:] += torch.randn(B, 4, 3, 8, 8)
    else:  # points in the quarter x, y ≥ 0.5 move within it: new heights
        inside = (x[..., 0] >= 0.5) & (x[..., 1] >= 0.5)
        edited[..., 2] = torch.where(inside, torch.rand(B, x.shape[1]), x[..., 2])
    keep = torch.tensor([[0, 1, 2]] * B)
    assert torch.equal(enc(edited, keep).features, enc(x, keep).features)
    assert not torch.equal(enc(edited).features, enc(x).features)  # the edit itself reaches the encoder


def test_pillars_hold_their_points_at_the_edges_and_make_clouds_differ_at_the_start():
    """A point on the far edge (x or y = 1) or a little outside [0, 1] belongs to the edge pillar of its own cloud;
    at initialization the stem's output is of unit scale and tells two clouds apart."""
    torch.manual_seed(0)
    stem = PillarStem(4, 12)
    edges = torch.tensor([[[1.0, 1.0, 0.5], [0.0, 1.05, 0.5], [-0.03, 0.3, 0.5]], [[0.6, 0.6, 0.5]] * 3])
    empty = stem.norm(stem.empty)
    occupied = [(grid != empty).any(-1).nonzero().tolist() for grid in stem(edges)]
    assert occupied == [[[1, 0], [3, 0], [3, 3]], [[2, 2]]]  # [row y, column x]; nothing spills into cloud 2
    clouds = inputs()["points"]
    out = stem(clouds)
    assert 0.5 < out.std() < 2 and (out[0] - out[1]).abs().mean() > 0.1
