"""Building blocks shared by heads."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..config import is_count


def mlp(in_dim: int, hidden: int | Sequence[int] | None, out_dim: int) -> nn.Sequential:
    """``in_dim → hidden… → out_dim`` with SiLU between layers.

    ``hidden`` is one width, a list of widths, or ``0`` / ``None`` / ``[]`` for a single linear map.

    Raises:
        ValueError: a width in a list that is not a positive integer.
    """
    widths = [] if not hidden else [hidden] if isinstance(hidden, int) else list(hidden)
    if not all(is_count(w) for w in widths):
        raise ValueError(f"hidden={hidden!r}: positive layer widths (or 0 / null / [] for one linear map)")
    dims = [in_dim, *widths, out_dim]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])
