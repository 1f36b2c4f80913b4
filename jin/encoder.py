"""The JIN hierarchical encoder (JIN eq. 1); ``levels=1`` is a plain ViT (I-JEPA)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from .layers.init import init_weights
from .layers.coords import grid_coords, sincos_embed, unit_layout
from .layers.spatial_bias import SpatialBias
from .layers.stage import AdaptiveStage, Stage, drop_path_rates
from .zoom import AdaptiveZoom, NoZoom, NoZoomTokens, ZoomTokens


class Level(NamedTuple):
    """One level's output.

    features: ``[B, U, T, D]`` (U mask units, T tokens per unit at this level: its slices × its grid cells),
    coords: ``[B, U, T, 3]`` (x, y, scale; a cell's slices share them), alpha: ``[B]`` computed fraction.
    """

    features: torch.Tensor
    coords: torch.Tensor
    alpha: torch.Tensor


class UnitMerge(nn.Module):
    """2×2 token merge inside each mask unit: linear ``D_l → D_{l+1}``, then max-pool (Hiera); with ``slices`` > 1
    at this level (a clip's time steps, a point cloud's height slices) each pair of slices merges too, 2×2×2."""

    def __init__(self, dim_in: int, dim_out: int, slices: int = 1):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.slices = slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, U, S·s², D_l]`` (slice-major) → ``[B, U, max(S/2, 1)·(s/2)², D_{l+1}]``."""
        B, U, T, _ = x.shape
        S, pair = self.slices, min(self.slices, 2)  # slices merged per coarser token: 1 or 2
        s = int(round((T // S) ** 0.5))
        x = self.proj(x).view(B, U, S // pair, pair, s // 2, 2, s // 2, 2, -1)
        return x.amax(dim=(3, 5, 7)).reshape(B, U, T // (4 * pair), -1)


def attend_within_units(stage: Stage, x: torch.Tensor, coords: torch.Tensor, extra: ZoomTokens | NoZoomTokens,
                        window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ZoomTokens | NoZoomTokens]:
    """Mask-unit attention (Hiera): each of the ``U`` units of ``x [B, U, T, D]`` is an independent window whose
    tokens sit at the same offsets ``window [1, T, 3]``; zoom tokens pass by. Returns (``[B, U, T, D]``, α ``[B]``,
    the zoom tokens)."""
    B, U, T, D = x.shape
    seq, alpha = stage(x.reshape(B * U, T, D), window.expand(B * U, -1, -1))
    return seq.reshape(B, U, T, D), alpha.view(B, U).mean(1), extra


def attend_globally(stage: Stage, x: torch.Tensor, coords: torch.Tensor, extra: ZoomTokens | NoZoomTokens,
                    window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ZoomTokens | NoZoomTokens]:
    """Every token of ``x [B, U, T, D]`` (at ``coords [B, U, T, 3]``) and the zoom tokens in one attention. Returns
    (``[B, U, T, D]``, α ``[B]``, the zoom tokens after the stage)."""
    B, U, T, D = x.shape
    seq, seq_coords, valid = extra.join(x.reshape(B, U * T, D), coords.reshape(B, U * T, 3))
    seq, alpha = stage(seq, seq_coords, valid=valid)
    seq, extra = extra.split(seq)
    return seq.reshape(B, U, T, D), alpha, extra


class HierarchicalEncoder(nn.Module):
    """JIN hierarchical encoder: L levels, level l+1 tokens are 2×2 merges of level l (JIN eq. 1; 2×2×2 while a
    level has several ``slices``).

    Tokens are kept grouped by *mask unit* — one token of the coarsest level,
    ``2^(L-1) × 2^(L-1)`` tokens of the finest (times its slices) — so an encoder given only the
    visible units (``units``) processes only context tokens at every level and
    merges stay inside units (Hiera). Levels below ``global_from`` attend
    within their mask unit only (Hiera's mask-unit attention, which keeps the
    finest levels affordable at 224 px); the others attend globally.
    ``levels=1`` makes a unit one patch and the model a plain ViT with fixed
    sin-cos positions, i.e. I-JEPA's encoder.

    Args:
        img_size, patch_size, in_chans: input geometry.
        dims, depths, num_heads: per-level width, number of blocks, heads.
        mlp_ratio, drop_path_rate, dropout: block hyper-parameters.
        spatial_bias: add the JIN eq. 7-8 bias in every level's attention.
        bias_hidden: width of the bias MLP.
        adaptive: use :class:`AdaptiveStage` (JIN eq. 4) at every level (at a
            mask-unit-attention level, α and the top-k are per unit).
        capacity: per level, the fraction of tokens an adaptive level's blocks see
            (its static top-k); default 1 at every level.
        global_from: first level with global attention (0: all levels global).
        zoom_factors: zoom factors < 1 of the foveal views (:class:`AdaptiveZoom`);
            empty for none.
        zoom_tokens: tokens per side of each zoom crop.
        stem: the tokenizer of the level-0 grid for another modality (``[B, …] → [B, G, G, dims[0]]`` with
            ``G = img_size / patch_size``, or ``[B, slices, G, G, dims[0]]``: a spectrogram CNN, a clip's 3-D CNN,
            a point cloud's pillars; JIN §3.2.1); ``None``: timm's ``PatchEmbed`` of ``in_chans``-channel images.
            Zoom crops images, so it needs the image stem.
        slices: level-0 slices of the stem's grid along a third axis (a clip's time steps: JIN §3.2.1's temporal
            z-JEPA levels; a point cloud's height: its voxel hierarchy), a power of 2 up to ``2^(levels-1)``; each
            merge halves them (2×2×2) until one is left, so the coarsest level has one token per mask unit. A slice
            has a learned embedding; its tokens share their cell's ``(x, y, scale)``, so the spatial bias is spatial
            only.

    Raises:
        ValueError: lists of different lengths; a grid the levels cannot merge; zoom with another stem; slices that
            are not a power of 2 up to ``2^(levels-1)`` or without a stem.

    References:
        JIN eq. 1, 4, 7-8; Ryali et al., "Hiera" (arXiv:2306.00989);
        Assran et al., "I-JEPA" (arXiv:2301.08243).
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        spatial_bias: bool = False,
        bias_hidden: int = 16,
        adaptive: bool = False,
        capacity: Sequence[float] | None = None,
        global_from: int = 0,
        zoom_factors: Sequence[float] = (),
        zoom_tokens: int = 2,
        stem: nn.Module | None = None,
        slices: int = 1,
    ):
        super().__init__()
        if not len(dims) == len(depths) == len(num_heads):
            raise ValueError(f"dims {list(dims)}, depths {list(depths)}, num_heads {list(num_heads)} differ in length")
        self.levels = len(dims)
        self.dims = list(dims)
        self.grid = img_size // patch_size
        self.unit = 2 ** (self.levels - 1)
        if img_size % patch_size or self.grid % self.unit:
            raise ValueError(
                f"img_size {img_size} / patch_size {patch_size} = {img_size / patch_size} tokens per side must be "
                f"an integer divisible by 2^(levels-1) = {self.unit}"
            )
        self.unit_grid = self.grid // self.unit
        self.global_from = global_from
        if stem is not None and len(zoom_factors):
            raise ValueError(f"zoom_factors {list(zoom_factors)}: zoom crops images, and this encoder has its own stem")
        if slices < 1 or slices & (slices - 1) or slices > self.unit or (slices > 1 and stem is None):
            raise ValueError(f"slices={slices} must be a power of 2 up to 2^(levels-1) = {self.unit} (the merges halve "
                             f"them to one), and more than one needs a stem that makes them")
        self.slices = [max(slices // 2**level, 1) for level in range(self.levels)]  # per level
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dims[0], output_fmt="NHWC") if stem is None else stem

        coords0 = grid_coords(self.grid)
        self.register_buffer("pos_embed", sincos_embed(coords0[..., :2], dims[0], self.grid / 2), persistent=False)
        for level in range(self.levels):
            side = self.grid // 2**level
            cells = unit_layout(grid_coords(side), side // self.unit_grid)  # [U, cells, 3]
            self.register_buffer(f"coords_{level}", cells.repeat(1, self.slices[level], 1), persistent=False)

        rates = drop_path_rates(drop_path_rate, sum(depths))
        capacity = [1.0] * self.levels if capacity is None else list(capacity)
        if len(capacity) != self.levels:
            raise ValueError(f"capacity {capacity} must give one fraction per level ({self.levels})")
        self.stages = nn.ModuleList()
        for level, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            bias = SpatialBias(heads, bias_hidden, self.grid) if spatial_bias else None
            args = (dim, depth, heads, mlp_ratio, rates[sum(depths[:level]) : sum(depths[: level + 1])], bias, dropout)
            self.stages.append(AdaptiveStage(*args, capacity=capacity[level]) if adaptive else Stage(*args))
        self.merges = nn.ModuleList(UnitMerge(a, b, s) for a, b, s in zip(dims[:-1], dims[1:], self.slices))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.zoom = (
            AdaptiveZoom(dims[0], self.grid, self.unit_grid, patch_size, zoom_factors, zoom_tokens)
            if len(zoom_factors)
            else NoZoom()
        )
        self.attention = [attend_within_units if level < global_from else attend_globally for level in range(self.levels)]
        self.apply(init_weights)
        for stage in self.stages:
            stage.init_router()
        if slices > 1:
            self.slice_embed = nn.Parameter(torch.zeros(slices, dims[0]))
            trunc_normal_(self.slice_embed, std=0.02)

    @property
    def num_units(self) -> int:
        return self.unit_grid**2

    def tokens_per_unit(self, level: int) -> int:
        """Tokens of one mask unit at ``level``: its slices × ``(2^(levels-1-level))²`` cells."""
        return self.slices[level] * 4 ** (self.levels - 1 - level)

    def coords(self, level: int, units: torch.Tensor | None = None, batch: int = 1) -> torch.Tensor:
        """Coordinates of level ``level`` tokens: ``[B, U, T, 3]`` for ``units [B, U]`` (all units if ``None``)."""
        c = getattr(self, f"coords_{level}")
        return c.expand(batch, -1, -1, -1) if units is None else c[units]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, units: torch.Tensor | None = None) -> list[Level]:
        """Encode the given mask units of ``images``.

        Args:
            images: ``[B, C, H, W]`` (or what ``stem`` takes).
            units: ``[B, U]`` int64 indices of the mask units to encode (the
                context); ``None`` encodes all ``unit_grid²`` units (the target view).
        Returns:
            one :class:`Level` per level, finest first.
        """
        B = images.shape[0]
        x = self.patch_embed(images)
        if x.ndim != (4 if self.slices[0] == 1 else 5):
            raise ValueError(f"the stem gave {list(x.shape)}; this encoder has slices={self.slices[0]}: "
                             f"[B, G, G, D] for 1, [B, slices, G, G, D] for more")
        x = x + self.pos_embed.to(images.dtype)  # [B, G, G, D0] or [B, S, G, G, D0]
        if self.slices[0] > 1:  # [B, S, U_all, u², D0] → [B, U_all, S·u², D0], slice-major inside a unit
            x = unit_layout(x + self.slice_embed[:, None, None].to(x.dtype), self.unit).transpose(1, 2).flatten(2, 3)
        else:
            x = unit_layout(x, self.unit)  # [B, U_all, u², D0]
        if units is not None:
            x = x[torch.arange(B, device=x.device)[:, None], units]
        extra = self.zoom(images, x, units, self.patch_embed)
        levels = []
        for level, stage in enumerate(self.stages):
            coords = self.coords(level, units, B)
            window = getattr(self, f"coords_{level}")[:1]  # [1, T, 3]: a unit's token offsets, the same in every unit
            x, alpha, extra = self.attention[level](stage, x, coords, extra, window)
            levels.append(Level(self.norms[level](x), coords, alpha))
            if level + 1 < self.levels:
                x, extra = self.merges[level](x), extra.project(self.merges[level].proj)
        return levels
