"""Token coordinates: every token knows where it is.

A coordinate is ``(x, y, scale)``: the token centre in normalized image
position ``[0, 1]²`` and ``scale = log2(token side / image side)``. A token of
an ``G × G`` grid has ``scale = -log2(G)``; a zoomed-in view with zoom factor
``z`` has tokens ``log2(z)`` smaller. Levels, zoom views and (later) other
modalities all use this one convention.
"""
from __future__ import annotations

import math

import torch


def grid_coords(rows: int, cols: int | None = None) -> torch.Tensor:
    """Centres of a ``rows × cols`` token grid covering the whole image.

    Returns:
        ``[rows, cols, 3]`` float tensor of ``(x, y, scale)``.
    """
    cols = rows if cols is None else cols
    y = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    x = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    scale = torch.full_like(xx, -math.log2(max(rows, cols)))
    return torch.stack([xx, yy, scale], dim=-1)


def unit_layout(grid: torch.Tensor, unit: int) -> torch.Tensor:
    """Regroup a ``[..., G, G, C]`` grid into mask units of ``unit × unit`` tokens.

    Returns ``[..., (G/unit)², unit², C]``: units in row-major order, tokens
    inside a unit in row-major order, so a 2×2 merge of a unit's tokens is a reshape.
    """
    *lead, g, _, c = grid.shape
    gu = g // unit
    x = grid.reshape(*lead, gu, unit, gu, unit, c).transpose(-4, -3)
    return x.reshape(*lead, gu * gu, unit * unit, c)


def sincos_embed(coords: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """Fixed sinusoidal embedding of continuous coordinates.

    Each of the ``k`` coordinates gets ``dim / k`` channels (sin and cos at
    geometrically spaced frequencies from 1 to ``max_freq`` cycles per unit),
    so a grid of ``2 * max_freq`` tokens is resolved at its finest frequency.
    This is I-JEPA's 2-D sin-cos embedding made continuous, so zoom views and
    levels embed their true positions.

    Args:
        coords: ``[..., k]``.
        dim: output channels; must be divisible by ``2k``.
        max_freq: highest frequency, in cycles per coordinate unit.
    Returns:
        ``[..., dim]``.
    """
    k = coords.shape[-1]
    if dim % (2 * k):
        raise ValueError(f"sincos_embed: dim={dim} must be divisible by 2*{k}")
    n = dim // (2 * k)
    exponents = torch.arange(n, device=coords.device, dtype=torch.float32) / max(n - 1, 1)
    freqs = math.pi * max_freq ** exponents  # [n]
    angles = coords.float()[..., None] * freqs  # [..., k, n]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [..., k, 2n]
    return emb.flatten(-2)
