"""Multimodality on two known modes: the ``shapes`` ambiguity pairs.

An ambiguity pair hides a region whose content is one of two known targets,
``mode_a`` and ``mode_b`` ``[N, D]``, with known weights. A head that models the
distribution puts samples on both modes in those proportions; a head that
regresses the mean puts its prediction between them.
"""
from __future__ import annotations

import torch

from .metrics import check_samples


def _checked(
    samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``samples [S, N, D]`` and both modes ``[N, D]`` in float64, after checking shapes and that the modes differ."""
    check_samples(samples, mode_a)
    check_samples(samples, mode_b)
    samples, mode_a, mode_b = samples.double(), mode_a.double(), mode_b.double()
    if ((mode_a - mode_b).norm(dim=-1) == 0).any():
        raise ValueError("mode_a and mode_b coincide on some rows; keep only ambiguous rows")
    return samples, mode_a, mode_b


def _mode_distances(
    samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance of every sample to each mode, ``[S, N]`` twice, and the half-gap ``‖a − b‖ / 2``, ``[N]``."""
    samples, mode_a, mode_b = _checked(samples, mode_a, mode_b)
    half_gap = (mode_a - mode_b).norm(dim=-1) / 2
    return (samples - mode_a).norm(dim=-1), (samples - mode_b).norm(dim=-1), half_gap


@torch.no_grad()
def mode_coverage(
    samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor, weights: tuple[float, float]
) -> dict[str, float]:
    """Share of samples nearer each mode, and its distance from the known mode weights.

    Args:
        samples: ``[S, N, D]`` draws; a point prediction is ``S = 1`` (``mean(cond)[None]``).
        mode_a, mode_b: ``[N, D]`` the two true targets of each row.
        weights: ``(w_a, w_b)``, the true probabilities of the modes, summing to 1.

    Returns:
        ``share_a``, ``share_b``: fraction of samples (over samples and rows)
        nearer mode a / b, an exact tie counting half to each, so they sum to 1;
        ``weight_error``: ``½ (|share_a − w_a| + |share_b − w_b|)``, the total
        variation distance between the shares and the weights (0 = the right proportions).
    """
    d_a, d_b, _ = _mode_distances(samples, mode_a, mode_b)
    share_a = ((d_a < d_b).double() + 0.5 * (d_a == d_b).double()).mean().item()
    share_b = 1.0 - share_a
    error = 0.5 * (abs(share_a - weights[0]) + abs(share_b - weights[1]))
    return {"share_a": share_a, "share_b": share_b, "weight_error": error}


@torch.no_grad()
def sharpness(samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor) -> float:
    """Mean over samples and rows of ``min(‖x − a‖, ‖x − b‖) / (‖a − b‖ / 2)``.

    0 = samples sit on the modes; 1 = they sit at the midpoint ``(a + b)/2``,
    which is where averaging (an L2 point prediction of a two-mode target) lands;
    above 1 = farther from both modes than the midpoint.

    Args:
        samples: ``[S, N, D]`` draws; a point prediction is ``S = 1`` (``mean(cond)[None]``).
        mode_a, mode_b: ``[N, D]`` the two true targets of each row, distinct on every row.
    """
    d_a, d_b, half_gap = _mode_distances(samples, mode_a, mode_b)
    return (torch.minimum(d_a, d_b) / half_gap).mean().item()


@torch.no_grad()
def on_mode_share(samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor) -> float:
    """Fraction of samples (over samples and rows) nearer one of the two modes than the midpoint ``(a + b)/2``.

    A head that puts its samples *on* the modes scores 1; a point prediction of the mean, or samples clustered
    around the midpoint, score near 0. A sample ``a + e`` is nearer ``a`` than the midpoint iff the component of
    ``e`` along the axis towards ``b`` is below a quarter of the gap ``‖a − b‖``: only the spread along the mode
    axis counts, not the spread in the other directions (``sharpness`` sees those). Samples spread along the axis
    far wider than the gap also score high; read it with the mode shares.

    Args:
        samples: ``[S, N, D]`` draws; mode_a, mode_b: ``[N, D]`` the two true targets, distinct on every row.
    """
    x = axis_coordinates(samples, mode_a, mode_b)
    return ((x < 0.25) | (x > 0.75)).double().mean().item()


@torch.no_grad()
def axis_coordinates(samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor) -> torch.Tensor:
    """Position of every sample along the axis from ``b`` (0) to ``a`` (1): ``(x − b)·(a − b) / ‖a − b‖²``.

    A sample is nearer one of the modes than the midpoint iff its coordinate is below 0.25 or above 0.75
    (the orthogonal part adds the same amount to all three distances).

    Args:
        samples: ``[S, N, D]`` draws; mode_a, mode_b: ``[N, D]`` the two true targets, distinct on every row.
    Returns:
        ``[S, N]`` float64 coordinates.
    """
    samples, a, b = _checked(samples, mode_a, mode_b)
    axis = a - b
    return ((samples - b) * axis).sum(-1) / axis.square().sum(-1)


@torch.no_grad()
def axis_position(samples: torch.Tensor, mode_a: torch.Tensor, mode_b: torch.Tensor) -> float:
    """Mean of :func:`axis_coordinates`: 0 at mode ``b``, 1 at mode ``a``.

    The L2-optimal point for mode weights ``(w_a, w_b)`` sits at ``w_a``: between the modes, on neither.
    """
    return axis_coordinates(samples, mode_a, mode_b).mean().item()


def axis_histogram(coordinates: torch.Tensor, lo: float = -1.0, hi: float = 2.0, bins: int = 60) -> dict[str, list]:
    """Histogram of :func:`axis_coordinates` on ``[lo, hi]``; coordinates outside are counted in the end bins.

    Returns ``{"edges": [bins + 1], "counts": [bins]}`` (counts sum to the number of coordinates).
    """
    x = coordinates.double().flatten().clamp(lo, hi)
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    return {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": counts.long().tolist()}
