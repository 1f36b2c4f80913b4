"""The predictor trunk: context tokens of every level + mask tokens at target coordinates."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from jin.layers import MoEMLP, SpatialBias, Stage, sincos_embed
from jin.layers.init import init_weights


class PredictorTrunk(nn.Module):
    """I-JEPA's narrow predictor, across levels and for all target blocks in one pass.

    The sequence is every context token of every level (projected to ``dim``)
    followed by one mask token per target token of every level, each carrying
    the sin-cos embedding of its (x, y) and a learned level embedding. Attention
    is block-structured: context tokens attend to context; a target block's mask
    tokens attend to the context and to that block's mask tokens at every level
    (JIN: the predictor attends across levels). Target blocks therefore stay
    independent, as in I-JEPA, while the context is encoded once instead of once
    per block. The output is the conditioning vector ``cond`` of every target
    token for the predictor head.

    Args:
        context_dims: encoder width per level.
        dim, depth, num_heads, mlp_ratio: trunk shape.
        grid: tokens per side of the finest grid (position frequencies, bias units).
        spatial_bias: add the JIN eq. 7-8 bias.
        bias_hidden: bias MLP width.
        drop_path_rate, dropout: regularization.
        moe_experts: > 0 turns every block's MLP into a top-``moe_top_k`` mixture of
            that many experts (:class:`~jin.layers.moe.MoEMLP`).
    """

    def __init__(
        self,
        context_dims: Sequence[int],
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        grid: int,
        spatial_bias: bool = False,
        bias_hidden: int = 16,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        moe_experts: int = 0,
        moe_top_k: int = 2,
    ):
        super().__init__()
        self.dim, self.grid = dim, grid
        self.embed = nn.ModuleList(nn.Linear(d, dim) for d in context_dims)
        self.level_embed = nn.Parameter(torch.zeros(len(context_dims), dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        bias = SpatialBias(num_heads, bias_hidden, grid) if spatial_bias else None
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.stage = Stage(dim, depth, num_heads, mlp_ratio, rates, bias, dropout)
        if moe_experts:
            for block in self.stage.blocks:
                block.mlp = MoEMLP(dim, int(dim * mlp_ratio), moe_experts, moe_top_k)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)
        trunc_normal_(self.level_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)

    def balance_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss of the MoE blocks in the last forward; ``None`` for a dense trunk."""
        losses = [b.mlp.aux_loss for b in self.stage.blocks if isinstance(b.mlp, MoEMLP)]
        return torch.stack(losses).mean() if losses else None

    def position(self, coords: torch.Tensor, level: int) -> torch.Tensor:
        return sincos_embed(coords[..., :2], self.dim, self.grid / 2) + self.level_embed[level]

    @staticmethod
    def task_groups(num_context: int, num_blocks: int, block_size: int) -> torch.Tensor:
        """``[1, N]`` attention groups: -1 for the context (seen by every token), ``m`` for block ``m``'s mask tokens,
        so context ↔ context and block m → context + block m (see :class:`~jin.layers.AttentionSpec`)."""
        blocks = torch.arange(num_blocks).repeat_interleave(block_size)
        return torch.cat([torch.full((num_context,), -1), blocks])[None]

    def forward(
        self, context: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Predict conditioning vectors for every target token.

        Args:
            context: per level ``(features [B, U, T_l, D_l], coords [B, U, T_l, 3])``.
            targets: per level target coords ``[B, M, N_l, 3]`` (M blocks, N_l tokens per block).
        Returns:
            per level ``cond [B, M, N_l, dim]``.
        """
        B, M = targets[0].shape[:2]
        ctx = [
            self.embed[l](f.flatten(1, 2)) + self.position(c.flatten(1, 2), l)
            for l, (f, c) in enumerate(context)
        ]
        ctx_coords = torch.cat([c.flatten(1, 2) for _, c in context], 1)
        sizes = [t.shape[2] for t in targets]
        queries = torch.cat([self.mask_token + self.position(t, l) for l, t in enumerate(targets)], 2)  # [B, M, ΣN, dim]
        q_coords = torch.cat(list(targets), 2)

        x = torch.cat([torch.cat(ctx, 1), queries.flatten(1, 2).to(ctx[0].dtype)], 1)
        coords = torch.cat([ctx_coords, q_coords.flatten(1, 2)], 1)
        num_ctx = ctx_coords.shape[1]
        x, _ = self.stage(x, coords, self.task_groups(num_ctx, M, sum(sizes)).to(x.device))
        out = self.norm(x[:, num_ctx:]).view(B, M, sum(sizes), self.dim)
        return list(out.split(sizes, dim=2))
