"""Building blocks shared by heads."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def mlp(in_dim: int, hidden: int | Sequence[int] | None, out_dim: int) -> nn.Sequential:
    """``in_dim → hidden… → out_dim`` with SiLU between layers.

    ``hidden`` is one width, a list of widths, or ``0`` / ``None`` / ``[]`` for a single linear map.
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden or [])
    dims = [in_dim, *[w for w in widths if w > 0], out_dim]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])
