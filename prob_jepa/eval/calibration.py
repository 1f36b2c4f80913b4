"""Calibration: central-interval coverage and PIT from samples, temperature fits, ECE.

Sample-based functions take ``samples [S, N, D]`` (``Head.sample``) and
``target [N, D]``; every target coordinate is one marginal forecast.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .metrics import check_samples


def _sorted_columns(samples: torch.Tensor) -> torch.Tensor:
    """``[S, N, D]`` → ``[N·D, S]``: each coordinate's samples, sorted ascending."""
    return samples.float().flatten(1).T.sort(dim=1).values.contiguous()


@torch.no_grad()
def interval_coverage(
    samples: torch.Tensor, target: torch.Tensor, levels: Sequence[float] = (0.5, 0.8, 0.95)
) -> dict[float, float]:
    """Expected fraction of target coordinates inside the marginal central interval of each level.

    Read from the rank of each target among its ``S`` samples, as the PIT of
    :func:`pit_values`: the target lies in the central ``l``-interval when its
    PIT ``u = (r + V) / (S + 1)`` is within ``l / 2`` of ½, and this averages over
    ``V ~ U(0, 1)`` and the tied ranks exactly (the overlap of ``u``'s range with
    the interval), so it is deterministic and a calibrated head covers ``l`` for
    any ``S``. (The interval between two sample quantiles does not: it covers
    ``l·(S − 1)/(S + 1)`` in expectation, 0.892 at 95 % with 32 samples.)
    Above ``l`` = over-dispersed, below = over-confident.

    Args:
        samples: ``[S, N, D]`` draws from the predictive distribution.
        target: ``[N, D]`` observed targets.
        levels: nominal levels in ``(0, 1)``.

    Returns:
        ``{level: coverage}``.
    """
    check_samples(samples, target)
    cols, y = _sorted_columns(samples), target.float().flatten()
    below, at_most = _rank_bounds(cols, y)
    slots = cols.shape[1] + 1
    lo, hi = below.double() / slots, (at_most + 1).double() / slots  # u is uniform on [lo, hi]
    out = {}
    for level in levels:
        inside = (hi.clamp(max=(1 + level) / 2) - lo.clamp(min=(1 - level) / 2)).clamp(min=0)
        out[level] = (inside / (hi - lo)).mean().item()
    return out


