"""Uncertainty maps: every mask unit predicted from the rest; a head uncertain in a known unit peaks there."""
from __future__ import annotations

import pytest
import torch

from prob_jepa.eval.uncertainty_maps import (
    UnitMaps, count_modes, covering_blocks, region_means, unit_uncertainty,
)
from prob_jepa.heads.base import Head
from prob_jepa.model import build_model


class DistanceHead(Head):
    """Planted: ``log p(y | c) = −min_r ‖y − y_r‖²`` over the plain image's targets ``y_r`` of every unit, so the
    head is certain wherever a target is one of the plain image's and uncertain elsewhere, whatever order the
    rows come in; samples are unit noise."""

    def __init__(self, reference: torch.Tensor):
        super().__init__(reference.shape[-1], 1)
        self.register_buffer("reference", reference)

    def log_prob(self, target, cond):
        return -torch.cdist(target, self.reference).amin(1).square()

    def sample(self, cond, num_samples):
        return torch.randn(num_samples, len(cond), self.dim)


def test_map_of_a_head_uncertain_in_a_known_unit_peaks_there(compose, tiny_overrides):
    cfg = compose(*tiny_overrides, "model.spatial_bias=false")
    torch.manual_seed(0)
    model = build_model(cfg).eval().level_jepa("image")
    plain = torch.full((1, 3, 32, 32), 0.5)
    with torch.no_grad():
        reference = model.target_features(plain)[-1].flatten(0, 2)  # [units, D]
    image = plain.clone()
    image[..., 12:16, 20:24] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # one 4-px unit: row 3, column 5
    for block in (1, 2, 3):  # alone, in the default 2 × 2 blocks, and in 3 × 3 blocks cut at the grid's edge
        maps = unit_uncertainty(model, DistanceHead(reference), image, num_samples=8, block=block)
        assert maps.nll.shape == maps.spread.shape == maps.modes.shape == (1, 8, 8)
        assert divmod(int(maps.nll[0].argmax()), 8) == (3, 5), block


def test_covering_blocks_tile_the_grid_once():
    for grid, block in ((8, 1), (8, 2), (8, 3), (3, 2)):
        units = sorted(u for b in covering_blocks(grid, block) for u in b)
        assert units == list(range(grid * grid))
    assert covering_blocks(4, 2)[1] == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="eval.map_block=4"):
        covering_blocks(4, 4)


def test_count_modes_on_one_and_two_clusters():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(200, 3, 5, generator=g)
    two = torch.randn(200, 3, 5, generator=g) * 0.2
    two[:100, :, 0] += 3.0
    assert count_modes(one).tolist() == [1.0, 1.0, 1.0]
    assert count_modes(two).tolist() == [2.0, 2.0, 2.0]


def test_region_means_inside_mirrored_and_outside():
    nll = torch.arange(16.0).view(1, 4, 4)  # unit (r, c) holds 4r + c
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, :2] = True  # units 0, 1: mirrored to 2, 3 (left-right), 12, 13 (up-down), 14, 15 (both)
    means = region_means(UnitMaps(nll, nll, nll), region)["nll"]
    assert means == pytest.approx({"inside": 0.5, "mirrored": (2 + 3 + 12 + 13 + 14 + 15) / 6, "outside": 119 / 14})
    centre = torch.zeros(4, 4, dtype=torch.bool)
    centre[1:3, 1:3] = True  # its own mirror image: no mirrored units
    assert set(region_means(UnitMaps(nll, nll, nll), centre)["nll"]) == {"inside", "outside"}
