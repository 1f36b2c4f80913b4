"""Audio as log-mel patches (A-JEPA): coordinates ``(time, frequency, 0)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModalityEncoder


class AudioEncoder(ModalityEncoder):
    """Log-mel spectrogram ``[B, F, T]`` → ``(F/pf)·(T/pt)`` patch tokens (frequency-major order).

    Coordinates are the patch centre's normalized time and frequency, so block masks
    are time-frequency rectangles (A-JEPA's time-frequency aware masking).

    References:
        Fei et al., A-JEPA: Joint-Embedding Predictive Architecture Can Listen (arXiv:2311.15830).

    Args:
        n_mels, frames: spectrogram size; patch: ``(frequency, time)`` bins per patch.
    """

    mask_weights = (1.0, 1.0, 0.0)

    def __init__(self, n_mels: int, frames: int, patch: tuple[int, int], dim: int, depth: int = 1,
                 num_heads: int = 3, mlp_ratio: float = 4.0):
        pf, pt = patch
        if n_mels % pf or frames % pt:
            raise ValueError(f"patch {tuple(patch)} must divide the spectrogram ({n_mels} mels, {frames} frames)")
        self.rows, self.cols = n_mels // pf, frames // pt
        super().__init__(dim, depth, num_heads, mlp_ratio, max_freq=max(self.rows, self.cols) / 2)
        self.proj = nn.Conv2d(1, dim, kernel_size=(pf, pt), stride=(pf, pt))
        f = (torch.arange(self.rows, dtype=torch.float32) + 0.5) / self.rows
        t = (torch.arange(self.cols, dtype=torch.float32) + 0.5) / self.cols
        ff, tt = torch.meshgrid(f, t, indexing="ij")
        self.register_buffer("grid_coords", torch.stack([tt, ff, torch.zeros_like(tt)], -1).reshape(-1, 3),
                             persistent=False)
        self.init()

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid_coords.expand(x.shape[0], -1, -1)

    def embed(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.proj(x[:, None]).flatten(2).transpose(1, 2)


class SpectrogramStem(nn.Module):
    """Log-mel spectrogram ``[B, F, T]`` → level-0 grid ``[B, G, G, D]`` of JIN's hierarchy for audio (JIN §3.2.1:
    "spectrogram CNN followed by temporal transformer"; the transformer is the hierarchy's levels).

    Each patch of ``F/G`` mel bins × ``T/G`` frames on its own: a 3×3 convolution (``D/2`` channels, zero-padded at
    the patch's edges) and GELU, then a convolution over the whole patch. Patches are convolved apart so that a
    context token never reads a bin of a hidden neighbour (a mask hides whole patches). Rows are frequency, columns
    time, so a token's ``(x, y)`` is ``(time, frequency)``, as :class:`AudioEncoder`'s.

    Raises:
        ValueError: ``grid`` does not divide both sides of the spectrogram.
    """

    def __init__(self, n_mels: int, frames: int, grid: int, dim: int):
        super().__init__()
        if n_mels % grid or frames % grid:
            raise ValueError(f"a {grid}×{grid} grid must divide the spectrogram ({n_mels} mels, {frames} frames)")
        self.grid, self.patch = grid, (n_mels // grid, frames // grid)
        self.local = nn.Conv2d(1, dim // 2, kernel_size=3, padding=1)
        self.proj = nn.Conv2d(dim // 2, dim, kernel_size=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F, T]`` → ``[B, G, G, D]``."""
        B, G, (pf, pt) = x.shape[0], self.grid, self.patch
        patches = x.reshape(B, G, pf, G, pt).transpose(2, 3).reshape(B * G * G, 1, pf, pt)
        return self.proj(F.gelu(self.local(patches))).view(B, G, G, -1)
