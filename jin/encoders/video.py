"""Video as tubelets (V-JEPA) at one or more temporal levels: coordinates ``(x, y, t)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .base import ModalityEncoder


class VideoEncoder(ModalityEncoder):
    """Clip ``[B, T, C, H, W]`` → tubelet tokens at ``temporal_levels`` temporal resolutions.

    Level ``k`` cuts the clip into tubelets of ``pt·2^k`` frames × ``p × p`` pixels
    (``(T / (pt·2^k))·(H/p)·(W/p)`` tokens, time-major), each with its own projection
    and a learned level embedding; a token's ``t`` is the centre of its frames. Levels
    are concatenated, finest first, so the encoder attends across temporal scales
    (JIN's hierarchy along time).

    Block masks ignore time (``mask_weights = (1, 1, 0)``): a target is a spatial block
    through every frame *and every level*, V-JEPA's tube masking, so it cannot be copied
    from a neighbouring frame or from a coarser token over the same place.

    References:
        Bardes et al., Revisiting Feature Prediction for Learning Visual Representations from Video
        (V-JEPA, arXiv:2404.08471).

    Args:
        frames, img_size, in_chans: clip geometry; tubelet: ``(frames, pixels)`` of a level-0 token.
        temporal_levels: how many temporal resolutions (level ``k`` needs ``pt·2^k`` to divide ``frames``).
    """

    mask_weights = (1.0, 1.0, 0.0)

    def __init__(self, frames: int, img_size: int, tubelet: tuple[int, int], dim: int, depth: int = 1,
                 num_heads: int = 3, mlp_ratio: float = 4.0, in_chans: int = 3, temporal_levels: int = 1):
        pt, p = tubelet
        spans = [pt * 2**k for k in range(temporal_levels)]
        if temporal_levels < 1 or img_size % p or any(frames % s for s in spans):
            raise ValueError(
                f"tubelet {tuple(tubelet)} with {temporal_levels} temporal level(s) must divide the clip "
                f"({frames} frames of {img_size} px): level k spans tubelet frames × 2^k"
            )
        self.grid = img_size // p
        super().__init__(dim, depth, num_heads, mlp_ratio, max_freq=self.grid / 2)
        self.proj = nn.ModuleList(nn.Conv3d(in_chans, dim, kernel_size=(s, p, p), stride=(s, p, p)) for s in spans)
        self.level_embed = nn.Parameter(torch.zeros(temporal_levels, dim))
        s = (torch.arange(self.grid, dtype=torch.float32) + 0.5) / self.grid
        coords, levels = [], []
        for k, span in enumerate(spans):
            t = (torch.arange(frames // span, dtype=torch.float32) + 0.5) / (frames // span)
            tt, yy, xx = torch.meshgrid(t, s, s, indexing="ij")
            coords.append(torch.stack([xx, yy, tt], -1).reshape(-1, 3))
            levels.append(torch.full((len(coords[-1]),), k))
        self.register_buffer("grid_coords", torch.cat(coords), persistent=False)
        self.register_buffer("token_level", torch.cat(levels), persistent=False)
        self.init()
        if temporal_levels > 1:
            trunc_normal_(self.level_embed, std=0.02)

    @property
    def num_tokens(self) -> int:
        return len(self.grid_coords)

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid_coords.expand(x.shape[0], -1, -1)

    def embed(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        clip = x.transpose(1, 2)  # [B, C, T, H, W]
        tokens = torch.cat([proj(clip).flatten(2).transpose(1, 2) for proj in self.proj], 1)
        return tokens + self.level_embed[self.token_level]


class ClipStem(nn.Module):
    """Clip ``[B, T, C, H, W]`` → level-0 grid of JIN's hierarchy for video (JIN §3.2.1: "3D CNN with temporal
    z-JEPA levels"): ``[B, G, G, D]``, or ``[B, slices, G, G, D]`` with temporal levels.

    A 3-D convolution over tubelets of ``frames_per_tubelet`` frames × ``H/G`` × ``H/G`` pixels (V-JEPA's tubelets),
    GELU, then a temporal convolution that joins each run of ``T / (frames_per_tubelet · slices)`` tubelets of a
    place: a level-0 token is a spatial tube through ``T / slices`` frames at ``(x, y)``. With ``slices = 1`` it runs
    through the whole clip and the hierarchy's levels are spatial; with more, each of the encoder's merges also
    joins pairs of time steps (2×2×2) until one spans the clip (:class:`~jin.HierarchicalEncoder`'s ``slices``):
    temporal z-JEPA levels. Block masks hide spatial tubes through every frame (``mask_weights`` ignore time).

    Raises:
        ValueError: ``grid`` does not divide the frame side, or ``frames_per_tubelet · slices`` the clip.
    """

    def __init__(self, frames: int, img_size: int, frames_per_tubelet: int, grid: int, dim: int, in_chans: int = 3,
                 slices: int = 1):
        super().__init__()
        tubelets = frames // frames_per_tubelet
        if img_size % grid or frames % frames_per_tubelet or tubelets % slices:
            raise ValueError(f"a {grid}×{grid} grid of {frames_per_tubelet}-frame tubelets in {slices} time step(s) "
                             f"must divide the clip ({frames} frames of {img_size} px)")
        p, run = img_size // grid, tubelets // slices
        self.slices = slices
        self.tubelets = nn.Conv3d(in_chans, dim, kernel_size=(frames_per_tubelet, p, p), stride=(frames_per_tubelet, p, p))
        # one time step: the kernel spans every tubelet (stride 1, the convolution of before: same arithmetic)
        self.time = nn.Conv3d(dim, dim, kernel_size=(run, 1, 1), stride=(run, 1, 1) if slices > 1 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` → ``[B, G, G, D]`` (``slices = 1``) or ``[B, slices, G, G, D]``."""
        out = self.time(F.gelu(self.tubelets(x.transpose(1, 2)))).permute(0, 2, 3, 4, 1)  # [B, S, G, G, D]
        return out.squeeze(1) if self.slices == 1 else out
