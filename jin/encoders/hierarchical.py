"""A modality through JIN's hierarchical encoder, as one modality of the hypermodal space (JIN §3.2.1)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..encoder import HierarchicalEncoder
from ..layers.coords import unit_layout
from ..layers.init import init_weights
from .base import ModalityEncoder, Tokens


def _legacy_projection_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written when the coarsest level was the only one in the shared space hold its projection at
    ``<prefix>proj.*``; it loads as ``<prefix>proj.0.*`` (the first of ``levels``, the coarsest)."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}proj.") and k[len(prefix) + 5:][:1].isalpha()]:
        state_dict[f"{prefix}proj.0.{key[len(prefix) + 5:]}"] = state_dict.pop(key)


class HierarchicalModalityEncoder(ModalityEncoder):
    """An input → JIN's levels (eq. 1) → the tokens of ``levels``, grouped by mask unit.

    The input is what the backbone's stem takes: an image ``[B, C, H, W]`` (its patch embedding), a log-mel
    spectrogram (:class:`~jin.encoders.audio.SpectrogramStem`), a clip (:class:`~jin.encoders.video.ClipStem`) or a
    point cloud (:class:`~jin.encoders.points.PillarStem`): every modality of JIN §3.2.1 that has a hierarchy, with
    coordinates ``(x, y, scale)`` on its own plane (image, pillar plane: position; spectrogram: time, frequency).
    The :class:`~jin.HierarchicalEncoder` runs as it does in the image JEPA — mask-unit attention below
    ``global_from``, 2×2 merges inside each unit, the spatial bias, adaptive computation and zoom as configured — on
    the mask units a mask keeps. Each chosen level, projected to the shared width ``dim`` and given the sin-cos
    position of its coordinates ``(x, y, scale)`` (the scale tells the levels apart), joins the shared space:
    the coarsest level has one token per mask unit, level ``l`` below it ``4^(L−1−l)``. Every level rides along in
    ``Tokens.levels`` for the cross-scale, budget and SIGReg losses. A backbone whose stem makes slices along a third
    axis (a clip's time steps, a point cloud's height: the encoder's ``slices``) has ``slices_l`` times as many tokens
    at the levels below the one that merges them; those share their cell's ``(x, y, scale)``, so they ride along in
    ``Tokens.levels`` but cannot join the shared space.

    Masks are drawn over mask units (:meth:`unit_coords`), and a unit's tokens are hidden or kept together
    (:meth:`unit_tokens`), as the backbone's merges need; where the input leaves cells of the level-0 grid empty
    (``cell_content``: a point cloud's pillars without a point), a unit's share of content is the mean over its
    cells (:meth:`unit_content`), and target blocks hide the units with content. Tokens are ordered level by level
    (as ``levels`` lists them), and by unit, then row-major inside the unit, within a level.

    In a model without a shared space (``dim=None``: one modality whose within-modality JEPA predicts its levels, so
    nothing reads shared-space tokens) the modality's tokens are its coarsest level's own, at that level's width:
    no projection, no position.

    Args:
        encoder: the hierarchical encoder (``model.*``; another modality's with its own stem and depths).
        dim: the shared width ``D`` (divisible by 6); ``None``: no shared space.
        levels: the levels whose tokens join the shared space (0 = finest); default: the coarsest only (the only
            choice without a shared space).
        read_levels: the levels some other loss reads; the output norms of the levels neither in ``levels`` nor in
            ``read_levels`` are frozen (no loss would train them).
        cell_content: input → ``[B, G, G]`` share of each level-0 cell that holds content (e.g.
            :func:`~jin.encoders.points.pillar_occupancy`); ``None``: every cell does (an image, a spectrogram, a clip).

    Raises:
        ValueError: a level the encoder does not have, a repeated one, or one of several slices (a clip's time steps
            below the level that merges them: their tokens share coordinates); levels other than the coarsest without
            a shared space.
    """

    mask_weights = (1.0, 1.0, 0.0)

    def __init__(self, encoder: HierarchicalEncoder, dim: int | None, levels: Sequence[int] | None = None,
                 read_levels: set[int] | None = None,
                 cell_content: Callable[[torch.Tensor], torch.Tensor] | None = None):
        nn.Module.__init__(self)  # the backbone's blocks are this modality's own: no extra stage
        top = encoder.levels - 1
        levels = [top] if levels is None else list(levels)
        if not levels or len(set(levels)) != len(levels) or not all(
            type(level) is int and 0 <= level <= top for level in levels
        ):
            raise ValueError(f"levels {levels}: distinct levels of the encoder's {encoder.levels} (0 … {top})")
        if dim is None and levels != [top]:
            raise ValueError(f"levels {levels}: without a shared space a modality's tokens are its coarsest level's "
                             f"({top})")
        sliced = [level for level in levels if encoder.slices[level] > 1]
        if sliced:
            raise ValueError(f"levels {levels}: level(s) {sliced} have {[encoder.slices[lv] for lv in sliced]} slices "
                             f"(a clip's time steps, a cloud's heights) whose tokens share their cell's (x, y, scale); "
                             f"only levels of one slice (from {encoder.slices.index(1)} up) join the shared space")
        # positions resolve the finest chosen level: about half its tokens per side (ModalityEncoder)
        self.dim, self.max_freq, self.causal = dim, encoder.grid / 2 ** min(levels) / 2, False
        self.backbone, self.levels, self.cell_content = encoder, levels, cell_content
        self.proj = nn.ModuleList(nn.Linear(encoder.dims[level], dim) for level in levels if dim is not None)
        self.proj.apply(init_weights)
        self.register_load_state_dict_pre_hook(_legacy_projection_keys)
        for level in range(encoder.levels):
            if level not in set(levels) | (read_levels or set()):
                encoder.norms[level].requires_grad_(False)
        self.per_unit = [encoder.tokens_per_unit(level) for level in levels]  # tokens of each chosen level in one unit
        self.register_buffer("unit_centres", encoder.coords(top)[0, :, 0], persistent=False)  # [U, 3]
        all_coords = [encoder.coords(level)[0].flatten(0, 1) for level in levels]  # [U·t_l, 3] each
        self.register_buffer("all_coords", torch.cat(all_coords), persistent=False)

    @property
    def num_units(self) -> int:
        return self.backbone.num_units

    @property
    def unit_grid(self) -> int:
        return self.backbone.unit_grid

    @property
    def num_tokens(self) -> int:
        return self.num_units * sum(self.per_unit)

    def unit_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit_centres.expand(x.shape[0], -1, -1)

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_coords.expand(x.shape[0], -1, -1)

    def unit_content(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, U]``: the mean of ``cell_content`` over each mask unit's level-0 cells (``None`` without it)."""
        if self.cell_content is None:
            return None
        return unit_layout(self.cell_content(x)[..., None], self.backbone.unit).mean((-2, -1))

    def unit_tokens(self, units: torch.Tensor) -> torch.Tensor:
        """Indices ``[..., K·Σ t_l]`` of the tokens of mask units ``units [..., K]`` among all ``num_tokens``."""
        parts, offset = [], 0
        for t in self.per_unit:
            inside = torch.arange(t, device=units.device)
            parts.append((offset + units[..., None] * t + inside).flatten(-2))
            offset += self.num_units * t
        return torch.cat(parts, -1)

    def level_positions(self, units: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Each chosen level's positions ``[M·K·t_l]`` among the ``M·K·Σ t_l`` tokens of the target units
        ``units [B, M, K]`` (:meth:`unit_tokens` order: per block, level by level); ``None`` with one level."""
        if len(self.levels) == 1:
            return None
        blocks, k = units.shape[-2:]
        per_block = k * sum(self.per_unit)
        start = torch.arange(blocks, device=units.device)[:, None] * per_block
        parts, offset = {}, 0
        for level, t in zip(self.levels, self.per_unit):
            parts[level] = (start + offset + torch.arange(k * t, device=units.device)).flatten()
            offset += k * t
        return parts

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """Tokens of the mask units at ``keep [B, K]`` (all when ``None``): ``[B, K·Σ t_l, D]``, coords
        ``[B, K·Σ t_l, 3]``, in the order of :meth:`unit_tokens` (without a shared space ``[B, K, D_L]``)."""
        levels = self.backbone(x, keep)
        if self.dim is None:  # no shared space: the coarsest level's own tokens
            return Tokens(levels[-1].features.flatten(1, 2), levels[-1].coords.flatten(1, 2), tuple(levels))
        features, coords = [], []
        for proj, level in zip(self.proj, self.levels):
            chosen = levels[level]
            c = chosen.coords.flatten(1, 2)
            features.append(proj(chosen.features.flatten(1, 2)) + self.position(c).to(chosen.features.dtype))
            coords.append(c)
        return Tokens(torch.cat(features, 1), torch.cat(coords, 1), tuple(levels))