def _rank_bounds(sorted_cols: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``sorted_cols [M, S]``: the number of samples ``< y`` and ``≤ y`` (each ``[M]``)."""
    y = y.contiguous().unsqueeze(1)
    below = torch.searchsorted(sorted_cols, y, right=False).squeeze(1)
    return below, torch.searchsorted(sorted_cols, y, right=True).squeeze(1)


def _mid_rank_pit(sorted_cols: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    below, at_most = _rank_bounds(sorted_cols, y)
    return (below + at_most + 1).double() / (2 * (sorted_cols.shape[1] + 1))


@torch.no_grad()
def pit_values(
    samples: torch.Tensor, target: torch.Tensor, randomize: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Probability integral transform of every target coordinate from its samples, ``[N·D]`` in ``(0, 1)``.

    The PIT is the rank form of the empirical CDF: with ``r`` the number of
    samples below the target, ``u = (r + V) / (S + 1)``, ``V ~ U(0, 1)``. Under
    calibration ``r`` is uniform on ``{0, …, S}``, so ``u`` is exactly ``U(0, 1)``
    for any ``S`` (the plain fraction ``#{x ≤ y} / S`` differs by ``O(1/S)`` and is
    not). Ties (samples equal to the target, e.g. a point mass) put ``r``
    uniformly among the tied positions. With ``randomize=False``, ``V = ½`` and
    ties take the middle rank: deterministic, uniform on a grid of ``S + 1`` points.

    Args:
        samples: ``[S, N, D]`` draws from the predictive distribution.
        target: ``[N, D]`` observed targets.
        randomize: draw ``V`` and the tie position (``True``) or take their midpoints.
        generator: RNG of the draws, for reproducible PIT.

    References:
        Hamill, "Interpretation of rank histograms for verifying ensemble
        forecasts", MWR 2001; Czado, Gneiting & Held, "Predictive model
        assessment for count data", Biometrics 2009 (randomized PIT).
    """
    check_samples(samples, target)
    cols, y = _sorted_columns(samples), target.float().flatten()
    if not randomize:
        return _mid_rank_pit(cols, y)
    below, at_most = _rank_bounds(cols, y)
    draws = torch.rand(2, len(y), generator=generator, dtype=torch.float64).to(y.device)
    rank = below + (draws[0] * (at_most - below + 1)).floor()
    return (rank + draws[1]) / (cols.shape[1] + 1)


@torch.no_grad()
def pit_histogram(pit: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Density histogram of PIT values on ``bins`` equal bins of ``[0, 1]``, ``[bins]``; flat at 1 when calibrated.

    A ∪ shape = over-confident, ∩ = over-dispersed, a slope = biased.
    """
    return torch.histc(pit.double(), bins=bins, min=0.0, max=1.0) * bins / pit.numel()


@torch.no_grad()
def pit_ks(pit: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance ``sup_u |F̂(u) − u|`` of PIT values ``[M]`` from ``U(0, 1)`` (0 = flat)."""
    u = pit.double().flatten().sort().values
    i = torch.arange(1, len(u) + 1, dtype=torch.float64, device=u.device)
    return torch.maximum(i / len(u) - u, u - (i - 1) / len(u)).max().item()


@torch.no_grad()
def apply_temperature(samples: torch.Tensor, tau: float) -> torch.Tensor:
    """Rescale the spread of ``samples [S, N, D]`` around each row's sample mean by ``tau``; same shape."""
    center = samples.mean(dim=0, keepdim=True)
    return center + tau * (samples - center)


def _grid_search(f: Callable[[float], float], lo: float, hi: float, steps: int, passes: int) -> float:
    """Minimiser of ``f`` on ``[lo, hi]``: a grid of ``steps`` points, then ``passes − 1`` finer grids."""
    for _ in range(passes):
        grid = torch.linspace(lo, hi, steps, dtype=torch.float64).tolist()
        best = min(range(steps), key=lambda i: f(grid[i]))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, steps - 1)]
    return grid[best]


@torch.no_grad()
def fit_sample_temperature(
    samples: torch.Tensor,
    target: torch.Tensor,
    bounds: tuple[float, float] = (0.05, 20.0),
    steps: int = 41,
    passes: int = 2,
) -> float:
    """Spread factor ``τ`` for :func:`apply_temperature` that makes the PIT flattest on a validation split.

    Minimises :func:`pit_ks` of the mid-rank PIT (deterministic) over ``log τ``
    in ``bounds``: a grid of ``steps`` points, refined ``passes − 1`` times
    between the neighbours of the best (defaults: 16 %, then 0.75 % apart).
    The KS distance is piecewise constant in ``τ``, so a grid, not a gradient.
    No re-sampling is needed: a sample ``m + τ(x − m)`` lies below ``y`` iff
    ``x`` lies below ``m + (y − m)/τ``. A result at a bound means the optimum lies beyond it.

    Args:
        samples: ``[S, N, D]`` validation draws, ``S ≥ 2``.
        target: ``[N, D]`` validation targets.
        bounds: search range of ``τ``.
        steps: points per grid.
        passes: number of grids.
    """
    check_samples(samples, target)
    if samples.shape[0] < 2:
        raise ValueError("a sample temperature needs at least 2 samples per row")
    cols = _sorted_columns(samples)
    center, y = samples.float().mean(dim=0).flatten(), target.float().flatten()

    def ks(log_tau: float) -> float:
        return pit_ks(_mid_rank_pit(cols, center + (y - center) / math.exp(log_tau)))

    return math.exp(_grid_search(ks, math.log(bounds[0]), math.log(bounds[1]), steps, passes))


def _golden_section(f: Callable[[float], float], lo: float, hi: float, tol: float) -> float:
    """Minimiser of a unimodal ``f`` on ``[lo, hi]`` to within ``tol``."""
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2


