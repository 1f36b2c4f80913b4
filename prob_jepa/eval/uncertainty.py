"""Energy-based uncertainty (JIN eq. 11): does the predictor's energy know when the representation errs?"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .calibration import expected_calibration_error, fit_logit_temperature, reliability_curve, top1_confidence
from .metrics import pearson_r


def image_energies(energy: torch.Tensor, image: torch.Tensor, num_images: int) -> torch.Tensor:
    """Mean energy of each image's target tokens: ``energy [N]``, ``image [N]`` → ``[num_images]``."""
    total = torch.zeros(num_images, dtype=torch.float64).index_add_(0, image, energy.double())
    count = torch.zeros(num_images, dtype=torch.float64).index_add_(0, image, torch.ones_like(energy, dtype=torch.float64))
    return (total / count).float()


def attainable_correlation(energy: torch.Tensor, correct: torch.Tensor) -> float:
    """The most negative Pearson r that ``energy [N]`` can have with a 0/1 ``correct [N]`` holding as many ones: its
    r with the ones moved onto the lowest energies (every right image below every wrong one) — the scale for
    :func:`energy_calibration`'s r, which a perfect ranking reaches and nothing passes.

    How tight the bound is depends on how the energy is spread (the point-biserial r): for a normal energy at an
    accuracy of 0.5 / 0.8 / 0.9 it is −0.80 / −0.70 / −0.58, whatever the energy knows; an energy of two values can
    reach −1. NaN when every image or none is right.
    """
    ideal = torch.zeros_like(energy, dtype=torch.float64)
    ideal[energy.argsort()[: int(correct.sum())]] = 1
    return pearson_r(energy, ideal)


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), labels).item()


def energy_calibration(logits: torch.Tensor, labels: torch.Tensor, energy: torch.Tensor) -> tuple[dict[str, Any], dict]:
    """Linear-probe confidence calibrated with and without the predictor's energy.

    ``p(y | x) ∝ exp(logit_y / T(x))`` with (a) ``T = 1``, (b) one fitted ``T``
    (Guo et al. 2017), (c) an energy-aware ``T(x) = T0 · exp(β · z(x))``, ``z``
    the standardized image energy — the JIN eq. 11 temperature made to depend
    on how surprising the context's targets were. ``T0, β`` are fit on the first
    half of the images, and ECE / NLL are measured on the second half. The
    Pearson r between image energy and probe correctness is over all images
    (JIN reports r = −0.83), beside the most negative r these energies and this accuracy allow
    (:func:`attainable_correlation`).

    Args:
        logits: ``[N, C]`` probe logits of the images; labels ``[N]``.
        energy: ``[N]`` mean predictor energy of each image's masked targets.
    """
    _, correct = top1_confidence(logits, labels)
    half = len(labels) // 2
    fit, test = slice(0, half), slice(half, None)
    z = (energy - energy[fit].mean()) / energy[fit].std().clamp_min(1e-8)

    T = fit_logit_temperature(logits[fit], labels[fit])
    best = None
    for beta in torch.linspace(-2, 2, 41).tolist():
        scaled = logits / torch.exp(beta * z)[:, None]
        t0 = fit_logit_temperature(scaled[fit], labels[fit])
        nll = _nll(scaled[fit] / t0, labels[fit])
        if best is None or nll < best[0]:
            best = (nll, beta, t0)
    _, beta, t0 = best
    energy_scaled = logits / (t0 * torch.exp(beta * z))[:, None]

    def score(lg: torch.Tensor) -> dict[str, float]:
        conf, ok = top1_confidence(lg[test], labels[test])
        return {"ece": expected_calibration_error(conf, ok), "nll": _nll(lg[test], labels[test])}

    out = {
        "images": len(labels),
        "energy_correct_pearson_r": pearson_r(energy, correct.double()),
        "energy_correct_pearson_r_attainable": attainable_correlation(energy, correct),
        "raw": score(logits),
        "temperature": {**score(logits / T), "T": T},
        "energy_temperature": {**score(energy_scaled), "T0": t0, "beta": beta},
    }
    curves = {}
    for name, lg in (("raw", logits), ("temperature", logits / T), ("energy temperature", energy_scaled)):
        conf, ok = top1_confidence(lg[test], labels[test])
        bin_conf, bin_acc, _ = reliability_curve(conf, ok, bins=10)
        keep = ~torch.isnan(bin_conf)
        curves[name] = {"confidence": bin_conf[keep].tolist(), "accuracy": bin_acc[keep].tolist()}
    plot = {"reliability": curves, "image": energy.tolist(), "image_correct": correct.tolist()}
    return out, plot
