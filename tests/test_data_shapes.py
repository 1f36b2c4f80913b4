"""The embedded shapes world and its ambiguity pairs."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prob_jepa.data import GlobalBatchSampler, SeededDataset, build_datasets
from prob_jepa.config import ConfigError
from prob_jepa.data.shapes import AREA_SCALE, ARRANGEMENTS, CLASSES, EQUAL_AREA, EXTENT, PARTS, Marker, ShapesDataset
from prob_jepa.data.shapes import Scene, _part_masks, _shape_masks, ambiguity_pairs, render

MARKER = Marker(size=8, x=0, y=0, colors=((1.0, 0.1, 0.1), (0.1, 0.3, 1.0)), weights=(0.7, 0.3))
COLOURS = dict(hue=(0.0, 1.0), value=(0.55, 1.0), background=(0.15, 0.5))
SCENE = Scene(radius=(0.3, 0.38), distractors=0, noise=0.03, gradient=0.0, texture=(0.0, 0.3), texture_block=2, **COLOURS)
PLAIN = Scene(radius=(0.3, 0.38), distractors=0, noise=0.0, gradient=0.0, texture=(0.0, 0.0), texture_block=2, **COLOURS)


def scene_config(scene: Scene, **overrides) -> dict:
    """``scene`` as the ``data.scene`` config node that builds it, with ``overrides``."""
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in scene.__dict__.items()}, **overrides}


def test_rendering_is_seeded_and_labelled():
    a, la, *_ = render(64, 32, seed=3, marker=MARKER, scene=SCENE)
    b, lb, *_ = render(64, 32, seed=3, marker=MARKER, scene=SCENE)
    c = render(64, 32, seed=4, marker=MARKER, scene=SCENE).images
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert la.min() >= 0 and la.max() < len(CLASSES)


def test_every_class_covers_the_same_area_and_fits_its_margin():
    c = torch.linspace(-2, 2, 801)
    v, u = torch.meshgrid(c, c, indexing="ij")
    inside = _shape_masks(u[None] / AREA_SCALE[:, None, None], v[None] / AREA_SCALE[:, None, None])
    inside = inside[torch.arange(len(CLASSES)), torch.arange(len(CLASSES))]  # class k at its own scale
    areas = inside.float().mean((1, 2)) * 16
    assert torch.allclose(areas, torch.full_like(areas, EQUAL_AREA), rtol=0.02), areas
    reach = torch.maximum(u.abs(), v.abs())  # unrotated; the ±20° tilt may clip a corner by a pixel
    assert max(reach[m].max().item() for m in inside) <= EXTENT + 0.01


def test_classes_are_balanced_and_marker_colours_follow_their_weights():
    ds = ShapesDataset(4000, 32, seed=0, marker=MARKER, scene=SCENE)
    counts = torch.bincount(ds.labels, minlength=len(CLASSES)).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.2
    assert abs(ds.marker_choice.float().mean().item() - 0.3) < 0.03
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)


def test_ambiguity_pairs_differ_only_inside_the_marker():
    pairs = ambiguity_pairs(16, 32, seed=5, marker=MARKER, scene=SCENE)
    a, b = pairs.images
    differs = (a != b).any(dim=1).any(dim=0)  # [H, W]: pixels that differ in any pair
    assert differs[:8, :8].all() and not differs[8:].any() and not differs[:, 8:].any()
    assert pairs.weights == (0.7, 0.3)
    assert pairs.marker_units(8) == [0] and pairs.marker_units(4) == [0, 1, 8, 9]


def test_splits_are_disjoint_and_train_eval_is_train(compose, tiny_overrides):
    cfg = compose(*tiny_overrides).data
    train, val, probe = build_datasets(cfg, ("train", "val", "train_eval"))
    assert probe is train
    seen = {image.numpy().tobytes() for image in train.images}
    assert not any(image.numpy().tobytes() in seen for image in val.images), "a validation image is in the train split"


def test_batches_slice_one_global_order_across_ranks():
    one = list(GlobalBatchSampler(64, 16, seed=1))
    two = [list(GlobalBatchSampler(64, 16, rank=r, world_size=2, seed=1)) for r in (0, 1)]
    for step, batch in enumerate(one):
        assert batch == two[0][step] + two[1][step]
    resumed = GlobalBatchSampler(64, 16, seed=1)
    resumed.start_at(2)
    assert list(resumed) == one[2:]


def test_seeded_dataset_does_not_touch_the_training_rng():
    state = torch.get_rng_state()
    ds = SeededDataset(ShapesDataset(8, 32, seed=0, marker=MARKER, scene=SCENE))
    ds[(3, 123)]
    assert torch.equal(state, torch.get_rng_state())


def test_scene_options_control_the_clutter():
    images = render(16, 32, seed=2, marker=MARKER, scene=PLAIN).images
    colours = [torch.unique(im.flatten(1), dim=1).shape[1] for im in images]
    assert max(colours) <= 3  # background, shape, marker — nothing else
    cluttered = replace(PLAIN, distractors=2, gradient=0.25)
    images = render(16, 32, seed=2, marker=MARKER, scene=cluttered).images
    assert min(torch.unique(im.flatten(1), dim=1).shape[1] for im in images) > 3


def test_scene_rejects_a_shape_that_cannot_fit():
    with pytest.raises(ValueError, match="data.scene.radius"):
        Scene.from_config({"radius": [0.3, 0.45], "distractors": 0, "noise": 0.0, "gradient": 0.0,
                           "texture": [0.0, 0.0], "texture_block": 2, **COLOURS, "layout": "single"})


def test_colour_ranges_bound_the_shape_and_background_colours():
    narrow = replace(PLAIN, hue=(2 / 3, 2 / 3), value=(0.8, 0.8), background=(0.25, 0.35))
    images = render(32, 32, seed=7, marker=MARKER, scene=narrow).images
    pixels = images[:, :, 8:, 8:].flatten(2).float() / 255  # outside the marker
    corner = pixels[:, :, -1]  # the bottom-right pixel: background (every shape keeps a margin)
    assert ((corner >= 0.25 - 1 / 255) & (corner <= 0.35 + 1 / 255)).all()
    blue = torch.tensor([0.0, 0.0, 0.8])[:, None]  # hue 2/3 at brightness 0.8
    assert ((pixels - blue).abs().amax(1) <= 1 / 255).any(1).all()  # every image shows its shape in that colour
    assert not ((images.float() / 255 - render(32, 32, seed=7, marker=MARKER, scene=PLAIN).images.float() / 255)
                .abs().amax() < 1e-3)  # the ranges change the drawing
    with pytest.raises(ValueError, match="data.scene.hue"):
        Scene.from_config({"radius": [0.3, 0.38], "distractors": 0, "noise": 0.0, "gradient": 0.0,
                           "texture": [0.0, 0.0], "texture_block": 2, **COLOURS, "hue": [0.5, 1.2], "layout": "single"})


def test_texture_is_blocky_per_image_noise_and_the_marker_stays_solid():
    block = 4
    textured = replace(PLAIN, texture=(0.1, 0.2), texture_block=block)
    images = render(32, 32, seed=6, marker=MARKER, scene=textured).images
    untextured = replace(PLAIN, texture_block=block)
    plain = render(32, 32, seed=6, marker=MARKER, scene=untextured).images  # the same draws, texture scaled by 0
    diff = images.float() / 255 - plain.float() / 255  # the texture (where nothing was clipped)
    assert torch.equal(images[:, :, :8, :8], plain[:, :, :8, :8])  # the marker carries no texture

    def block_range(x: torch.Tensor) -> torch.Tensor:  # max − min within each block, [n, 3, rows, cols]
        blocks = x[:, :, 8:, 8:].unflatten(2, (-1, block)).unflatten(4, (-1, block))
        return blocks.amax((3, 5)) - blocks.amin((3, 5))

    uniform = (block_range(plain.float()).amax(1, keepdim=True) == 0).expand(-1, 3, -1, -1)  # no shape edge inside
    assert (block_range(diff)[uniform] <= 1 / 255 + 1e-6).all()  # the texture is constant within a block
    spread = diff[:, :, 8:, 8:].flatten(1).std(1)  # one std per image, drawn from the range (minus clipping)
    assert 0.06 < spread.min() and spread.max() < 0.21 and spread.max() - spread.min() > 0.03


def test_default_scene_matches_the_config(compose):
    cfg = compose().data
    default = Scene(radius=(0.3, 0.38), distractors=0, noise=0.03, gradient=0.0, texture=(0.3, 0.45), texture_block=8,
                    hue=(0.55, 0.75), value=(0.8, 1.0), background=(0.2, 0.35))
    assert Scene.from_config(cfg.scene) == default


def test_the_default_world_draws_what_it_drew_before_occluders_and_decoys(compose):
    """The README's measurements were made on these scenes: an option that is off draws nothing from the scene's
    generator (the marker colours, drawn after the pixels, would move first). Pinned at commit 3bbc64f."""
    cfg = compose().data
    r = render(40, 64, 0, Marker.from_config(cfg.marker), Scene.from_config(cfg.scene))
    assert "".join(map(str, r.labels.tolist())) == "4750333713524760042167760151501430356770"
    assert "".join(map(str, r.marker_choice.tolist())) == "1010000001000011010001000100111110000110"


def test_the_rendering_reports_each_scene_s_factors():
    f = render(64, 32, seed=8, marker=MARKER, scene=replace(PLAIN, texture=(0.1, 0.2))).factors
    ds = ShapesDataset(64, 32, seed=0, marker=MARKER, scene=PLAIN, chunk=24)  # factors follow the chunks
    assert all(len(v) == 64 for v in ds.factors.values()) and ds.factors.keys() == f.keys()
    assert torch.allclose(ds.factors["cx"][24:48], render(24, 32, 1, MARKER, PLAIN).factors["cx"])
    assert ((0.1 <= f["texture"]) & (f["texture"] <= 0.2)).all()
    plain = render(64, 32, seed=8, marker=MARKER, scene=PLAIN)
    corner = plain.images[:, :, -1, -1].float() / 255  # background there (every shape keeps a margin)
    assert torch.allclose(corner, plain.factors["background"], atol=0.5 / 255)
    grid = (torch.arange(32) + 0.5) / 32
    circles = (plain.labels == 0).nonzero().flatten()
    for i in circles:  # the centre of a circle is the centroid of its pixels in the shape's colour
        background = (plain.factors["background"][i] * 255).round()[:, None, None]
        inside = (plain.images[i].float() - background).abs().amax(0) > 1
        inside[:8, :8] = False  # the marker
        ys, xs = inside.nonzero(as_tuple=True)
        assert abs(grid[xs].mean() - plain.factors["cx"][i]) < 0.03 and abs(grid[ys].mean() - plain.factors["cy"][i]) < 0.03
    assert len(circles) > 3


def test_parts_classes_are_the_same_four_parts_in_different_cells():
    rows = ARRANGEMENTS.tolist()
    assert len(rows) == 8 and len(set(map(tuple, rows))) == 8 and all(sorted(r) == [0, 1, 2, 3] for r in rows)
    for cell in range(4):  # every part sits in every cell in exactly two classes
        assert torch.bincount(ARRANGEMENTS[:, cell], minlength=4).tolist() == [2, 2, 2, 2]
    c = torch.linspace(-1.5, 1.5, 601)  # object coordinates, units of the scene radius
    v, u = torch.meshgrid(c, c, indexing="ij")
    quadrants = [(u < 0) & (v < 0), (u >= 0) & (v < 0), (u < 0) & (v >= 0), (u >= 0) & (v >= 0)]
    circle_radius = 0.5 * AREA_SCALE[CLASSES.index("circle")]
    for label in range(8):
        inside = _part_masks(u[None], v[None], torch.tensor([label]))[0].any(0)
        assert (inside & (torch.maximum(u.abs(), v.abs()) > EXTENT + 0.01)).sum() == 0  # fits the extent
        for cell, quadrant in enumerate(quadrants):  # each cell holds one part of a quarter of the area
            assert abs((inside & quadrant).float().mean().item() * 9 - EQUAL_AREA / 4) < 0.01
            if PARTS[ARRANGEMENTS[label, cell]] == "circle":  # a disk centred on its cell
                cu, cv = (EXTENT / 2 * (1 if cell % 2 else -1), EXTENT / 2 * (1 if cell >= 2 else -1))
                disk = (u - cu) ** 2 + (v - cv) ** 2 <= circle_radius**2
                assert (disk != (inside & quadrant)).float().mean() < 0.002


def test_the_parts_layout_draws_the_same_scenes_with_other_classes():
    single = render(64, 32, seed=9, marker=MARKER, scene=PLAIN)
    parts = render(64, 32, seed=9, marker=MARKER, scene=replace(PLAIN, layout="parts"))
    assert torch.equal(single.labels, parts.labels) and torch.equal(single.marker_choice, parts.marker_choice)
    assert all(torch.equal(single.factors[k], parts.factors[k]) for k in single.factors)
    assert not torch.equal(single.images, parts.images)
    foreground = [(im.float() - (f * 255).round()[:, None, None]).abs().amax(0).gt(1)[8:, 8:].sum()
                  for im, f in zip(parts.images, parts.factors["background"])]
    assert min(foreground) > 0
    ds = ShapesDataset(8, 32, seed=0, marker=MARKER, scene=replace(PLAIN, layout="parts"))
    assert len(ds.classes) == 8 and ds.classes[0] == "cir/squ/tri/cro"
    with pytest.raises(ConfigError, match="data.scene.layout must be one of single, parts"):
        Scene.from_config(scene_config(PLAIN, layout="grid"))


def test_an_occluder_covers_a_square_of_random_blocks_over_the_object_and_nothing_else():
    """The occluder's draws come after every other draw of the scene's pixels: outside its square and the marker
    (whose colour is drawn after the pixels) the image is the one drawn without it, pixel for pixel — so the
    default world, without one, is the world drawn before the occluder existed."""
    occluded = replace(SCENE, occluder=(0.2, 0.5), texture_block=4)
    plain = render(48, 32, seed=9, marker=MARKER, scene=replace(SCENE, texture_block=4))
    r = render(48, 32, seed=9, marker=MARKER, scene=occluded)
    assert torch.equal(r.labels, plain.labels) and (plain.factors["occluder"] == 0).all()
    assert all(torch.equal(r.factors[k], plain.factors[k]) for k in r.factors if k != "occluder")
    side = r.factors["occluder"]
    assert ((0.2 <= side) & (side <= 0.5)).all() and side.std() > 0.05
    differs = (r.images != plain.images).any(1)  # [n, H, W]
    differs[:, :8, :8] = False  # the marker: drawn over everything, its colour from the next draw
    grid = (torch.arange(32) + 0.5) / 32
    for i in range(48):
        ys, xs = differs[i].nonzero(as_tuple=True)
        # every changed pixel lies in one square of the drawn side, centred within half a radius of the object
        assert grid[xs].max() - grid[xs].min() <= side[i] + 1e-6 and grid[ys].max() - grid[ys].min() <= side[i] + 1e-6
        centre = torch.stack([(grid[xs].max() + grid[xs].min()) / 2, (grid[ys].max() + grid[ys].min()) / 2])
        reach = side[i] / 2 + 0.5 * r.factors["radius"][i] / 2 + 1 / 32  # a clipped corner may shift the box
        assert (centre - torch.stack([r.factors["cx"][i], r.factors["cy"][i]])).abs().max() <= reach
        assert len(xs) >= 0.5 * (side[i] * 32 - 1) ** 2  # most of the square changed (a block may repeat a pixel)
    covered = r.images.float()[differs[:, None].expand(-1, 3, -1, -1)] / 255
    assert 0.2 < covered.std() and 0.35 < covered.mean() < 0.65  # random colours in [0, 1], not the scene's
    with pytest.raises(ConfigError, match=r"data\.scene\.occluder"):
        Scene.from_config(scene_config(SCENE, occluder=[0.5, 0.2]))


def test_a_decoy_is_an_object_of_another_class_over_some_scenes_and_nothing_else_moves():
    """``decoy``: the share of scenes with a second, smaller object; where there is none, the scene is the one
    drawn without decoys (pixel for pixel, outside the marker), and a decoy's pixels stay within its own extent."""
    base = replace(SCENE, texture=(0.0, 0.0), noise=0.0)
    plain = render(400, 32, seed=2, marker=MARKER, scene=base)
    r = render(400, 32, seed=2, marker=MARKER, scene=replace(base, decoy=0.5, decoy_radius=(0.15, 0.2)))
    has = r.factors["decoy"].bool()
    assert 0.42 < has.float().mean() < 0.58 and (plain.factors["decoy"] == 0).all()
    differs = (r.images != plain.images).any(1)
    differs[:, :8, :8] = False  # the marker, whose colour is drawn after the pixels
    assert not differs[~has].any()
    assert differs[has].flatten(1).any(1).float().mean() > 0.9  # a decoy shows (it may hide under the marker)
    for i in has.nonzero().flatten()[:40]:
        ys, xs = differs[i].nonzero(as_tuple=True)
        if len(xs):
            assert xs.max() - xs.min() <= 2 * EXTENT * 0.2 * 32 + 2 and ys.max() - ys.min() <= 2 * EXTENT * 0.2 * 32 + 2
    assert Scene.from_config(scene_config(SCENE, decoy=0.25, decoy_radius=[0.1, 0.2])) == replace(
        SCENE, decoy=0.25, decoy_radius=(0.1, 0.2))
    with pytest.raises(ConfigError, match=r"data\.scene\.decoy"):
        Scene.from_config(scene_config(SCENE, decoy=1.5))


