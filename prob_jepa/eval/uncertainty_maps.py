"""Where in an image a head is uncertain: every block of mask units in turn predicted from all the others."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import Head
from ..masks import hide
from ..jepa import LevelJEPA


@dataclass
class UnitMaps:
    """Per image and mask unit ``[B, G, G]`` (G = units per side), at the coarsest predicted level.

    nll: the head's NLL of the true target, nats per dimension (mean over the unit's tokens);
    spread: the samples' standard deviation, averaged over dimensions and tokens (target units);
    modes: modes among the samples along their first principal axis (:func:`count_modes`), mean over tokens.
    """

    nll: torch.Tensor
    spread: torch.Tensor
    modes: torch.Tensor


def count_modes(samples: torch.Tensor, bins: int = 64, min_height: float = 0.1) -> torch.Tensor:
    """Modes of each row's sample cloud along its first principal axis: ``[S, N, D]`` → ``[N]``.

    The samples are projected on their top principal direction; a Gaussian kernel density with
    Silverman's bandwidth is evaluated on ``bins`` points over their range, and local maxima at
    least ``min_height`` × the highest one are counted (1 for a unimodal cloud, 2 for two clusters).
    """
    S, N, _ = samples.shape
    x = samples.float().transpose(0, 1)  # [N, S, D]
    x = x - x.mean(1, keepdim=True)
    direction = torch.linalg.svd(x, full_matrices=False).Vh[:, 0]  # [N, D]
    z = (x @ direction[..., None]).squeeze(-1)  # [N, S]
    std = z.std(1, keepdim=True).clamp_min(1e-8)
    bandwidth = 1.06 * std * S ** (-1 / 5)
    lo, hi = z.min(1, keepdim=True).values - bandwidth, z.max(1, keepdim=True).values + bandwidth
    grid = lo + (hi - lo) * torch.linspace(0, 1, bins, device=z.device)  # [N, bins]
    density = torch.exp(-0.5 * ((grid[..., None] - z[:, None]) / bandwidth[..., None]) ** 2).sum(-1)  # [N, bins]
    inner = density[:, 1:-1]
    peak = (inner > density[:, :-2]) & (inner >= density[:, 2:]) & (inner >= min_height * density.amax(1, keepdim=True))
    return peak.sum(1).clamp_min(1).float()


def covering_blocks(unit_grid: int, block: int) -> list[list[int]]:
    """Square blocks of ``block × block`` mask units that tile a ``unit_grid × unit_grid`` grid (row-major unit
    indices; blocks on the last row and column are cut to the grid).

    Raises:
        ValueError: unless ``1 <= block < unit_grid`` (a block must leave context).
    """
    if not 1 <= block < unit_grid:
        raise ValueError(f"eval.map_block={block} must be at least 1 and below the {unit_grid} mask units per side")
    starts = range(0, unit_grid, block)
    return [
        [r * unit_grid + c for r in range(r0, min(r0 + block, unit_grid)) for c in range(c0, min(c0 + block, unit_grid))]
        for r0 in starts for c0 in starts
    ]


@torch.no_grad()
def unit_uncertainty(model: LevelJEPA, head: Head, images: torch.Tensor, num_samples: int, block: int = 1) -> UnitMaps:
    """Each block of :func:`covering_blocks` in turn is the one target block, every other mask unit the context;
    every unit's values come from the prediction in which its block was hidden.

    Args:
        model: the image at its levels (:meth:`~prob_jepa.jepa.JEPA.level_jepa`); ``head`` predicts its coarsest
            predicted level (``model.heads[-1]``).
        images: ``[B, 3, H, W]`` on the model's device.
        num_samples: head samples per target token for the spread and the modes.
        block: mask units per side of a hidden block (1: every unit alone, predicted from all the others).
    Returns:
        :class:`UnitMaps` (CPU, fp32).
    Raises:
        ValueError: for a ``block`` that leaves no context.
    """
    enc = model.context_encoder
    U, G = enc.num_units, enc.unit_grid
    device = images.device
    by_size: dict[int, list[list[int]]] = {}
    for units in covering_blocks(G, block):
        by_size.setdefault(len(units), []).append(units)
    groups = [hide(torch.tensor(blocks, device=device), U) for blocks in by_size.values()]  # blocks of one size
    maps = {name: torch.zeros(len(images), U) for name in ("nll", "spread", "modes")}
    for i, image in enumerate(images):
        target_all = model.target_features(image[None])
        for context, targets in groups:
            n = len(targets)
            cond = model.predict(image.expand(n, -1, -1, -1), context, targets).cond
            target = model.gather_targets([t.expand(n, -1, -1, -1) for t in target_all], targets)
            c, y = cond[-1].flatten(0, 2).float(), target[-1].flatten(0, 2).float()  # [n·K·T, C], [n·K·T, D]
            where = targets.flatten().cpu()  # the hidden units, in the order of the rows' blocks
            per_unit = lambda v: v.view(len(where), -1).mean(1).cpu()  # noqa: E731  tokens → units
            samples = head.sample(c, num_samples).float()  # [S, n·K·T, D]
            maps["nll"][i, where] = per_unit(-head.log_prob(y, c) / head.dim)
            maps["spread"][i, where] = per_unit(samples.std(0).mean(-1))
            maps["modes"][i, where] = per_unit(count_modes(samples))
    return UnitMaps(*(maps[k].view(len(images), G, G) for k in ("nll", "spread", "modes")))


def mirrored(region: torch.Tensor) -> torch.Tensor:
    """The mirror images of a boolean unit mask ``[G, G]`` across the vertical, horizontal and both axes, minus
    ``region`` itself: units in the same kind of place (a corner for a corner) but elsewhere in the image."""
    return (region.flip(0) | region.flip(1) | region.flip(0, 1)) & ~region


def region_means(maps: UnitMaps, region: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean of each map over images, inside ``region`` (a boolean ``[G, G]`` unit mask), over its
    :func:`mirrored` units (``mirrored``, when there are any) and over all units outside it (``outside``)."""
    regions = {"inside": region, "mirrored": mirrored(region), "outside": ~region}
    return {
        name: {k: getattr(maps, name)[:, r].mean().item() for k, r in regions.items() if r.any()}
        for name in ("nll", "spread", "modes")
    }
