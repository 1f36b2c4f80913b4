"""Cross-scale bidirectional predictors between adjacent levels (JIN eq. 2-3)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def children(fine: torch.Tensor) -> torch.Tensor:
    """Group each 2×2 block of a unit's tokens: ``[B, U, s², D]`` → ``[B, U, (s/2)², 4·D]``."""
    B, U, T, D = fine.shape
    s = int(round(T**0.5))
    x = fine.view(B, U, s // 2, 2, s // 2, 2, D).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, U, T // 4, 4 * D)


def mlp(dim_in: int, dim_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class CrossScalePredictors(nn.Module):
    """Fine-to-coarse and coarse-to-fine predictors for every pair of adjacent levels.

    Fine-to-coarse (eq. 2): ``ĥ_{l+1} = g↑(concat of the 2×2 children at level l)``,
    regressed on ``sg[h_{l+1}]``. Coarse-to-fine (eq. 3): ``ĥ_l = g↓(h_{l+1})``
    predicts all four children, regressed on ``sg[h_l]``. ``sg`` is a
    stop-gradient: each direction teaches its predictor and its *input* level,
    never its target level.

    Args:
        dims: width per level (finest first).
        hidden: predictor MLP width (default: the coarser level's width).
    """

    def __init__(self, dims: Sequence[int], hidden: int | None = None):
        super().__init__()
        pairs = list(zip(dims[:-1], dims[1:]))
        self.up = nn.ModuleList(mlp(4 * f, c, hidden or c) for f, c in pairs)
        self.down = nn.ModuleList(mlp(c, 4 * f, hidden or c) for f, c in pairs)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: per level ``[B, U, T_l, D_l]`` (same units at every level) → scalar loss."""
        losses = []
        for l, (up, down) in enumerate(zip(self.up, self.down)):
            fine, coarse = children(features[l]), features[l + 1]
            losses.append(F.smooth_l1_loss(up(fine), coarse.detach()))  # eq. 2
            losses.append(F.smooth_l1_loss(down(coarse), fine.detach()))  # eq. 3
        return torch.stack(losses).mean()
