"""Spatially-aware attention bias (JIN eq. 7-8)."""
from __future__ import annotations

import torch
from torch import nn


class SpatialBias(nn.Module):
    """Per-head attention bias from relative position and relative scale.

    ``B[b, h, i, j] = MLP(pos_i - pos_j, scale_i - scale_j)[h]`` (JIN eq. 7-8),
    added to the attention logits as the float ``attn_mask`` of
    ``scaled_dot_product_attention``. Position offsets are measured in tokens
    of the finest grid and log-spaced as in Swin-V2's continuous position bias,
    so one MLP serves every level and every zoom view.

    Args:
        num_heads: attention heads (one bias map each).
        hidden: MLP width.
        grid: tokens per side of the finest grid (the unit of Δpos).
    """

    def __init__(self, num_heads: int, hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, num_heads))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: ``[B, N, 3]`` (x, y, scale) → bias ``[B, heads, N, N]``."""
        delta = coords[:, :, None, :] - coords[:, None, :, :]  # [B, N, N, 3]
        pos = delta[..., :2] * self.grid
        pos = torch.sign(pos) * torch.log2(1.0 + pos.abs())
        rel = torch.cat([pos, delta[..., 2:]], dim=-1)
        return self.mlp(rel).permute(0, 3, 1, 2)
