"""Images as a grid of patches: coordinates ``(x, y, scale)`` as in the JIN encoder."""
from __future__ import annotations

import torch
from timm.layers import PatchEmbed

from ..layers.coords import grid_coords
from .base import ModalityEncoder


class ImageEncoder(ModalityEncoder):
    """``[B, C, H, W]`` → ``(H/p)·(W/p)`` patch tokens, row-major; coords ``(x, y, −log2 G)``.

    Args:
        img_size, patch_size, in_chans: input geometry; other arguments as :class:`ModalityEncoder`.
    """

    mask_weights = (1.0, 1.0, 0.0)

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int = 1, num_heads: int = 3,
                 mlp_ratio: float = 4.0, in_chans: int = 3):
        self.grid = img_size // patch_size
        super().__init__(dim, depth, num_heads, mlp_ratio, max_freq=self.grid / 2)
        self.patch = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.register_buffer("grid_coords", grid_coords(self.grid).reshape(-1, 3), persistent=False)
        self.init()

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid_coords.expand(x.shape[0], -1, -1)

    def embed(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.patch(x)
