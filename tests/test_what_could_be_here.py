"""'What could be here': samples are matched to the training tokens they are nearest, and the patches are counted."""
from __future__ import annotations

import pytest
import torch

from prob_jepa.data import BUILDERS, NORMALIZATION, display_images
from prob_jepa.data.shapes import Marker, Scene, normalize, render
from prob_jepa.eval.what_could_be_here import (
    centre_retrieval, marker_classes, marker_retrieval, nearest, token_bank, token_boxes,
)
from prob_jepa.heads.base import Head
from prob_jepa.model import build_model


class BankHead(Head):
    """Planted: every sample is one of two bank tokens, ``first`` with probability ``p``, else ``second``;
    the point prediction is ``first``."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor, p: float):
        super().__init__(first.shape[-1], 1)
        self.register_buffer("first", first)
        self.register_buffer("second", second)
        self.p = p

    def log_prob(self, target, cond):
        return torch.zeros(len(cond))

    def sample(self, cond, num_samples):
        pick = torch.rand(num_samples, len(cond), 1) < self.p
        return torch.where(pick, self.first, self.second)

    def mean(self, cond):
        return self.first.expand(len(cond), -1)


@pytest.fixture(scope="module")
def world(compose_module):
    """A tiny JIN (two levels, 8 × 8 mask units of 4 px) and a bank of 24 rendered shapes with known marker colours."""
    cfg = compose_module("model=jin_tiny", "data.image_size=32", "data.marker.size=8", "model.patch_size=2",
                         "model.dims=[16,32]", "model.depths=[1,1]", "model.num_heads=[1,2]",
                         "model.predictor.dim=24", "model.predictor.depth=1", "model.predictor.num_heads=2")
    torch.manual_seed(0)
    model = build_model(cfg).eval().level_jepa("image")
    marker = Marker.from_config(cfg.data.marker)
    images, _, choice, _ = render(24, 32, seed=3, marker=marker, scene=Scene.from_config(cfg.data.scene))
    bank = token_bank(model, normalize(images), batch_size=10, device=torch.device("cpu"))
    return cfg, model, marker, bank, choice


@pytest.fixture(scope="module")
def compose_module():
    from conftest import CONF
    from prob_jepa.config import compose_config

    return lambda *overrides: compose_config(CONF, overrides)


def test_token_boxes_tile_the_image_at_every_level(world):
    _, model, _, _, _ = world
    enc = model.context_encoder
    for level, side in ((0, 2), (1, 4)):  # 16 × 16 tokens of 2 px, 8 × 8 of 4 px
        boxes = token_boxes(enc.coords(level)[0].flatten(0, 1), 32)
        assert ((boxes[:, 2:] - boxes[:, :2]) == side).all()
        cover = torch.zeros(32, 32, dtype=torch.long)
        for x0, y0, x1, y1 in boxes.tolist():
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()
    unit = enc.coords(1)[0, 9, 0]  # the level-1 token of mask unit 9 = row 1, column 1
    assert token_boxes(unit, 32).tolist() == [4, 4, 8, 8]


def test_bank_holds_every_token_of_every_image_in_order(world):
    _, model, _, bank, _ = world
    assert bank.features.shape == (24 * 64, 32) and bank.image.tolist() == [i // 64 for i in range(24 * 64)]
    with torch.no_grad():
        direct = model.target_features(bank.images[5:6])[1].flatten(0, 2)
    torch.testing.assert_close(bank.features[5 * 64 : 6 * 64], direct)
    assert nearest(bank.features, bank.features[[7, 900]]).tolist() == [7, 900]


def test_marker_classes_are_the_rendered_colours_inside_the_marker(world):
    _, _, marker, bank, choice = world
    classes = marker_classes(bank, marker, "shapes").view(24, 64)
    inside = [0, 1, 8, 9]  # the 8-px marker at (0, 0) covers four 4-px tokens
    assert (classes[:, inside] == choice[:, None]).all()
    assert (classes[:, [u for u in range(64) if u not in inside]] == 2).all()
    assert 0 < choice.float().mean() < 1  # both colours occur, so the check can fail


def test_marker_retrieval_recovers_a_planted_mixture(world):
    cfg, model, marker, bank, choice = world
    classes = marker_classes(bank, marker, "shapes")
    red, blue = (bank.features[(classes == k).nonzero()[0, 0]] for k in (0, 1))
    torch.manual_seed(0)
    metrics, plot = marker_retrieval(model, BankHead(red, blue, 0.7), cfg.data, bank, num_pairs=8, num_samples=200,
                                     device=torch.device("cpu"), seed=1)
    assert metrics["samples"]["colour_0"] == pytest.approx(0.7, abs=0.03)
    assert metrics["samples"]["colour_1"] == pytest.approx(0.3, abs=0.03) and metrics["samples"]["elsewhere"] == 0
    assert metrics["mean"]["colour_0"] == 1.0 and metrics["distinct_patches"] == 2.0
    row = plot["rows"][0]
    assert row["classes"][0] == "colour_0" and set(row["classes"]) == {"colour_0", "colour_1"}
    assert torch.tensor(row["patches"][0]).shape == (4, 4, 3) and len(row["truths"]) == 2
    assert torch.tensor(row["image"])[:8, :8].eq(0.5).all()  # the hidden marker is greyed out


def test_point_head_retrieves_one_patch(world):
    cfg, model, marker, bank, _ = world
    token = bank.features[100]
    metrics, _ = marker_retrieval(model, BankHead(token, token, 1.0), cfg.data, bank, num_pairs=4, num_samples=16,
                                  device=torch.device("cpu"), seed=1)
    assert metrics["distinct_patches"] == 1.0 and metrics["samples"]["elsewhere"] == 1.0


def test_centre_retrieval_without_a_marker(world):
    _, model, _, bank, _ = world
    token = bank.features[64 + 27]  # image 1, token 27 = unit (3, 3): the first of the 2 × 2 centre units
    metrics, plot = centre_retrieval(model, BankHead(token, token, 1.0), bank.images[:3], bank, 4, "shapes")
    assert metrics == {"images": 3, "bank_tokens": 24 * 64, "distinct_patches": 1.0}
    row = plot["rows"][1]
    assert row["query_box"] == [12, 12, 16, 16] and row["patches"][0] == row["truths"][0]


def test_every_dataset_can_be_displayed():
    assert set(NORMALIZATION) == set(BUILDERS)
    pixels = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(display_images(normalize(pixels), "shapes"), pixels.movedim(1, -1) / 255)
    with pytest.raises(ValueError, match="valid: imagenet_1k"):
        display_images(normalize(pixels), "mnist")
