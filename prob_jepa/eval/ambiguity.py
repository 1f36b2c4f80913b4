"""Multimodality on the ``shapes`` ambiguity pairs: is the hidden marker's two-mode distribution recovered?"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ..data.shapes import AmbiguityPairs, Marker, Scene, ambiguity_pairs
from ..heads import Head
from ..masks import hide
from ..jepa import LevelJEPA
from .multimodality import axis_coordinates, axis_histogram, axis_position, mode_coverage, on_mode_share, sharpness


def marker_masks(pairs: AmbiguityPairs, unit_grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Context ``[n, U − K]``: every mask unit outside the marker; targets ``[n, 1, K]``: the marker's ``K`` units."""
    n, size = pairs.images.shape[1], pairs.images.shape[-1]
    hidden = torch.tensor(pairs.marker_units(size // unit_grid), device=device)
    return hide(hidden.expand(n, -1), unit_grid**2)


@torch.no_grad()
def ambiguity_metrics(
    model: LevelJEPA, head: Head, data: DictConfig, num_pairs: int, num_samples: int, device: torch.device, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mode coverage and sharpness of ``head`` on the marker region, against the known colour weights.

    Context: every mask unit outside the marker; target: the marker's units
    (one block), at the coarsest predicted level. The two true modes of each
    target token are the target encoder's features of the scene with either
    marker colour; their known weights are the marker's colour probabilities.
    Both the samples and the point prediction (``head.mean``) are scored, so
    the deterministic head shows what averaging does: the share of samples nearer
    each mode, the share nearer a mode than the midpoint (``on_mode``), the mean
    position along the axis from mode b (0) to mode a (1) and the sharpness.
    """
    marker = Marker.from_config(data.marker)
    pairs = ambiguity_pairs(num_pairs, data.image_size, seed, marker, Scene.from_config(data.scene))
    context, targets = marker_masks(pairs, model.context_encoder.unit_grid, device)
    images = pairs.images.to(device)

    cond = model.predict(images[0], context, targets).cond
    modes = [model.gather_targets(model.target_features(x), targets)[-1].flatten(0, 2) for x in images]
    cond = cond[-1].flatten(0, 2).float()
    a, b = modes[0].float(), modes[1].float()
    distinct = (a - b).norm(dim=-1) > 1e-4 * a.norm(dim=-1).clamp_min(1e-8)
    if not distinct.any():
        return {"error": "the target encoder maps both marker colours to the same features (collapse)"}, {}
    cond, a, b = cond[distinct], a[distinct], b[distinct]

    samples = head.sample(cond, num_samples)
    mean = head.mean(cond)[None]

    def scores(x: torch.Tensor) -> dict[str, float]:
        return {
            **mode_coverage(x, a, b, marker.weights),
            "on_mode": on_mode_share(x, a, b),
            "axis_position": axis_position(x, a, b),
            "sharpness": sharpness(x, a, b),
        }

    out = {
        "pairs": num_pairs,
        "rows": int(distinct.sum()),
        "weights": list(marker.weights),
        "samples": scores(samples),
        "mean": scores(mean),
    }
    shown = range(min(4, len(a)))
    plot = {
        "weights": list(marker.weights),
        "rows": [project(samples[:, r], a[r], b[r], mean[0, r]) for r in shown],
        "axis_histogram": axis_histogram(axis_coordinates(samples, a, b)),
        "mean_axis_histogram": axis_histogram(axis_coordinates(mean, a, b)),
    }
    return out, plot


def project(samples: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor) -> dict[str, list]:
    """One token in 2-D: x along the axis from mode b to mode a (midpoint at 0), y along the
    samples' main direction of spread orthogonal to it (their first principal component)."""
    a, b = a.double().cpu(), b.double().cpu()
    points = torch.cat([samples.double().cpu(), a[None], b[None], mean.double().cpu()[None]]) - (a + b) / 2
    axis = (a - b) / (a - b).norm()
    x = points @ axis
    residual = points - x[:, None] * axis
    spread = residual[:-3] - residual[:-3].mean(0)
    y = residual @ torch.linalg.svd(spread, full_matrices=False)[2][0]
    xy = torch.stack([x, y], 1).tolist()
    return {"samples": xy[:-3], "mode_a": xy[-3], "mode_b": xy[-2], "mean": xy[-1]}
