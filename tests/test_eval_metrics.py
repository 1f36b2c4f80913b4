"""Evaluation metrics against known answers: exact Gaussians, two-mode mixtures, Boltzmann choices."""
from __future__ import annotations

import math

import pytest
import torch

from prob_jepa.eval.calibration import (
    apply_temperature,
    energy_probabilities,
    expected_calibration_error,
    fit_energy_temperature,
    fit_logit_temperature,
    fit_sample_temperature,
    interval_coverage,
    pit_histogram,
    pit_ks,
    pit_values,
    reliability_curve,
    top1_confidence,
)
from prob_jepa.eval.heads import Rows, energy_retrieval
from prob_jepa.eval.metrics import crps, energy_score, nll_per_dim, paired_difference, pearson_r
from prob_jepa.eval.multimodality import (
    axis_coordinates, axis_histogram, axis_position, mode_coverage, on_mode_share, sharpness,
)
from prob_jepa.eval.uncertainty import attainable_correlation

LEVELS = (0.5, 0.8, 0.95)


def gaussian(
    spread: float = 1.0, shift: float = 0.0, num_samples: int = 200, rows: int = 1000, dim: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``y ~ N(μ, σ²)`` per row and coordinate, and samples from ``N(μ + shift·σ, (spread·σ)²)``."""
    g = torch.Generator().manual_seed(seed)
    mu, sigma = torch.randn(rows, dim, generator=g), torch.rand(rows, dim, generator=g) + 0.5
    target = mu + sigma * torch.randn(rows, dim, generator=g)
    samples = mu + sigma * (shift + spread * torch.randn(num_samples, rows, dim, generator=g))
    return samples, target


def gaussian_crps(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form CRPS of ``N(μ, σ²)`` at ``y`` (Gneiting & Raftery 2007, eq. 5)."""
    z = (y - mu) / sigma
    pdf, cdf = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


# likelihood and proper scores


def test_nll_per_dim_is_mean_negative_log_prob_over_dim():
    assert nll_per_dim(torch.tensor([-3.0, -5.0]), dim=2) == pytest.approx(2.0)


def test_crps_matches_gaussian_closed_form():
    g = torch.Generator().manual_seed(1)
    mu, sigma = torch.randn(300, 2, generator=g), torch.rand(300, 2, generator=g) + 0.5
    y = torch.randn(300, 2, generator=g)
    samples = mu + sigma * torch.randn(1000, 300, 2, generator=g)
    assert crps(samples, y) == pytest.approx(gaussian_crps(mu, sigma, y).mean().item(), rel=0.02)


@pytest.mark.parametrize("score", [energy_score, crps])
def test_scores_are_unbiased_with_few_samples_so_the_truth_beats_a_point_at_the_majority_mode(score):
    """Four samples of N(0, 1): the fair estimator's mean is the closed-form CRPS (the V-statistic over all S² pairs
    was ½ E|X − X'| / S = 0.141 too high). Two samples of the 0.7 / 0.3 mixture of points at 1 and 0 against the
    truth drawn from it: the true forecast scores 0.21 in expectation, a point at 1 scores 0.3 (the V-statistic
    read 0.31 for the truth: the point won)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20000, 1, generator=g)
    closed = gaussian_crps(torch.zeros(()), torch.ones(()), y).mean().item()
    assert score(torch.randn(4, 20000, 1, generator=g), y) == pytest.approx(closed, abs=0.01)
    mixture = lambda *shape: (torch.rand(*shape, generator=g) < 0.7).float()  # noqa: E731
    truth = mixture(40000, 1)
    assert score(mixture(2, 40000, 1), truth) == pytest.approx(0.21, abs=0.01)
    assert score(torch.ones(2, 40000, 1), truth) == pytest.approx(0.3, abs=0.01)


def test_energy_score_of_one_sample_is_euclidean_error():
    samples, target = torch.randn(1, 5, 3), torch.randn(5, 3)
    assert energy_score(samples, target) == pytest.approx((samples[0] - target).norm(dim=1).mean().item(), rel=1e-5)


def test_energy_score_in_one_dimension_equals_crps():
    samples, target = gaussian(rows=300, dim=1, num_samples=50)
    assert energy_score(samples, target, chunk=64) == pytest.approx(crps(samples, target), rel=1e-4)


@pytest.mark.parametrize("score", [energy_score, crps])
def test_true_distribution_scores_better_than_shifted_or_narrow(score):
    kw = dict(rows=200, num_samples=100)
    true = score(*gaussian(**kw))
    assert true < score(*gaussian(shift=1.0, **kw))
    assert true < score(*gaussian(spread=0.3, **kw))


# calibration of sample-based predictions


@pytest.mark.parametrize("num_samples", [8, 32, 200])
def test_exact_gaussian_covers_nominal_levels_for_any_number_of_samples(num_samples):
    """Not the interval between two sample quantiles: with S samples that covers (S − 1)/(S + 1) of the level
    (0.892 at 95 % with the evaluation's 32 samples, 0.74 with 8) for a perfectly calibrated head."""
    coverage = interval_coverage(*gaussian(num_samples=num_samples, rows=4000), levels=LEVELS)
    for level in LEVELS:
        assert coverage[level] == pytest.approx(level, abs=0.01)


def test_coverage_of_ties_and_of_a_target_beyond_every_sample():
    target = torch.zeros(5, 2)
    point_mass = interval_coverage(torch.zeros(32, 5, 2), target, levels=LEVELS)  # rank uniform on 0..32
    assert point_mass == pytest.approx({level: level for level in LEVELS})
    # below all 32 samples: u ~ U(0, 1/33), inside the 95 % interval [0.025, 0.975] with probability 0.175
    beyond = interval_coverage(torch.ones(32, 5, 2), target, levels=LEVELS)
    assert beyond == pytest.approx({0.5: 0.0, 0.8: 0.0, 0.95: (1 / 33 - 0.025) * 33})


@pytest.mark.parametrize("spread, sign", [(1.6, 1), (0.6, -1)])
def test_dispersion_shows_as_over_or_under_coverage(spread, sign):
    coverage = interval_coverage(*gaussian(spread=spread), levels=LEVELS)
    for level in LEVELS:
        assert sign * (coverage[level] - level) > 0.03


def test_exact_gaussian_has_flat_pit():
    pit = pit_values(*gaussian(), generator=torch.Generator().manual_seed(0))
    assert pit.shape == (1000 * 4,)
    assert pit_ks(pit) < 0.03
    assert torch.allclose(pit_histogram(pit, bins=10), torch.ones(10, dtype=torch.float64), atol=0.15)


@pytest.mark.parametrize("spread, shape", [(2.0, "cap"), (0.5, "cup")])
def test_miscalibrated_pit_is_far_from_flat_with_the_right_shape(spread, shape):
    pit = pit_values(*gaussian(spread=spread), randomize=False)
    hist = pit_histogram(pit, bins=10)
    assert pit_ks(pit) > 0.1
    middle, edges = hist[4:6].mean(), hist[[0, -1]].mean()
    assert (middle > edges) if shape == "cap" else (middle < edges)


def test_pit_breaks_ties_of_a_point_mass_uniformly():
    target = torch.randn(1000, 2)
    samples = target.expand(20, -1, -1)
    assert torch.all(pit_values(samples, target, randomize=False) == 0.5)
    assert pit_ks(pit_values(samples, target, generator=torch.Generator().manual_seed(0))) < 0.05


def test_pit_ks_of_known_points():
    assert pit_ks(torch.tensor([0.25, 0.75])) == pytest.approx(0.25)
    assert pit_ks(torch.tensor([0.9, 0.95])) == pytest.approx(0.9)


def test_apply_temperature_scales_spread_and_keeps_the_mean():
    samples, _ = gaussian(rows=10)
    hot = apply_temperature(samples, 2.5)
    assert torch.allclose(hot.mean(0), samples.mean(0), atol=1e-5)
    assert torch.allclose(hot.std(0), 2.5 * samples.std(0), rtol=1e-4)


@pytest.mark.parametrize("spread", [2.0, 0.5])
def test_sample_temperature_recovers_the_dispersion_factor(spread):
    samples, target = gaussian(spread=spread, rows=500, num_samples=100)
    tau = fit_sample_temperature(samples, target)
    assert tau == pytest.approx(1 / spread, rel=0.1)
    coverage = interval_coverage(apply_temperature(samples, tau), target, levels=LEVELS)
    for level in LEVELS:
        assert coverage[level] == pytest.approx(level, abs=0.03)


# calibration of classifiers and energies


def calibrated_confidences(n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    confidence = 0.2 + 0.8 * torch.rand(n, generator=g)
    return confidence, torch.rand(n, generator=g) < confidence


def test_ece_of_a_hand_example():
    confidence, correct = torch.tensor([0.9, 0.9, 0.3]), torch.tensor([True, False, False])
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.3)


def test_ece_is_near_zero_when_calibrated_and_positive_when_overconfident():
    confidence, correct = calibrated_confidences()
    assert expected_calibration_error(confidence, correct) < 0.02
    overconfident = confidence.sqrt()  # same outcomes, higher stated confidence
    assert expected_calibration_error(overconfident, correct) > 0.1


def test_reliability_curve_follows_the_diagonal_when_calibrated():
    confidence, correct = calibrated_confidences()
    bin_conf, bin_acc, count = reliability_curve(confidence, correct, bins=10)
    assert count.sum() == len(confidence) and count[:2].sum() == 0  # no confidence below 0.2
    assert bin_conf[:2].isnan().all() and bin_acc[:2].isnan().all()
    assert torch.allclose(bin_acc[2:], bin_conf[2:], atol=0.03)


def boltzmann_choices(temperature: float, queries: int = 4000, candidates: int = 8, seed: int = 0):
    """Energies ``[Q, K]`` and the index of a candidate drawn from ``p ∝ exp(−E / T)``."""
    g = torch.Generator().manual_seed(seed)
    energies = 5.0 * torch.randn(queries, candidates, generator=g)
    correct = torch.multinomial(torch.softmax(-energies / temperature, dim=1), 1, generator=g).squeeze(1)
    return energies, correct


def test_energy_probabilities_are_a_softmax_of_negative_energy():
    energies = torch.tensor([[0.0, 1.0, 3.0]])
    p = energy_probabilities(energies, temperature=2.0)
    expected = torch.exp(-energies.double() / 2) / torch.exp(-energies.double() / 2).sum()
    assert torch.allclose(p, expected)


def test_energy_temperature_fit_recovers_boltzmann_temperature():
    energies, correct = boltzmann_choices(temperature=2.5)
    assert fit_energy_temperature(energies, correct) == pytest.approx(2.5, rel=0.1)


def test_logit_temperature_scaling_recovers_scale_and_reduces_ece():
    g = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(3000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=g).squeeze(1)
    logits = 3.0 * true_logits  # an overconfident classifier
    temperature = fit_logit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(*top1_confidence(logits, labels))
    after = expected_calibration_error(*top1_confidence(logits, labels, temperature))
    assert after < 0.03 < before


# energy-error relation


def test_pearson_r_matches_hand_computation():
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 5.0, 9.0])
    assert pearson_r(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert pearson_r(x, 1 - 2 * x) == pytest.approx(-1.0)


def test_the_attainable_energy_correlation_is_the_point_biserial_bound():
    """A normal energy and an accuracy p: the most negative r a 0/1 correctness can have is
    −φ(Φ⁻¹(p)) / √(p(1 − p)) (−0.70 at p = 0.8); right images that are exactly the lowest energies reach it, right
    images drawn at random sit near 0, far above it."""
    g = torch.Generator().manual_seed(0)
    energy = torch.randn(100_000, generator=g, dtype=torch.float64)
    by_chance = (torch.rand(len(energy), generator=g, dtype=torch.float64) < 0.8).double()
    p = by_chance.mean().item()
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)).item()
    bound = -math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / math.sqrt(p * (1 - p))
    assert attainable_correlation(energy, by_chance) == pytest.approx(bound, abs=0.003)
    assert bound == pytest.approx(-0.70, abs=0.01)
    assert abs(pearson_r(energy, by_chance)) < 0.02
    lowest = (energy < energy.quantile(p)).double()
    assert pearson_r(energy, lowest) == pytest.approx(attainable_correlation(energy, lowest), abs=1e-9)


