"""Scale robustness (JIN Table 4): rescaled images, and the 1x probe re-scoring them."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from prob_jepa.eval.representation import extract_features, linear_probe
from prob_jepa.eval.scale import rescale, scale_scores

H = 32


def centred_square(side: int) -> torch.Tensor:
    """``[1, 3, H, H]``: a white ``side``-px square centred on a grey (0.25) image."""
    x = torch.full((1, 3, H, H), 0.25)
    lo = (H - side) // 2
    x[..., lo:lo + side, lo:lo + side] = 1.0
    return x


def test_rescale_shrinks_and_magnifies_the_content_about_the_centre():
    x = centred_square(8)
    area = lambda img: (img[0, 0] > 0.6).sum().item()  # noqa: E731
    assert area(rescale(x, 1.0)) == 64
    assert area(rescale(x, 2.0)) == pytest.approx(256, abs=16)  # 16 px across
    assert area(rescale(x, 0.5)) == pytest.approx(16, abs=4)  # 4 px across
    small = rescale(x, 0.5)
    assert small.shape == x.shape and small[0, :, 0, 0].tolist() == pytest.approx([0.25] * 3)  # its own background
    assert small[0, 0, H // 2, H // 2] > 0.9 and rescale(x, 2.0)[0, 0, H // 2, H // 2] == 1.0
    with pytest.raises(ValueError, match="positive"):
        rescale(x, 0.0)


def discs(n: int, seed: int) -> TensorDataset:
    """Images of a disc (radius H/3, colour = class of 4) on a random background colour; a fifth of the labels
    are noise, so no probe is perfect."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.randint(4, (n,), generator=g)
    r = torch.arange(H) - (H - 1) / 2
    inside = (r[:, None] ** 2 + r[None, :] ** 2) <= (H / 3) ** 2
    images = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, H, H).clone()
    images = torch.where(inside, palette[labels][..., None, None], images)
    noisy = torch.rand(n, generator=g) < 0.2
    labels[noisy] = torch.randint(4, (int(noisy.sum()),), generator=g)
    return TensorDataset(images, labels)


def scores_of(encode) -> tuple[float, dict]:
    train, val = discs(400, 0), discs(200, 1)
    tx, ty = extract_features(encode, train, 64, torch.device("cpu"))
    vx, vy = extract_features(encode, val, 64, torch.device("cpu"))
    probe = linear_probe(tx, ty, vx, vy)
    return probe.accuracy, scale_scores(encode, probe, tx, ty, val, [0.5, 1.0, 2.0], 64, torch.device("cpu"))


def test_an_exactly_scale_invariant_encoder_scores_the_same_at_every_scale():
    """The colour at the centre is the disc's at every scale: the 1x probe reads it equally well."""
    accuracy, scores = scores_of(lambda x: x[:, :, H // 2, H // 2])
    assert 0.7 < accuracy < 0.95  # the label noise
    for factor in ("0.5", "1.0", "2.0"):
        assert scores[factor]["linear_probe"] == accuracy
    assert scores["0.5"]["knn"] == scores["1.0"]["knn"] == scores["2.0"]["knn"]


def test_an_encoder_that_reads_a_fixed_offset_loses_the_object_when_it_shrinks():
    """A quarter image from the centre lies inside the disc at 1x and 2x, on the background at 0.5x."""
    accuracy, scores = scores_of(lambda x: x[:, :, H // 2, H // 2 + H // 4])
    assert scores["2.0"]["linear_probe"] == accuracy > 0.7
    assert scores["0.5"]["linear_probe"] < 0.4  # chance is 0.25
