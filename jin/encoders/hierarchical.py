"""An image through JIN's hierarchical encoder, as one modality of the hypermodal space."""
from __future__ import annotations

import torch
from torch import nn

from ..encoder import HierarchicalEncoder
from ..layers.init import init_weights
from .base import ModalityEncoder, Tokens


class HierarchicalImageEncoder(ModalityEncoder):
    """``[B, C, H, W]`` → JIN's levels (eq. 1) → the coarsest level's tokens, one per mask unit, row-major.

    The :class:`~jin.HierarchicalEncoder` runs as it does in the image JEPA — mask-unit attention below
    ``global_from``, 2×2 merges inside each unit, the spatial bias, adaptive computation and zoom as configured — on
    the units a mask keeps. Its coarsest level, projected to the shared width ``dim`` and given the sin-cos position of
    its coordinates ``(x, y, scale)``, is this modality's tokens; every level rides along in ``Tokens.levels`` for
    the cross-scale, budget and SIGReg losses. Masks are drawn over mask units (the coarsest level's tokens).

    Args:
        encoder: the hierarchical encoder (``model.*``).
        dim: the shared width ``D`` (divisible by 6).
        read_levels: the levels some loss reads; the output norms of the others are frozen (no loss would train
            them). Default: the coarsest only.
    """

    mask_weights = (1.0, 1.0, 0.0)

    def __init__(self, encoder: HierarchicalEncoder, dim: int, read_levels: set[int] | None = None):
        nn.Module.__init__(self)  # the backbone's blocks are this modality's own: no extra stage
        self.dim, self.max_freq, self.causal = dim, encoder.unit_grid / 2, False
        self.backbone = encoder
        self.proj = nn.Linear(encoder.dims[-1], dim)
        self.proj.apply(init_weights)
        top = encoder.levels - 1
        for level in range(encoder.levels):
            if level not in (read_levels or {top}) | {top}:
                encoder.norms[level].requires_grad_(False)
        self.register_buffer("unit_coords", encoder.coords(top)[0, :, 0], persistent=False)  # [U, 3]

    @property
    def num_tokens(self) -> int:
        return self.backbone.num_units

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit_coords.expand(x.shape[0], -1, -1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """Tokens of the mask units at ``keep [B, K]`` (all when ``None``): ``[B, K, D]``, coords ``[B, K, 3]``."""
        levels = self.backbone(x, keep)
        top = levels[-1]
        coords = top.coords.flatten(1, 2)
        features = self.proj(top.features.flatten(1, 2)) + self.position(coords).to(top.features.dtype)
        return Tokens(features, coords, tuple(levels))
