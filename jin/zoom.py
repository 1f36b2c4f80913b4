"""Foveal zoom views (Jin's AdaptiveZoomModule): crops around a predicted region of interest."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers.coords import grid_coords, sincos_embed


@dataclass
class ZoomTokens:
    """Extra tokens that join every level's attention.

    x: ``[B, Z, D]``, coords: ``[B, Z, 3]``, visible: ``[B, Z]`` bool (false where
    the token's centre lies in a hidden mask unit: no token attends to it, so a
    context encoder never sees the targets through a zoom view).
    """

    x: torch.Tensor
    coords: torch.Tensor
    visible: torch.Tensor

    def join(self, seq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append to ``seq [B, N, D]`` / ``pos [B, N, 3]``; returns (tokens, coords, valid keys ``[B, N+Z]``)."""
        grid_tokens = self.visible.new_ones(seq.shape[0], seq.shape[1])
        return torch.cat([seq, self.x], 1), torch.cat([pos, self.coords], 1), torch.cat([grid_tokens, self.visible], 1)

    def split(self, seq: torch.Tensor) -> tuple[torch.Tensor, "ZoomTokens"]:
        n = seq.shape[1] - self.x.shape[1]
        return seq[:, :n], ZoomTokens(seq[:, n:], self.coords, self.visible)

    def project(self, linear: nn.Module) -> "ZoomTokens":
        return ZoomTokens(linear(self.x), self.coords, self.visible)


class NoZoomTokens:
    """The extra tokens of an encoder without zoom views: none. Joins nothing (every key valid), splits off nothing."""

    def join(self, seq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return seq, pos, None

    def split(self, seq: torch.Tensor) -> tuple[torch.Tensor, "NoZoomTokens"]:
        return seq, self

    def project(self, linear: nn.Module) -> "NoZoomTokens":
        return self


class NoZoom(nn.Module):
    """The zoom of an encoder without foveal views (``zoom_factors`` empty): :class:`NoZoomTokens`, no parameters."""

    def forward(self, images: torch.Tensor, level0: torch.Tensor, units: torch.Tensor | None,
                patch_embed: nn.Module) -> NoZoomTokens:
        return NoZoomTokens()


class AdaptiveZoom(nn.Module):
    """Predict a region of interest and add crops of it at several zoom factors.

    An ROI network maps the mean visible patch embedding to a centre
    ``(cx, cy) = σ(MLP(·))``; for every zoom factor ``z`` a ``z × z`` crop around
    it (clamped inside the image) is resampled differentiably to
    ``tokens_per_side × patch_size`` pixels and patch-embedded with the
    encoder's own patch projection. Its tokens carry their true coordinates —
    centre inside the image and ``scale = log2(z / tokens_per_side)`` — and a
    learned embedding per zoom factor. Zoom factor 1 is the base view itself.

    A context encoder must not see the targets through a zoom view: pixels of
    hidden units are zeroed before cropping (a crop token may span several
    units), and tokens centred in hidden units are masked as attention keys.

    Args:
        dim: level-0 width.
        grid: tokens per side of the base view (positions embed as the base tokens do).
        unit_grid: mask units per side (for hiding zoom tokens that fall in hidden units).
        patch_size: pixels per patch side.
        factors: zoom factors < 1 (JIN: 0.5, 0.25, 0.125).
        tokens_per_side: tokens per crop side.
        hidden: ROI MLP width.
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        unit_grid: int,
        patch_size: int,
        factors: Sequence[float],
        tokens_per_side: int,
        hidden: int = 64,
    ):
        super().__init__()
        self.grid, self.unit_grid = grid, unit_grid
        self.patch_size = patch_size
        self.factors = [float(f) for f in factors if f < 1]
        self.tokens_per_side = tokens_per_side
        self.roi = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self.factor_embed = nn.Parameter(torch.zeros(len(self.factors), dim))
        self.register_buffer("local", grid_coords(tokens_per_side)[..., :2].reshape(-1, 2), persistent=False)

    def roi_centre(self, level0: torch.Tensor) -> torch.Tensor:
        """level0: ``[B, U, T, D]`` visible patch embeddings → ROI centre ``[B, 2]`` in (0, 1)."""
        return torch.sigmoid(self.roi(level0.mean(dim=(1, 2))))

    def forward(
        self, images: torch.Tensor, level0: torch.Tensor, units: torch.Tensor | None, patch_embed: nn.Module
    ) -> ZoomTokens:
        """Zoom tokens for ``images [B, C, H, W]`` given the visible level-0 tokens ``[B, U, T, D]``.

        ``patch_embed`` is the encoder's patch embedding, whose projection (``.proj``) is shared so crops and
        base view are embedded alike.
        """
        B = images.shape[0]
        n, p = self.tokens_per_side, self.patch_size
        # A diverged run's NaN weights must reach the trainer's NaN guard: grid_sample's CPU backward crashes the
        # process (segmentation fault, torch 2.14) on a NaN grid. Finite centres pass unchanged.
        centre = torch.nan_to_num(self.roi_centre(level0), nan=0.5)
        if units is not None:
            images = images * self.pixel_visibility(units, images.shape[-1]).to(images.dtype)
        tokens, coords = [], []
        for i, z in enumerate(self.factors):
            c = centre.clamp(z / 2, 1 - z / 2)  # [B, 2]
            theta = torch.zeros(B, 2, 3, device=images.device, dtype=images.dtype)
            theta[:, 0, 0] = theta[:, 1, 1] = z
            theta[:, :, 2] = (2 * c - 1).to(images.dtype)
            grid = F.affine_grid(theta, [B, images.shape[1], n * p, n * p], align_corners=False)
            crop = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
            t = patch_embed.proj(crop).flatten(2).transpose(1, 2)  # [B, n², D]
            xy = (c[:, None, :] - z / 2 + z * self.local).float()  # [B, n², 2]
            scale = xy.new_full((B, n * n, 1), math.log2(z / n))
            t = t + sincos_embed(xy, t.shape[-1], self.grid / 2).to(t.dtype) + self.factor_embed[i]
            tokens.append(t)
            coords.append(torch.cat([xy, scale], -1))
        x, xyz = torch.cat(tokens, 1), torch.cat(coords, 1)
        return ZoomTokens(x, xyz, self.visible(xyz, units, self.unit_grid))

    def pixel_visibility(self, units: torch.Tensor, size: int) -> torch.Tensor:
        """``[B, 1, size, size]``: 1 on pixels of visible units, 0 elsewhere."""
        B = units.shape[0]
        visible = torch.zeros(B, self.unit_grid**2, device=units.device).scatter_(1, units, 1.0)
        visible = visible.view(B, 1, self.unit_grid, self.unit_grid)
        return F.interpolate(visible, size=(size, size), mode="nearest")

    @staticmethod
    def visible(coords: torch.Tensor, units: torch.Tensor | None, unit_grid: int) -> torch.Tensor:
        """``[B, Z]`` bool: true for tokens whose centre lies in a visible unit (every token when ``units`` is None)."""
        B, Z, _ = coords.shape
        if units is None:
            return torch.ones(B, Z, dtype=torch.bool, device=coords.device)
        cell = (coords[..., :2] * unit_grid).long().clamp(0, unit_grid - 1)
        unit_of = cell[..., 1] * unit_grid + cell[..., 0]  # [B, Z]
        visible = torch.zeros(B, unit_grid**2, dtype=torch.bool, device=coords.device)
        visible.scatter_(1, units, True)
        return visible.gather(1, unit_of)
