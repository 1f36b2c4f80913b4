"""Cross-scale bidirectional predictors between adjacent levels (JIN eq. 2-3)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def children(fine: torch.Tensor, slices: int = 1) -> torch.Tensor:
    """Group the children of each coarser token: ``[B, U, S·s², D]`` (``S = slices``, slice-major) → ``[B, U,
    (s/2)², 4·D]`` for ``S = 1`` (each 2×2 block), ``[B, U, (S/2)·(s/2)², 8·D]`` for ``S > 1`` (each 2×2×2 block,
    as :class:`~jin.encoder.UnitMerge` merges them)."""
    B, U, T, D = fine.shape
    pair = min(slices, 2)  # slices merged per coarser token: 1 or 2
    s = int(round((T // slices) ** 0.5))
    x = fine.view(B, U, slices // pair, pair, s // 2, 2, s // 2, 2, D).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    return x.reshape(B, U, T // (4 * pair), 4 * pair * D)


def mlp(dim_in: int, dim_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class CrossScalePredictors(nn.Module):
    """Fine-to-coarse and coarse-to-fine predictors for every pair of adjacent levels.

    Fine-to-coarse (eq. 2): ``ĥ_{l+1} = g↑(concat of the 2×2 children at level l)``,
    regressed on ``sg[h_{l+1}]``. Coarse-to-fine (eq. 3): ``ĥ_l = g↓(h_{l+1})``
    predicts all four children, regressed on ``sg[h_l]``. ``sg`` is a
    stop-gradient: each direction teaches its predictor and its *input* level,
    never its target level. A hierarchy whose merge also halves slices (a
    clip's time steps, :class:`~jin.HierarchicalEncoder`'s ``slices``) has
    eight children per coarser token there, and its own pair of predictors.

    Args:
        dims: width per level (finest first).
        hidden: predictor MLP width (default: the coarser level's width).
        slices: the most level-0 slices of a hierarchy it scores (a hypermodal model's video with temporal levels, its
            points in voxels; 1: none): the first ``log2(slices)`` pairs of levels also get predictors of 2×2×2
            children.
    """

    def __init__(self, dims: Sequence[int], hidden: int | None = None, slices: int = 1):
        super().__init__()
        pairs = list(zip(dims[:-1], dims[1:]))
        self.up = nn.ModuleList(mlp(4 * f, c, hidden or c) for f, c in pairs)
        self.down = nn.ModuleList(mlp(c, 4 * f, hidden or c) for f, c in pairs)
        self.sliced = sum(slices // 2**level > 1 for level in range(len(pairs)))  # leading pairs that merge slices
        if self.sliced:
            self.up_sliced = nn.ModuleList(mlp(8 * f, c, hidden or c) for f, c in pairs[: self.sliced])
            self.down_sliced = nn.ModuleList(mlp(c, 8 * f, hidden or c) for f, c in pairs[: self.sliced])

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: per level ``[B, U, T_l, D_l]`` (same units at every level) → scalar loss. A pair of levels
        whose token counts differ eightfold merged slices too (2×2×2 children).

        Raises:
            ValueError: a pair of levels merged 2×2×2 without predictors for it (``slices``).
        """
        losses = []
        for l, (fine, coarse) in enumerate(zip(features[:-1], features[1:])):
            sliced = fine.shape[2] == 8 * coarse.shape[2]
            if sliced and l >= self.sliced:
                raise ValueError(f"levels {l} and {l + 1} merge 2×2×2 (slices); these predictors were built for "
                                 f"{self.sliced} such pair(s)")
            up, down = (self.up_sliced[l], self.down_sliced[l]) if sliced else (self.up[l], self.down[l])
            cells = 4 ** (len(features) - 1 - l)  # a unit's cells at level l: the rest of its tokens are slices
            grouped = children(fine, fine.shape[2] // cells if sliced else 1)
            losses.append(F.smooth_l1_loss(up(grouped), coarse.detach()))  # eq. 2
            losses.append(F.smooth_l1_loss(down(coarse), grouped.detach()))  # eq. 3
        return torch.stack(losses).mean()