def test_decoys_sets_how_many_decoys_a_scene_with_decoys_holds():
    """``decoys``: a scene with decoys holds 1 .. ``decoys`` of them, each count equally likely; the scenes without
    are the scenes drawn without decoys, and more decoys cover more of the scene."""
    base = replace(SCENE, texture=(0.0, 0.0), noise=0.0)
    plain = render(800, 32, seed=5, marker=MARKER, scene=base)
    r = render(800, 32, seed=5, marker=MARKER, scene=replace(base, decoy=0.75, decoys=3))
    count = r.factors["decoy"].long()
    assert torch.equal(count.unique(), torch.arange(4))
    shares = torch.bincount(count, minlength=4) / len(count)
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.05), shares
    differs = (r.images != plain.images).any(1)
    differs[:, :8, :8] = False  # the marker, whose colour is drawn after the pixels
    assert not differs[count == 0].any()
    covered = torch.stack([differs[count == k].flatten(1).float().mean() for k in (1, 2, 3)])
    assert covered[0] < covered[1] < covered[2], covered
    assert Scene.from_config(scene_config(SCENE, decoy=0.5, decoys=2)).decoys == 2
    for bad in (0, 1.5, "2", "abc", None, True):
        with pytest.raises(ConfigError, match=r"data\.scene\.decoys"):
            Scene.from_config(scene_config(SCENE, decoy=0.5, decoys=bad))
