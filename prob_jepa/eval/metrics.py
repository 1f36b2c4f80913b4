"""Scores of a head's predictions: likelihood, sample-based proper scores, correlation.

Conventions shared by ``metrics``, ``calibration`` and ``multimodality``: rows are
target tokens, ``target [N, D]``; samples come from ``Head.sample`` as
``[S, N, D]``; log-densities from ``Head.log_prob`` as ``[N]`` in nats.
Functions return Python floats, or tensors where the answer is per item or per bin; none needs grad.
"""
from __future__ import annotations

import functools
import math

import torch
from pyro.ops.stats import crps_empirical, energy_score_empirical

# torch.cdist's default switches to the matmul expansion |x|² + |y|² − 2x·y for
# more than 25 rows, which loses digits on large-norm embeddings and leaves
# non-zero self-distances (pytorch/pytorch#42479); scores want exact distances.
_exact_cdist = functools.partial(torch.cdist, compute_mode="donot_use_mm_for_euclid_dist")


def check_samples(samples: torch.Tensor, target: torch.Tensor) -> None:
    """Raise unless ``samples`` is ``[S, N, D]`` over ``target [N, D]``."""
    if samples.dim() != 3 or samples.shape[1:] != target.shape:
        shapes = f"{tuple(samples.shape)} and {tuple(target.shape)}"
        raise ValueError(f"expected samples [S, N, D] and target [N, D], got {shapes}")


@torch.no_grad()
def nll_per_dim(log_prob: torch.Tensor, dim: int) -> float:
    """Negative log-likelihood in nats per dimension: ``-mean(log_prob) / dim``.

    Args:
        log_prob: ``[N]`` log-densities in nats (``Head.log_prob``).
        dim: dimension ``D`` of the target space.
    """
    return (-log_prob.double().mean() / dim).item()


@torch.no_grad()
def energy_score(samples: torch.Tensor, target: torch.Tensor, chunk: int = 1024) -> float:
    """Mean over rows of the energy score ``E‖X − y‖ − ½ E‖X − X'‖`` (lower is better).

    The multivariate generalisation of the CRPS and a strictly proper score:
    only the true joint distribution minimises it in expectation. ``E‖X − X'‖``
    is the mean over the ``S(S − 1)`` pairs of distinct samples (the fair,
    unbiased estimator, Ferro 2014, doi:10.1002/qj.2270): pyro's V-statistic
    over all ``S²`` pairs, self-pairs included, adds ``½ E‖X − X'‖ / S``, a
    penalty on spread that favours forecasts too sharp (with ``S = 2`` a point
    mass at the majority mode beats the true two-mode forecast).

    Args:
        samples: ``[S, N, D]`` draws from the predictive distribution.
        target: ``[N, D]`` observed targets.
        chunk: rows per batch; memory is ``chunk · S²`` floats.

    References:
        Gneiting & Raftery, "Strictly Proper Scoring Rules, Prediction, and
        Estimation", JASA 2007, eq. 22 (``pyro.ops.stats.energy_score_empirical``).
    """
    check_samples(samples, target)
    pred = samples.float().transpose(0, 1)  # pyro wants the sample dim second from the right: [N, S, D]
    total = sum(
        energy_score_empirical(pred[i : i + chunk], target[i : i + chunk].float(), cdist=_exact_cdist).double().sum()
        for i in range(0, len(target), chunk)
    ) / len(target)
    error = (samples.float() - target.float()).norm(dim=-1).double().mean()  # E‖X − y‖
    return _fair(total, error, len(samples))


def _fair(v_statistic: torch.Tensor, error: torch.Tensor, num_samples: int) -> float:
    """The fair score from pyro's V-statistic ``E‖X − y‖ − ½ mean_{all S² pairs}‖X_i − X_j‖`` and ``E‖X − y‖``:
    the spread term over the ``S(S − 1)`` distinct pairs is ``S / (S − 1)`` times the V-statistic's, so the fair
    score is ``v − (error − v) / (S − 1)`` (one sample has no pair: its score is its error)."""
    if num_samples == 1:
        return v_statistic.item()
    return (v_statistic - (error - v_statistic) / (num_samples - 1)).item()


@torch.no_grad()
def crps(samples: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over rows and dimensions of the marginal CRPS ``E|X − y| − ½ E|X − X'|`` (lower is better), ``E|X − X'|``
    over the ``S(S − 1)`` pairs of distinct samples (the fair estimator, as :func:`energy_score`).

    Args:
        samples: ``[S, N, D]`` draws from the predictive distribution.
        target: ``[N, D]`` observed targets.

    References:
        Gneiting & Raftery, JASA 2007, eq. 21 (``pyro.ops.stats.crps_empirical``,
        the ``O(S log S)`` sorted form).
    """
    check_samples(samples, target)
    v_statistic = crps_empirical(samples.float(), target.float()).double().mean()
    return _fair(v_statistic, (samples.float() - target.float()).abs().double().mean(), len(samples))


@torch.no_grad()
def pearson_r(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of ``x [N]`` and ``y [N]``, e.g. a head's energy vs. its point-prediction error.

    NaN when either vector is constant (``RunDir.write_eval`` stores it as null).
    """
    x, y = x.double().flatten(), y.double().flatten()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"expected two vectors of equal length ≥ 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x - x.mean(), y - y.mean()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


@torch.no_grad()
def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a − b`` over paired per-item scores ``[N]`` (e.g. two encoders' probes being right on the same
    validation images) and its standard error ``sd(a − b) / √N`` (sample sd, N − 1): the spread of that mean over
    draws of N items from the same world, with whatever scores the items held fixed (for a probe: its weights and
    training features). When the two tend to be right on the same items, pairing makes it smaller than the two
    accuracies' own errors combined. NaN for a single item (``RunDir.write_eval`` stores it as null).

    Raises:
        ValueError: ``a`` and ``b`` are not vectors of one shape with at least one item.
    """
    if a.dim() != 1 or a.shape != b.shape or len(a) < 1:
        raise ValueError(f"expected two vectors of equal length ≥ 1, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.double() - b.double()
    return d.mean().item(), (d.std() / len(d) ** 0.5).item() if len(d) > 1 else math.nan