# the margin between two encoders' probes


def test_paired_difference_matches_hand_computation():
    a, b = torch.tensor([1, 1, 0, 1, 1]), torch.tensor([0, 1, 0, 0, 1])  # a − b = 1, 0, 0, 1, 0
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(0.4)
    assert se == pytest.approx(math.sqrt((3 * 0.4**2 + 2 * 0.6**2) / 4 / 5))
    assert math.isnan(paired_difference(a[:1], b[:1])[1])  # one image: a margin, no spread
    for short, shaped in ((b[:4], b), (b.view(5, 1), b.view(5, 1))):  # a shorter vector; a column is no vector
        with pytest.raises(ValueError, match="equal length"):
            paired_difference(a if shaped.dim() == 1 else a.view(5, 1), short)


def test_paired_margins_give_each_score_its_margin_and_error():
    from prob_jepa.eval import paired_margins

    pretrained = {"linear_probe/image": torch.tensor([1, 1, 0, 1, 1]).bool(), "knn/image": torch.ones(5).bool()}
    random_init = {"linear_probe/image": torch.tensor([0, 1, 0, 0, 1]).bool(), "knn/image": torch.ones(5).bool()}
    margin = paired_margins(pretrained, random_init)
    assert set(margin) == {"images", "linear_probe/image", "linear_probe/image_se", "knn/image", "knn/image_se"}
    assert margin["images"] == 5
    assert margin["linear_probe/image"] == pytest.approx(0.4)
    assert margin["linear_probe/image_se"] == pytest.approx(math.sqrt((3 * 0.4**2 + 2 * 0.6**2) / 4 / 5))
    assert (margin["knn/image"], margin["knn/image_se"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal length"):  # not the same images
        paired_margins(pretrained, {k: v[:4] for k, v in random_init.items()})
    no_scores = ({}, {})
    missing = (pretrained, {"knn/image": random_init["knn/image"]})
    extra = (pretrained, {**random_init, "knn/text": torch.ones(5).bool()})
    for a, b in (no_scores, missing, extra):
        with pytest.raises(ValueError, match="the same scores"):
            paired_margins(a, b)
    assert paired_margins(pretrained, random_init, count="scenes")["scenes"] == 5


def test_the_paired_standard_error_is_the_spread_of_the_margin_over_draws_of_images():
    """Two probes right on nested sets of images (every image the weaker gets right, the stronger does too: 0.85
    against 0.75, as pretrained features against random ones): over 4000 draws of 500 images the margin's spread is
    √(0.1 · 0.9 / 500) = 0.0134, which the paired error of one draw recovers; the two accuracies' own errors
    combined would claim 0.0251."""
    u = torch.rand(4000, 500, generator=torch.Generator().manual_seed(0))
    margins, errors = zip(*(paired_difference(row < 0.85, row < 0.75) for row in u))
    spread = torch.tensor(margins).std().item()
    assert spread == pytest.approx(math.sqrt(0.1 * 0.9 / 500), rel=0.05)
    assert torch.tensor(errors).mean().item() == pytest.approx(spread, rel=0.05)


# multimodality on two known modes


def two_modes(rows: int = 300, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)


def test_mixture_samples_cover_modes_with_their_weights():
    a, b = two_modes()
    g = torch.Generator().manual_seed(1)
    pick_a = (torch.rand(200, len(a), 1, generator=g) < 0.7).float()
    samples = pick_a * a + (1 - pick_a) * b + 0.05 * torch.randn(200, *a.shape, generator=g)
    coverage = mode_coverage(samples, a, b, weights=(0.7, 0.3))
    assert coverage["share_a"] == pytest.approx(0.7, abs=0.02)
    assert coverage["share_b"] == pytest.approx(0.3, abs=0.02)
    assert coverage["weight_error"] < 0.02
    assert sharpness(samples, a, b) < 0.2


def test_sharpness_is_one_at_the_midpoint_and_zero_on_the_modes():
    a, b = two_modes()
    assert sharpness(((a + b) / 2).expand(3, -1, -1), a, b) == pytest.approx(1.0, abs=1e-5)
    assert sharpness(torch.stack([a, b, a]), a, b) == pytest.approx(0.0, abs=1e-6)


def test_a_point_prediction_of_the_mean_shows_averaging():
    a, b = two_modes()
    mean = (0.7 * a + 0.3 * b)[None]  # the L2-optimal point for weights 0.7 / 0.3
    assert sharpness(mean, a, b) == pytest.approx(0.6, abs=1e-5)
    coverage = mode_coverage(mean, a, b, weights=(0.7, 0.3))
    assert coverage["share_a"] == 1.0 and coverage["weight_error"] == pytest.approx(0.3)


def test_identical_modes_are_rejected():
    a, _ = two_modes()
    with pytest.raises(ValueError, match="coincide"):
        sharpness(a[None], a, a)


def test_on_mode_share_counts_samples_within_a_quarter_gap_along_the_axis():
    a, b = two_modes(dim=64)
    g = torch.Generator().manual_seed(2)
    axis = (a - b) / (a - b).norm(dim=-1, keepdim=True)
    gap = (a - b).norm(dim=-1, keepdim=True)
    on_a = a + 0.2 * gap * axis * torch.randn(400, len(a), 1, generator=g)  # along-axis spread 0.2 × gap
    # P(N(0, 0.2²) < 0.25) for the side towards b, every sample on the far side counts: Φ(1.25) = 0.894
    assert on_mode_share(on_a, a, b) == pytest.approx(0.894, abs=0.02)
    middle = (a + b) / 2 + 0.2 * gap * axis * (torch.rand(400, len(a), 1, generator=g) - 0.5)  # within ±gap/10
    off_axis = 2.0 * torch.randn(400, *a.shape, generator=g)
    off_axis -= (off_axis * axis).sum(-1, keepdim=True) * axis  # large spread orthogonal to the mode axis
    assert on_mode_share(middle + off_axis, a, b) == 0.0
    assert on_mode_share(((a + b) / 2)[None], a, b) == 0.0
    assert on_mode_share(torch.stack([a, b]), a, b) == 1.0


def test_axis_position_of_the_weighted_mean_is_its_weight():
    a, b = two_modes()
    assert axis_position((0.7 * a + 0.3 * b)[None], a, b) == pytest.approx(0.7, abs=1e-6)
    assert axis_position(torch.stack([a, a, b]), a, b) == pytest.approx(2 / 3, abs=1e-6)


def test_axis_coordinates_agree_with_on_mode_share_and_their_histogram_keeps_every_sample():
    a, b = two_modes(dim=16)
    g = torch.Generator().manual_seed(3)
    samples = a + 3.0 * torch.randn(64, *a.shape, generator=g)  # many beyond both ends of the axis
    x = axis_coordinates(samples, a, b)
    assert x.shape == samples.shape[:2]
    assert ((x < 0.25) | (x > 0.75)).double().mean().item() == pytest.approx(on_mode_share(samples, a, b), abs=1e-12)
    hist = axis_histogram(x, lo=-1.0, hi=2.0, bins=30)
    assert len(hist["edges"]) == 31 and sum(hist["counts"]) == x.numel()
    assert hist["counts"][0] == int((x <= -0.9).sum()) and hist["counts"][-1] == int((x >= 1.9).sum())
    assert axis_histogram(torch.tensor([0.0, 1.0]), bins=3)["counts"] == [0, 1, 1]


# energy retrieval (JIN eq. 11) on planted energies
class PlantedEnergy(torch.nn.Module):
    """A head whose energy of a target is its first coordinate (``constant``: 0 for every target)."""

    def __init__(self, constant: bool = False):
        super().__init__()
        self.constant = constant
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # only tells on_head the device

    def energy(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.anchor.expand(len(target)) if self.constant else target[:, 0] + self.anchor


def boltzmann_rows(temperature: float, queries: int = 6000, pool: int = 6000) -> tuple[Rows, Rows]:
    """Distractor energies ~ N(0, 1); true energies from the same density tilted by ``exp(−E / T)``, i.e.
    N(−1/T, 1): given the K energies of a query, the truth is candidate k with probability softmax(−E / T)_k."""
    g = torch.Generator().manual_seed(0)
    q = Rows(torch.zeros(queries, 1), torch.randn(queries, 1, generator=g) - 1 / temperature, torch.arange(queries))
    p = Rows(torch.zeros(pool, 1), torch.randn(pool, 1, generator=g), queries + torch.arange(pool))
    return q, p


def test_energy_retrieval_recovers_a_planted_temperature_and_is_calibrated_after_it():
    queries, pool = boltzmann_rows(temperature=2.0)
    out, energies = energy_retrieval(PlantedEnergy(), queries, pool, candidates=8)
    assert out["temperature"] == pytest.approx(2.0, rel=0.1)
    assert out["after"]["ece"] < 0.03 < out["before"]["ece"]  # T = 1 is over-confident by a factor of two
    assert out["after"]["nll"] < out["before"]["nll"]
    assert len(energies["true"]) == 6000 and len(energies["other"]) == 6000 * 7


def test_energy_retrieval_of_an_energy_blind_to_the_target_is_chance():
    queries, pool = boltzmann_rows(temperature=2.0)
    out, _ = energy_retrieval(PlantedEnergy(constant=True), queries, pool, candidates=8)
    assert out["before"]["accuracy"] == pytest.approx(1 / 8, abs=0.03), "ties must not count as retrieved"
    assert out["before"]["nll"] == pytest.approx(math.log(8), abs=1e-6)



def test_a_temperature_is_fit_on_other_images_than_those_it_is_scored_on():
    """Rows of one image share its context; fitting T on some of its tokens and scoring others flatters the
    calibration. ``Rows.fit_half`` takes every other image present (by index); energy retrieval fits on those
    queries only: with the truth tilted at T = 2 on them and T = 0.5 on the rest (listed first), the fit recovers 2
    and the rest are scored (a fit on the first half of the rows read 0.5)."""
    images = torch.tensor([5, 5, 1, 1, 1, 8, 3, 8])
    fit = Rows(torch.zeros(8, 1), torch.zeros(8, 1), images).fit_half()
    assert fit.tolist() == [True, True, True, True, True, False, False, False]  # images 1 and 5 of 1, 3, 5, 8
    sharp, planted = boltzmann_rows(temperature=0.5, queries=3000, pool=6000)[0], boltzmann_rows(2.0, 3000)
    image = torch.arange(6000).remainder(3000) * 2 + (torch.arange(6000) < 3000)  # sharp: odd images, planted: even
    queries = Rows(torch.zeros(6000, 1), torch.cat([sharp.target, planted[0].target]), image)
    out, _ = energy_retrieval(PlantedEnergy(), queries, planted[1], candidates=8)
    assert out["temperature"] == pytest.approx(2.0, rel=0.1)
    assert out["queries"] == 3000