def _fit_softmax_temperature(
    logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float], tol: float
) -> float:
    """``T`` minimising the NLL of ``softmax(logits / T)`` at ``labels``, by golden section on ``log T``.

    The NLL is convex in ``1/T`` (log-sum-exp of linear functions minus a linear
    one), hence unimodal in ``log T``: the search finds the minimum in ``bounds``.
    """
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    return math.exp(_golden_section(nll, math.log(bounds[0]), math.log(bounds[1]), tol))


@torch.no_grad()
def fit_logit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (1e-2, 1e2), tol: float = 1e-5
) -> float:
    """Temperature scaling: the ``T`` minimising the validation NLL of ``softmax(logits / T)``.

    Args:
        logits: ``[N, C]`` classifier logits on a validation split.
        labels: ``[N]`` true classes.
        bounds: search range of ``T``; a result at a bound means the optimum lies beyond it.
        tol: tolerance on ``log T``.

    References:
        Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural
        Networks", ICML 2017 (arXiv:1706.04599), §4.2.
    """
    return _fit_softmax_temperature(logits, labels, bounds, tol)


@torch.no_grad()
def energy_probabilities(energies: torch.Tensor, temperature: float) -> torch.Tensor:
    """Boltzmann probabilities ``p(y_k | x) ∝ exp(−E_k / T)`` over each query's candidates (JIN eq. 11).

    Args:
        energies: ``[Q, K]`` energy of each of ``K`` candidates per query, lower = more compatible.
        temperature: ``T > 0``.

    Returns:
        ``[Q, K]``, rows summing to 1.
    """
    return torch.softmax(-energies.double() / temperature, dim=1)


@torch.no_grad()
def fit_energy_temperature(
    energies: torch.Tensor, correct_index: torch.Tensor, bounds: tuple[float, float] = (1e-4, 1e4), tol: float = 1e-5
) -> float:
    """``T`` of :func:`energy_probabilities` minimising the NLL of the correct candidates (JIN eq. 11).

    Args:
        energies: ``[Q, K]`` validation energies, lower = more compatible.
        correct_index: ``[Q]`` index of the correct candidate of each query.
        bounds: search range of ``T``, in the units of the energies; a result at
            a bound means the optimum lies beyond it (``T → 0`` when the correct
            candidate always has the lowest energy).
        tol: tolerance on ``log T``.
    """
    return _fit_softmax_temperature(-energies, correct_index, bounds, tol)


@torch.no_grad()
def top1_confidence(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence ``[N]`` (max of ``softmax(logits / T)``) and correctness ``[N]`` (bool) of the top-1 prediction.

    For energies, pass ``-energies`` as the logits.
    """
    probs = torch.softmax(logits.double() / temperature, dim=1)
    confidence, prediction = probs.max(dim=1)
    return confidence, prediction == labels


def _bin_sums(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width bin ``((m−1)/M, m/M]``: count, sum of confidences, sum of correct, each ``[bins]``."""
    confidence, correct = confidence.double().flatten(), correct.double().flatten()
    index = ((confidence * bins).ceil().long() - 1).clamp(0, bins - 1)
    zeros = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    return (
        zeros.index_add(0, index, torch.ones_like(confidence)),
        zeros.index_add(0, index, confidence),
        zeros.index_add(0, index, correct),
    )


@torch.no_grad()
def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE ``Σ_m (n_m / N) |acc_m − conf_m|`` over equal-width confidence bins (0 = calibrated).

    Args:
        confidence: ``[N]`` predicted probability of the predicted class.
        correct: ``[N]`` bool, whether the prediction was right.
        bins: number of equal-width bins of ``[0, 1]``.

    References:
        Guo et al., ICML 2017 (arXiv:1706.04599), eq. 3.
    """
    _, conf_sum, correct_sum = _bin_sums(confidence, correct, bins)
    return ((correct_sum - conf_sum).abs().sum() / confidence.numel()).item()


@torch.no_grad()
def reliability_curve(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reliability diagram data: mean confidence, accuracy and count per bin, each ``[bins]``.

    Empty bins have NaN confidence and accuracy (matplotlib leaves them out).
    Bins as in :func:`expected_calibration_error`.
    """
    count, conf_sum, correct_sum = _bin_sums(confidence, correct, bins)
    return conf_sum / count, correct_sum / count, count.long()
