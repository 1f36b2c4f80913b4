"""A stage: a stack of transformer blocks at one level, and its adaptive variant."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .spatial_bias import SpatialBias


def autocast_dtype_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cast an additive mask to the dtype attention will run in (SDPA needs q's dtype)."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return mask.to(torch.get_autocast_dtype(x.device.type))
    return mask.to(x.dtype)


class Stage(nn.Module):
    """``depth`` timm ViT blocks sharing one optional spatial bias (JIN eq. 7-8).

    Attention runs through ``scaled_dot_product_attention``; the spatial bias
    and any structural mask are summed into its float ``attn_mask``.

    Args:
        dim, depth, num_heads, mlp_ratio: block shape.
        drop_path: per-block stochastic depth rates (length ``depth``).
        spatial_bias: a :class:`SpatialBias`, or ``None`` for plain attention.
        dropout: projection / MLP dropout.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        spatial_bias: SpatialBias | None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, drop_path=dp)
            for dp in drop_path[:depth]
        )
        self.spatial_bias = spatial_bias
        self.grad_checkpointing = False

    def init_router(self) -> None:
        """Initialize routing parameters after the generic init (plain stages have none)."""

    def attention_mask(self, coords: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Sum of spatial bias ``[B, heads, N, N]`` and structural mask (broadcastable)."""
        if self.spatial_bias is None:
            return attn_mask
        bias = self.spatial_bias(coords)
        return bias if attn_mask is None else bias + attn_mask

    def run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            mask = autocast_dtype_like(mask, x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
        return x

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``[B, N, D]``, coords: ``[B, N, 3]`` → (``[B, N, D]``, α ``[B]`` = 1: every token computed)."""
        x = self.run_blocks(x, self.attention_mask(coords, attn_mask))
        return x, x.new_ones(x.shape[0])


class AdaptiveStage(Stage):
    """Adaptive computation (JIN eq. 4): only the most important tokens are computed.

    ``α = σ(MLP(mean token))`` per image decides the fraction of the level that
    is computed; a learned linear score ranks tokens and the top
    ``k = ceil(mean_batch(α) · N)`` go through the blocks while the rest pass
    through unchanged (one k per batch keeps shapes static). The score receives
    task gradients through a straight-through gate (value 1, gradient of σ(score));
    α is trained by the budget term of eq. 10 (see :func:`budget_loss`).
    The FLOPs saved are real: the blocks see ``k`` tokens, not ``N``.
    """

    def __init__(self, dim: int, *args, router_hidden: int = 64, **kwargs):
        super().__init__(dim, *args, **kwargs)
        self.alpha = nn.Sequential(nn.Linear(dim, router_hidden), nn.GELU(), nn.Linear(router_hidden, 1))
        self.score = nn.Linear(dim, 1)

    def init_router(self) -> None:
        nn.init.constant_(self.alpha[-1].bias, 2.0)  # start near full computation (σ(2) ≈ 0.88)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        alpha = torch.sigmoid(self.alpha(x.mean(dim=1))).squeeze(-1)  # [B]
        k = max(1, min(N, math.ceil(alpha.detach().float().mean().item() * N)))
        score = self.score(x).squeeze(-1)  # [B, N]
        idx = score.topk(k, dim=1).indices  # [B, k]
        gate = torch.sigmoid(score.gather(1, idx))
        gate = (1.0 + gate - gate.detach()).unsqueeze(-1)  # straight-through: value 1
        sel = idx.unsqueeze(-1)
        x_sel = x.gather(1, sel.expand(-1, -1, D))
        c_sel = coords.gather(1, sel.expand(-1, -1, coords.shape[-1]))
        if attn_mask is not None:
            m = attn_mask.expand(B, -1, N, N)
            m = m.gather(2, idx[:, None, :, None].expand(-1, m.shape[1], -1, N))
            attn_mask = m.gather(3, idx[:, None, None, :].expand(-1, m.shape[1], k, -1))
        out = self.run_blocks(x_sel, self.attention_mask(c_sel, attn_mask))
        x = x.scatter(1, sel.expand(-1, -1, D), x_sel + gate * (out - x_sel))
        return x, alpha


def budget_loss(alphas: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """JIN eq. 10 budget term: ``Σ_l (mean α_l − target_l)²``."""
    return sum((a.float().mean() - t) ** 2 for a, t in zip(alphas, targets))
