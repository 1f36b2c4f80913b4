"""The hypermodal encoder: per-modality encoders, a growable modality table, one shared transformer."""
from __future__ import annotations

from typing import Mapping

import torch
from timm.layers import trunc_normal_
from torch import nn

from .encoders.base import ModalityEncoder, Tokens
from .layers.init import init_weights
from .layers.spatial_bias import SpatialBias
from .layers.stage import Stage, drop_path_rates


class ModalityTable(nn.Module):
    """Learned modality embeddings, one ``[D]`` row per modality, that can grow at run time.

    Rows are separate parameters, so adding a modality leaves every existing row (and
    the optimizer state attached to it) untouched.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.rows = nn.ParameterDict()

    @property
    def names(self) -> list[str]:
        return list(self.rows.keys())

    def add(self, name: str) -> nn.Parameter:
        if name in self.rows:
            raise ValueError(f"modality {name!r} already exists; modalities: {', '.join(self.names)}")
        row = nn.Parameter(trunc_normal_(torch.empty(self.dim), std=0.02))
        self.rows[name] = row
        return row

    def forward(self, name: str) -> torch.Tensor:
        """The row of ``name`` ``[D]``."""
        if name not in self.rows:
            raise KeyError(f"unknown modality {name!r}; modalities: {', '.join(self.names)}")
        return self.rows[name]


class HypermodalEncoder(nn.Module):
    """JIN's hypermodal embedding space: every modality's tokens in one transformer.

    ``forward(name, x)`` runs the modality's own encoder (tokens with coordinates,
    its own blocks), adds the modality's learned embedding, then the shared blocks
    and norm, so all modalities land in one ``D``-dimensional space where
    predictions and alignment energies compare them. With ``spatial_bias`` the
    shared blocks add JIN's eq. 7-8 bias over the tokens' coordinates, as the
    image encoder's blocks do. Without ``shared_blocks`` every modality gets blocks
    of its own in their place (the separate encoders of late fusion, JIN Table 3); the
    output norm stays one for all. Without a shared space (``dim=None``: a model whose
    losses read only its modalities' own encoders, e.g. the image alone predicting its
    levels) there is no modality table, no blocks and no norm: :meth:`encode` is all it does.

    Args:
        encoders: ``{name: ModalityEncoder}``, all of width ``dim`` (without a shared space, of width ``None``).
        dim, depth, num_heads, mlp_ratio, drop_path_rate: the shared blocks (or each modality's); ``dim=None``: no
            shared space (and the others unused).
        spatial_bias, bias_hidden, bias_grid: the bias (:class:`~jin.layers.SpatialBias`: MLP width, tokens per
            unit of coordinate that Δpos is measured in).
        shared_blocks: one set of blocks for every modality (JIN); ``False``: one per modality.
    """

    def __init__(self, encoders: Mapping[str, ModalityEncoder], dim: int | None, depth: int = 0, num_heads: int = 1,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, spatial_bias: bool = False,
                 bias_hidden: int = 16, bias_grid: int = 8, shared_blocks: bool = True):
        super().__init__()
        self.dim, self.shared_blocks = dim, shared_blocks and dim is not None
        self.stage_config = {"depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                             "drop_path": drop_path_rates(drop_path_rate, depth), "spatial_bias": spatial_bias,
                             "bias_hidden": bias_hidden, "bias_grid": bias_grid}
        self.stage = self.new_stage() if self.shared_blocks else None
        self.modality_stages = nn.ModuleDict()  # without shared blocks: each modality's
        self.norm = nn.LayerNorm(dim).apply(init_weights) if self.shared_space else None
        self.encoders = nn.ModuleDict()
        self.modality_embed = ModalityTable(dim) if self.shared_space else None
        for name, encoder in encoders.items():
            if self.shared_space:
                self.add_modality(name, encoder)
            elif encoder.dim is not None:
                raise ValueError(f"encoder for {name!r} has width {encoder.dim}: without a shared space its tokens "
                                 f"stay its own (width None)")
            else:
                self.encoders[name] = encoder

    @property
    def shared_space(self) -> bool:
        """The modalities meet in a shared space (``dim`` is set): there is something to :meth:`share` them into."""
        return self.dim is not None

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders.keys())

    def add_modality(self, name: str, encoder: ModalityEncoder, blocks: Stage | None = None) -> list[nn.Parameter]:
        """Add a modality at run time; returns its new parameters (give them to the optimizer).

        Existing encoders, rows of the modality table and shared blocks are untouched, so
        every existing modality's output is unchanged. Without shared blocks the new modality
        gets blocks of its own (among the returned parameters): ``blocks`` when given (a target
        encoder's copy of the context encoder's), else new ones (:meth:`new_stage`).
        """
        if not name.isidentifier():
            raise ValueError(f"modality name {name!r} must be an identifier (it names parameters)")
        if not self.shared_space:
            raise ValueError(f"modality {name!r}: this encoder has no shared space for a second modality to meet the "
                             f"first in (it was built for {', '.join(self.modalities)} alone at its levels)")
        if encoder.dim != self.dim:
            raise ValueError(f"encoder for {name!r} has width {encoder.dim}; the shared blocks take {self.dim}")
        row = self.modality_embed.add(name)
        self.encoders[name] = encoder
        if self.shared_blocks:
            return [row, *encoder.parameters()]
        self.modality_stages[name] = self.new_stage() if blocks is None else blocks
        return [row, *encoder.parameters(), *self.modality_stages[name].parameters()]

    def new_stage(self) -> Stage:
        """A new set of the blocks (the shared ones, or a modality's own), initialized as timm's ViT."""
        c = self.stage_config
        bias = SpatialBias(c["num_heads"], c["bias_hidden"], c["bias_grid"]) if c["spatial_bias"] else None
        return Stage(self.dim, c["depth"], c["num_heads"], c["mlp_ratio"], c["drop_path"], bias).apply(init_weights)

    def blocks(self, name: str) -> Stage:
        """The blocks modality ``name``'s tokens pass after its own encoder: the shared ones, or its own."""
        return self.stage if self.shared_blocks else self.modality_stages[name]

    def encoder(self, name: str) -> ModalityEncoder:
        if name not in self.encoders:
            raise KeyError(f"unknown modality {name!r}; modalities: {', '.join(self.modalities)}")
        return self.encoders[name]

    def unit_coords(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``[B, U, 3]`` coordinates of the mask units of ``x`` (what masks are drawn from)."""
        return self.encoder(name).unit_coords(x)

    def query(self, name: str, coords: torch.Tensor) -> torch.Tensor:
        """Position + modality embedding of tokens of ``name`` at ``coords [..., 3]`` → ``[..., D]``.

        Raises:
            ValueError: the encoder has no shared space."""
        if not self.shared_space:
            raise ValueError(f"modality {name!r}: this encoder has no shared space")
        return self.encoder(name).position(coords) + self.modality_embed(name)

    def encode(self, name: str, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """Modality ``name``'s own encoder: its tokens ``[B, N, D]`` before the shared blocks (only those of the
        mask units ``keep [B, K]`` when given), with a hierarchical encoder's levels."""
        return self.encoder(name)(x, keep)

    def share(self, name: str, tokens: Tokens) -> Tokens:
        """Tokens of :meth:`encode` into the shared space: + the modality's row, the (shared) blocks, the norm.

        Raises:
            ValueError: the encoder has no shared space."""
        if not self.shared_space:
            raise ValueError(f"modality {name!r}: this encoder has no shared space")
        features, _ = self.blocks(name)(tokens.features + self.modality_embed(name), tokens.coords)
        return Tokens(self.norm(features), tokens.coords, tokens.levels)

    def forward(self, name: str, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """Tokens ``[B, N, D]`` of modality ``name`` in the shared space (only those of the mask units ``keep [B, K]``
        when given): :meth:`share` of :meth:`encode`."""
        return self.share(name, self.encode(name, x, keep))

    def pooled(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Mean of every token's features ``[B, D]``."""
        return self(name, x).features.mean(1)
