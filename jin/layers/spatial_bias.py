"""Spatially-aware attention bias (JIN eq. 7-8)."""
from __future__ import annotations

import torch
from torch import nn


class SpatialBias(nn.Module):
    """Per-head attention bias from relative position and relative scale.

    ``B[b, h, i, j] = MLP(pos_i − pos_j, scale_i − scale_j)[h]`` (JIN eq. 7-8),
    added to the attention logits as the float ``attn_mask`` of
    ``scaled_dot_product_attention``. Offsets are measured in tokens of the
    finest grid and log-spaced as in Swin-V2's continuous position bias, so one
    MLP serves every level and every zoom view.

    The MLP is evaluated once per call on a table of every quantized offset —
    Δpos in half fine-token steps, Δscale in half octaves — and gathered per
    token pair. Tokens of any level sit on that lattice, so the bias is exact
    for grid tokens (zoom tokens are placed to within a quarter fine token) and
    costs a gather instead of an MLP per pair.

    Args:
        num_heads: attention heads (one bias map each).
        hidden: MLP width.
        grid: tokens per side of the finest grid (the unit of Δpos).
        max_scale_delta: largest |Δscale| (octaves) represented; larger ones are clamped.
    """

    def __init__(self, num_heads: int, hidden: int, grid: int, max_scale_delta: int = 4):
        super().__init__()
        self.grid, self.max_scale = grid, max_scale_delta
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, num_heads))
        pos = torch.arange(-2 * grid, 2 * grid + 1, dtype=torch.float32) / 2  # fine tokens
        scale = torch.arange(-2 * max_scale_delta, 2 * max_scale_delta + 1, dtype=torch.float32) / 2
        dx, dy, ds = torch.meshgrid(pos, pos, scale, indexing="ij")
        logpos = lambda v: torch.sign(v) * torch.log2(1.0 + v.abs())  # noqa: E731
        self.register_buffer("offsets", torch.stack([logpos(dx), logpos(dy), ds], -1).reshape(-1, 3), persistent=False)

    def index(self, coords: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3]`` coords → ``[B, N, N]`` row of every pair's offset in the table."""
        delta = coords[:, :, None, :] - coords[:, None, :, :]
        n_pos, n_scale = 4 * self.grid + 1, 4 * self.max_scale + 1
        q = torch.round(delta * torch.tensor([2.0 * self.grid, 2.0 * self.grid, 2.0], device=delta.device)).long()
        qx = q[..., 0].clamp(-2 * self.grid, 2 * self.grid) + 2 * self.grid
        qy = q[..., 1].clamp(-2 * self.grid, 2 * self.grid) + 2 * self.grid
        qs = q[..., 2].clamp(-2 * self.max_scale, 2 * self.max_scale) + 2 * self.max_scale
        return (qx * n_pos + qy) * n_scale + qs

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: ``[B, N, 3]`` (x, y, scale) → bias ``[B, heads, N, N]``.

        A batch whose coordinates are one expanded tensor (every image the
        same, e.g. the target view) is computed once and broadcast.
        """
        shared = coords.shape[0] > 1 and coords.stride(0) == 0
        idx = self.index(coords[:1] if shared else coords)
        table = self.mlp(self.offsets).T  # [heads, rows]
        bias = table[:, idx].transpose(0, 1)  # [B, heads, N, N]
        return bias.expand(coords.shape[0], -1, -1, -1) if shared else bias
