"""Text as byte-level BPE tokens: coordinates ``(position, 0, 0)``."""
from __future__ import annotations

import torch
from torch import nn

from .base import ModalityEncoder


class TextEncoder(ModalityEncoder):
    """Token ids ``[B, L]`` → ``L`` tokens; block masks on ``(1, 0, 0)`` are contiguous spans.

    The ids come from a byte-level BPE (``prob_jepa.data.multimodal.load_tokenizer``);
    padding ids are ordinary tokens here (captions are padded to a fixed length).

    Args:
        vocab_size, length: id range and sequence length.
        causal: a left-to-right encoder instead of a bidirectional one.
    """

    mask_weights = (1.0, 0.0, 0.0)

    def __init__(self, vocab_size: int, length: int, dim: int, depth: int = 1, num_heads: int = 3,
                 mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__(dim, depth, num_heads, mlp_ratio, max_freq=length / 2, causal=causal)
        self.length = length
        self.tokens = nn.Embedding(vocab_size, dim)
        pos = (torch.arange(length, dtype=torch.float32) + 0.5) / length
        self.register_buffer("grid_coords", torch.stack([pos, torch.zeros_like(pos), torch.zeros_like(pos)], -1),
                             persistent=False)
        self.init()
        nn.init.normal_(self.tokens.weight)  # as large as the sin-cos positions, or the content drowns in them

    @property
    def num_tokens(self) -> int:
        return self.length

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.length:
            raise ValueError(f"text of {x.shape[1]} tokens; this encoder takes {self.length}")
        return self.grid_coords.expand(x.shape[0], -1, -1)

    def embed(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)
