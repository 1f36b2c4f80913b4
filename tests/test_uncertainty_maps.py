"""Uncertainty maps: every mask unit predicted from the rest; a head uncertain in a known unit peaks there."""
from __future__ import annotations

import torch

from prob_jepa.eval.uncertainty_maps import count_modes, unit_uncertainty
from prob_jepa.heads.base import Head
from prob_jepa.model import build_model


class DistanceHead(Head):
    """Planted: ``log p(y | c) = −‖y − y₀‖²`` with ``y₀`` the plain image's target at the same unit (rows come
    in unit order, one image at a time), so the head is the more uncertain the more a unit's target differs
    from plain; samples are ``y₀`` plus unit noise."""

    def __init__(self, reference: torch.Tensor):
        super().__init__(reference.shape[-1], 1)
        self.register_buffer("reference", reference)

    def log_prob(self, target, cond):
        return -(target - self.reference).square().sum(-1)

    def sample(self, cond, num_samples):
        return self.reference + torch.randn(num_samples, len(cond), self.dim)


def test_map_of_a_head_uncertain_in_a_known_unit_peaks_there(compose, tiny_overrides):
    cfg = compose(*tiny_overrides, "model.spatial_bias=false")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    plain = torch.full((1, 3, 32, 32), 0.5)
    with torch.no_grad():
        reference = model.target_features(plain)[-1].flatten(0, 2)  # [units, D]
    image = plain.clone()
    image[..., 12:16, 20:24] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # one 4-px unit: row 3, column 5
    maps = unit_uncertainty(model, DistanceHead(reference), image, num_samples=8)
    assert maps.nll.shape == (1, 8, 8)
    assert divmod(int(maps.nll[0].argmax()), 8) == (3, 5)
    assert maps.spread.shape == maps.modes.shape == (1, 8, 8)


def test_count_modes_on_one_and_two_clusters():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(200, 3, 5, generator=g)
    two = torch.randn(200, 3, 5, generator=g) * 0.2
    two[:100, :, 0] += 3.0
    assert count_modes(one).tolist() == [1.0, 1.0, 1.0]
    assert count_modes(two).tolist() == [2.0, 2.0, 2.0]
