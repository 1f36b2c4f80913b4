"""Video as tubelets (V-JEPA): coordinates ``(x, y, t)``."""
from __future__ import annotations

import torch
from torch import nn

from .base import ModalityEncoder


class VideoEncoder(ModalityEncoder):
    """Clip ``[B, T, C, H, W]`` → ``(T/pt)·(H/p)·(W/p)`` tubelet tokens (time-major order).

    Block masks ignore time (``mask_weights = (1, 1, 0)``): a target is a spatial block
    through every frame, V-JEPA's tube masking, so it cannot be copied from a neighbouring frame.

    References:
        Bardes et al., Revisiting Feature Prediction for Learning Visual Representations from Video
        (V-JEPA, arXiv:2404.08471).

    Args:
        frames, img_size, in_chans: clip geometry; tubelet: ``(frames, pixels)`` per token side.
    """

    mask_weights = (1.0, 1.0, 0.0)

    def __init__(self, frames: int, img_size: int, tubelet: tuple[int, int], dim: int, depth: int = 1,
                 num_heads: int = 3, mlp_ratio: float = 4.0, in_chans: int = 3):
        pt, p = tubelet
        if frames % pt or img_size % p:
            raise ValueError(f"tubelet {tuple(tubelet)} must divide the clip ({frames} frames of {img_size} px)")
        self.steps, self.grid = frames // pt, img_size // p
        super().__init__(dim, depth, num_heads, mlp_ratio, max_freq=self.grid / 2)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(pt, p, p), stride=(pt, p, p))
        t = (torch.arange(self.steps, dtype=torch.float32) + 0.5) / self.steps
        s = (torch.arange(self.grid, dtype=torch.float32) + 0.5) / self.grid
        tt, yy, xx = torch.meshgrid(t, s, s, indexing="ij")
        self.register_buffer("grid_coords", torch.stack([xx, yy, tt], -1).reshape(-1, 3), persistent=False)
        self.init()

    @property
    def num_tokens(self) -> int:
        return self.steps * self.grid**2

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid_coords.expand(x.shape[0], -1, -1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2)).flatten(2).transpose(1, 2)
