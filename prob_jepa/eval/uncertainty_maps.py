"""Where in an image a head is uncertain: every mask unit in turn predicted from all the others."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import Head
from ..model import JEPA


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
    grid = lo + (hi - lo) * torch.linspace(0, 1, bins)  # [N, bins]
    density = torch.exp(-0.5 * ((grid[..., None] - z[:, None]) / bandwidth[..., None]) ** 2).sum(-1)  # [N, bins]
    inner = density[:, 1:-1]
    peak = (inner > density[:, :-2]) & (inner >= density[:, 2:]) & (inner >= min_height * density.amax(1, keepdim=True))
    return peak.sum(1).clamp_min(1).float()


@torch.no_grad()
def unit_uncertainty(model: JEPA, head: Head, images: torch.Tensor, num_samples: int) -> UnitMaps:
    """Each of the ``U`` mask units in turn is the one target block, the other ``U − 1`` the context.

    Args:
        model: a JEPA; ``head`` predicts its coarsest predicted level (``model.heads[-1]``).
        images: ``[B, 3, H, W]`` on the model's device.
        num_samples: head samples per target token for the spread and the modes.
    Returns:
        :class:`UnitMaps` (CPU, fp32).
    """
    enc = model.context_encoder
    U, G = enc.num_units, enc.unit_grid
    device = images.device
    units = torch.arange(U, device=device)
    context = units.expand(U, U)[~torch.eye(U, dtype=torch.bool, device=device)].view(U, U - 1)
    targets = units.view(U, 1, 1)
    nll, spread, modes = [], [], []
    for image in images:
        batch = image.expand(U, -1, -1, -1)
        _, cond = model.predict(batch, context, targets)
        target = model.gather_targets([t.expand(U, -1, -1, -1) for t in model.target_features(image[None])], targets)
        c, y = cond[-1].flatten(0, 2).float(), target[-1].flatten(0, 2).float()  # [U·T, C], [U·T, D]
        tokens = len(c) // U
        nll.append((-head.log_prob(y, c) / head.dim).view(U, tokens).mean(1))
        samples = head.sample(c, num_samples).float()  # [S, U·T, D]
        spread.append(samples.std(0).mean(-1).view(U, tokens).mean(1))
        modes.append(count_modes(samples).view(U, tokens).mean(1))
    as_maps = lambda rows: torch.stack(rows).view(len(images), G, G).cpu()  # noqa: E731
    return UnitMaps(as_maps(nll), as_maps(spread), as_maps(modes))


def region_means(maps: UnitMaps, region: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean of each map inside and outside ``region`` (a boolean ``[G, G]`` unit mask), over images."""
    out = {}
    for name in ("nll", "spread", "modes"):
        m = getattr(maps, name)
        out[name] = {"inside": m[:, region].mean().item(), "outside": m[:, ~region].mean().item()}
    return out

