"""3-D point clouds as point patches (Point-MAE): coordinates ``(x, y, z)`` of each patch centre."""
from __future__ import annotations

import torch
from torch import nn

from .base import ModalityEncoder


def farthest_point_sample(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of ``k`` farthest-point-sampled points of ``points [B, P, 3]``, starting at point 0
    (distinct indices, duplicate points included).

    ``k`` sequential steps, each vectorized over the batch and the points.
    """
    B, P, _ = points.shape
    index = points.new_zeros(B, k, dtype=torch.long)
    nearest = points.new_full((B, P), float("inf"))
    farthest = points.new_zeros(B, dtype=torch.long)
    batch = torch.arange(B, device=points.device)
    for i in range(k):
        index[:, i] = farthest
        centre = points[batch, farthest][:, None]  # [B, 1, 3]
        nearest = torch.minimum(nearest, ((points - centre) ** 2).sum(-1))
        nearest[batch, farthest] = -1.0  # never picked again, even where every other point is a duplicate (at 0)
        farthest = nearest.argmax(1)
    return index


def farthest_point_order(points: torch.Tensor) -> torch.Tensor:
    """``points [B, P, 3]`` reordered so that every prefix of ``k`` points is the ``k`` farthest-point samples
    (:func:`farthest_point_sample` from point 0, which is greedy, so one ordering serves every ``k``).

    A cloud is ordered once, where it is made (:class:`~prob_jepa.data.multimodal.PairedShapes` stores its clouds
    so); :class:`PointEncoder` then reads its patch centres as the first ``num_groups`` points, in every forward.
    """
    index = farthest_point_sample(points.float(), points.shape[1])
    return points.gather(1, index[..., None].expand(-1, -1, points.shape[-1]))


class PointEncoder(ModalityEncoder):
    """Points ``[B, P, 3]`` in ``[0, 1]³``, in farthest-point order (:func:`farthest_point_order`) → ``num_groups``
    patch tokens.

    Patch centres are the first ``num_groups`` points — the farthest-point samples of a cloud in that order, so the
    sampling runs once per cloud where the data is made, not in every forward; each patch is its centre's
    ``group_size`` nearest points, relative to the centre, embedded by a shared
    point-wise MLP and max-pooled (a mini-PointNet). Tokens are ordered by sampling
    order, so a mask is drawn from the coordinates, not from the order.

    References:
        Pang et al., Masked Autoencoders for Point Cloud Self-supervised Learning (Point-MAE, arXiv:2203.06604).
    """

    mask_weights = (1.0, 1.0, 1.0)

    def __init__(self, num_groups: int, group_size: int, dim: int, depth: int = 1, num_heads: int = 3,
                 mlp_ratio: float = 4.0, hidden: int = 64):
        super().__init__(dim, depth, num_heads, mlp_ratio, max_freq=num_groups ** (1 / 3))
        self.num_groups, self.group_size = num_groups, group_size
        self.point_mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.out = nn.Linear(dim, dim)
        self.init()

    @property
    def num_tokens(self) -> int:
        return self.num_groups

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < max(self.num_groups, self.group_size):
            need = max(self.num_groups, self.group_size)
            raise ValueError(f"{x.shape[1]} points; this encoder needs at least {need}")
        return x[:, : self.num_groups]

    def groups(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Each patch's points relative to its centre ``[B, G, group_size, 3]``."""
        # exact distances (not ‖a‖² + ‖b‖² − 2ab), so a centre is its own nearest point
        dist = torch.cdist(centres, x, compute_mode="donot_use_mm_for_euclid_dist")
        near = dist.topk(self.group_size, dim=-1, largest=False).indices  # [B, G, k]
        batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
        return x[batch, near] - centres[:, :, None]

    def embed(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.out(self.point_mlp(self.groups(x, coords)).amax(dim=2))


def pillar_index(points: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(column, row)`` pillar of every point of ``points [B, P, 3]`` in ``[0, 1]³`` on a ``grid × grid`` plane,
    ``[B, P, 2]`` (float), and its index among the batch's ``B · grid²`` pillars ``[B, P]`` (int64, row-major)."""
    cell = (points[..., :2] * grid).floor().clamp(0, grid - 1)
    batch = grid * grid * torch.arange(points.shape[0], device=points.device)[:, None]
    return cell, (cell[..., 1] * grid + cell[..., 0]).long() + batch


def pillar_occupancy(points: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, grid, grid]``: 1 where a pillar (rows ``y``, columns ``x``) holds a point of ``points [B, P, 3]``, else 0
    (:class:`PillarStem`'s empty pillars; what a target block of the point hierarchy hides first)."""
    _, pillar = pillar_index(points, grid)
    return _occupied(pillar, points.shape[0] * grid * grid).view(-1, grid, grid)


def _occupied(pillar: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]``: 1 at every pillar index in ``pillar`` (any shape, :func:`pillar_index`), else 0."""
    return torch.zeros(count, device=pillar.device).index_fill(0, pillar.flatten(), 1.0)


class PillarStem(nn.Module):
    """Points ``[B, P, 3]`` in ``[0, 1]³`` → level-0 grid of JIN's hierarchy for 3-D points (JIN §3.2.1: "voxel
    hierarchy"): ``[B, G, G, D]``, or ``[B, slices, G, G, D]`` with voxels.

    The cells are pillars (PointPillars, Lang et al., arXiv:1812.05784): the ``G × G`` cells of the ``(x, y)`` plane,
    each the full height, or with ``slices`` > 1 cut into that many voxels of ``1 / slices`` of the height. Every
    point's offset from its cell's centre (in cell widths and heights) passes through a point-wise MLP and is
    max-pooled per cell; an empty cell is a learned token; a LayerNorm brings both to the scale of the position
    embedding added next (the MLP's small initial weights alone leave its output ~1e-3 of it, and every cloud looked
    the same to the encoder at the start). The hierarchy's 2×2 merges make pillars of 2, 4, … cells; with voxels its
    merges also join pairs of height slices (2×2×2, :class:`~jin.HierarchicalEncoder`'s ``slices``) until one pillar
    spans the height, so the coarsest level has the project's three coordinates ``(x, y, scale)``. Vectorized: one
    ``scatter_reduce`` for the batch. The order of the points does not matter.
    """

    def __init__(self, grid: int, dim: int, hidden: int = 64, slices: int = 1):
        super().__init__()
        self.grid, self.slices = grid, slices
        self.point_mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.empty = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``[B, P, 3]`` → ``[B, G, G, D]`` (rows ``y``, columns ``x``), or ``[B, slices, G, G, D]`` (``z`` first)."""
        B, P, _ = points.shape
        G, S = self.grid, self.slices
        cell, pillar = pillar_index(points, G)
        height = (points[..., 2] * S).floor().clamp(0, S - 1)  # the voxel's slice
        offset = torch.cat([points[..., :2] * G - (cell + 0.5), points[..., 2:] * S - (height[..., None] + 0.5)], -1)
        features = self.point_mlp(offset)  # [B, P, D]
        D = features.shape[-1]
        voxel = pillar + (B * G * G) * height.long()  # slice-major: [S, B, G, G]
        count = S * B * G * G
        pooled = features.new_zeros(count, D).scatter_reduce(
            0, voxel.flatten()[:, None].expand(-1, D), features.flatten(0, 1), "amax", include_self=False
        )
        occupied = _occupied(voxel, count)[:, None] > 0
        pooled = torch.where(occupied, pooled, self.empty.to(pooled.dtype))
        out = self.norm(pooled).view(S, B, G, G, D)
        return out[0] if S == 1 else out.transpose(0, 1)
