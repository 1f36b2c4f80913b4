"""What every modality encoder shares: tokens with coordinates, fixed positions, its own blocks."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..layers.coords import sincos_embed
from ..layers.init import init_weights
from ..layers.stage import Stage


class Tokens(NamedTuple):
    """features ``[B, N, D]``; coords ``[B, N, 3]`` in the modality's own axes (positions in ``[0, 1]``); levels: a
    hierarchical encoder's levels (:class:`~jin.encoder.Level`: features, coords, computed fraction α), which the
    cross-scale, budget and SIGReg losses read (empty for a flat encoder)."""

    features: torch.Tensor
    coords: torch.Tensor
    levels: tuple = ()


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``index [B, K]`` → ``[B, K, C]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class ModalityEncoder(nn.Module):
    """One modality's tokenizer, fixed sin-cos positions and ``depth`` transformer blocks of its own.

    A subclass says where its tokens are (:meth:`token_coords`, ``[B, N, 3]``; e.g. audio
    ``(time, frequency, 0)``, text ``(position, 0, 0)``, video ``(x, y, t)``, points
    ``(x, y, z)``) and what they contain (:meth:`embed`, ``[B, N, D]``); this class adds the
    position embedding of the coordinates, keeps the requested tokens (the context of a
    mask) and runs the blocks on them. The learned modality embedding is added by the
    :class:`~jin.hypermodal.HypermodalEncoder` that owns the modality table.

    Masks are drawn over *mask units* (:meth:`unit_coords`; ``keep`` of :meth:`forward` lists units): here every
    token is a unit; :class:`~jin.encoders.HierarchicalModalityEncoder` groups a unit's tokens of several levels
    (:meth:`unit_tokens`). ``mask_weights`` tells a block-mask sampler how to measure distance between units
    (weighted L∞ over the three axes; 0 ignores an axis): ``(1, 1, 0)`` on video makes
    tubes through time (V-JEPA), ``(1, 0, 0)`` on text makes spans. ``unit_grid``: units per side when the units
    tile a square grid row-major (I-JEPA's multi-block masks need one); ``None`` here.

    Args:
        dim: token width ``D`` (divisible by 6: three coordinates, sin and cos).
        depth, num_heads, mlp_ratio: the encoder's own blocks.
        max_freq: highest position frequency (cycles per unit), about half the tokens per axis.
        causal: each token attends only to tokens at or before its first coordinate.
    """

    mask_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit_grid: int | None = None

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, max_freq: float, causal: bool = False):
        super().__init__()
        self.dim, self.max_freq, self.causal = dim, max_freq, causal
        self.stage = Stage(dim, depth, num_heads, mlp_ratio, [0.0] * depth, None)

    def init(self) -> None:
        """The timm ViT initialization of every linear layer and norm (call at the end of ``__init__``)."""
        self.apply(init_weights)

    def token_coords(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates of every token of ``x``: ``[B, N, 3]`` (no parameters; masks are drawn from them)."""
        raise NotImplementedError

    @property
    def num_units(self) -> int:
        """Mask units of one input: its tokens, unless a subclass groups tokens into units."""
        return self.num_tokens

    def unit_coords(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates ``[B, U, 3]`` of the mask units of ``x``, which masks are drawn from (here: every token's)."""
        return self.token_coords(x)

    def unit_tokens(self, units: torch.Tensor) -> torch.Tensor:
        """Indices of the tokens of mask units ``units [..., K]`` among all tokens (here: the units themselves)."""
        return units

    def level_positions(self, units: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Where each level's tokens lie among the tokens of mask units ``units [B, M, K]`` (``unit_tokens(units)
        .flatten(1)``): ``{level: [N_l]}``; ``None``: the tokens are of one level (here: every token is a unit)."""
        return None

    def unit_content(self, x: torch.Tensor) -> torch.Tensor | None:
        """The share ``[B, U]`` (0 … 1) of each mask unit of ``x`` that holds content, which a block-mask sampler
        hides first; ``None``: every unit is content (here: every token is part of the input)."""
        return None

    def embed(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Content embedding of every token ``[B, N, D]``, in the order of ``coords = token_coords(x)``."""
        raise NotImplementedError

    def position(self, coords: torch.Tensor) -> torch.Tensor:
        """Fixed sin-cos embedding of coordinates ``[..., 3]`` → ``[..., D]`` (also builds predictor queries)."""
        return sincos_embed(coords, self.dim, self.max_freq)

    def attention_mask(self, coords: torch.Tensor) -> torch.Tensor | None:
        """Causal: ``[B, 1, N, N]`` additive mask allowing ``j`` for ``i`` when ``t_j ≤ t_i``."""
        if not self.causal:
            return None
        t = coords[..., 0]
        allowed = t[:, None, :] <= t[:, :, None]
        return torch.zeros(allowed.shape, device=t.device).masked_fill(~allowed, float("-inf"))[:, None]

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """Tokens of ``x``, only those at ``keep [B, K]`` when given (a mask's context)."""
        coords = self.token_coords(x)
        features = self.embed(x, coords) + self.position(coords).to(coords.dtype)
        if keep is not None:
            features, coords = gather_tokens(features, keep), gather_tokens(coords, keep)
        features, _ = self.stage.run_blocks(features, self.attention_mask(coords))  # no spatial bias: the mask is all
        return Tokens(features, coords)
