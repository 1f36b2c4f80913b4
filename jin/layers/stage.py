"""A stage: a stack of transformer blocks at one level, and its adaptive variant."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionSpec, FlexMask, SpatialAttention, prepare_mask
from .moe import Experts, PlainBlock, RoutedBlock, Routing
from .precision import compute_dtype
from .spatial_bias import SpatialBias


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each of ``depth`` blocks: linear from 0 to ``rate`` (the timm / I-JEPA schedule)."""
    return [rate * i / max(1, depth - 1) for i in range(depth)]


class Stage(nn.Module):
    """``depth`` timm ViT blocks sharing one optional spatial bias (JIN eq. 7-8).

    Each forward describes its attention once as an :class:`AttentionSpec`
    (spatial bias, task groups, hidden keys) and prepares one mask for every
    block: the dense additive mask of ``scaled_dot_product_attention`` (CPU, the
    reference) or FlexAttention's fused ``score_mod`` + block mask (CUDA).
    With ``experts`` every block's MLP is a mixture of experts
    (:class:`~jin.layers.moe.RoutedBlock`) and :meth:`attend` returns each
    block's :class:`~jin.layers.moe.Routing`.

    Args:
        dim, depth, num_heads, mlp_ratio: block shape.
        drop_path: per-block stochastic depth rates (length ``depth``).
        spatial_bias: a :class:`SpatialBias`, or ``None`` for plain attention.
        dropout: projection / MLP dropout.
        experts: the blocks' mixture of experts, or ``None`` for dense MLPs.
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
        experts: Experts | None = None,
    ):
        super().__init__()
        block = PlainBlock if experts is None else functools.partial(RoutedBlock, experts=experts)
        self.blocks = nn.ModuleList(
            block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, drop_path=dp, attn_layer=SpatialAttention)
            for dp in drop_path[:depth]
        )
        self.spatial_bias = spatial_bias
        self.grad_checkpointing = False

    def init_router(self) -> None:
        """Initialize routing parameters after the generic init (plain stages have none)."""

    def run_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | FlexMask | None, gate: int = 0
    ) -> tuple[torch.Tensor, list[Routing]]:
        """Every block on ``x [B, N, D]`` with one prepared mask (a dense additive tensor is cast to the dtype
        attention runs in), mixtures of experts routed by router ``gate`` → (``[B, N, D]``, their routing)."""
        if isinstance(mask, torch.Tensor):
            mask = mask.to(compute_dtype(x))
        routing = []
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, routed = checkpoint(block, x, mask, gate, use_reentrant=False)
            else:
                x, routed = block(x, mask, gate)
            if routed is not None:
                routing.append(routed)
        return x, routing

    def attend(
        self, x: torch.Tensor, coords: torch.Tensor, group: torch.Tensor | None = None,
        valid: torch.Tensor | None = None, reads: torch.Tensor | None = None, gate: int = 0,
    ) -> tuple[torch.Tensor, list[Routing]]:
        """x: ``[B, N, D]``, coords: ``[B, N, 3]``, group: ``[B or 1, N]`` task blocks (-1: shared context),
        valid: ``[B, N]`` keys that exist, reads: ``[G, G]`` which group reads which (see :class:`AttentionSpec`),
        gate: the mixture of experts' router → (``[B, N, D]``, each routed block's :class:`Routing`)."""
        spec = AttentionSpec.build(self.spatial_bias, coords, group, valid, reads)
        return self.run_blocks(x, prepare_mask(spec, x), gate)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, group: torch.Tensor | None = None,
        valid: torch.Tensor | None = None, reads: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`attend` → (``[B, N, D]``, α ``[B]`` = 1): a level of the hierarchical encoder."""
        return self.attend(x, coords, group, valid, reads)[0], x.new_ones(x.shape[0])


class AdaptiveStage(Stage):
    """Adaptive computation (JIN eq. 4), per image, with a static capacity (Mixture-of-Depths routing).

    ``α_i = σ(MLP(mean token of image i)))`` decides the fraction of the level that
    image ``i`` computes. A learned linear score ranks the tokens; the blocks see
    a fixed ``k = ⌈capacity · N⌉`` top-scored tokens of every image (static shape:
    one compiled graph), of which image ``i`` computes its first
    ``n_i = clamp(⌈α_i · N⌉, 1, k)``: the others are hidden from attention and
    pass through unchanged, like every token outside the top ``k``. An image's
    output therefore depends on that image alone, never on its batch-mates.
    The score receives task gradients through a straight-through gate (value 1,
    gradient of σ(score)); α is trained by the budget term of eq. 10 (see
    :func:`budget_loss`). The FLOPs saved are real and set by the capacity: the
    blocks see ``k`` tokens, not ``N``.

    Args:
        dim, *args: as :class:`Stage`.
        capacity: fraction of the tokens the blocks see, in (0, 1].
        router_hidden: width of the α MLP.

    References:
        JIN eq. 4, 10; Raposo et al., "Mixture-of-Depths" (arXiv:2404.02258), static capacity top-k routing.
    """

    def __init__(self, dim: int, *args, capacity: float = 1.0, router_hidden: int = 64, **kwargs):
        super().__init__(dim, *args, **kwargs)
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity={capacity} must be in (0, 1]")
        self.capacity = capacity
        self.alpha = nn.Sequential(nn.Linear(dim, router_hidden), nn.GELU(), nn.Linear(router_hidden, 1))
        self.score = nn.Linear(dim, 1)

    def init_router(self) -> None:
        nn.init.constant_(self.alpha[-1].bias, 2.0)  # start near full computation (σ(2) ≈ 0.88)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, group: torch.Tensor | None = None,
        valid: torch.Tensor | None = None, reads: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Stage.forward` → (``[B, N, D]``, α ``[B]``). Keys that do not exist (``valid`` false) rank last."""
        B, N, D = x.shape
        k = max(1, math.ceil(self.capacity * N))
        alpha = torch.sigmoid(self.alpha(x.mean(dim=1))).squeeze(-1)  # [B]
        computed = torch.ceil(alpha.detach().float() * N).clamp(1, k)  # n_i, on the device
        score = self.score(x).squeeze(-1)  # [B, N]
        rank = score if valid is None else score.masked_fill(~valid, float("-inf"))
        idx = rank.topk(k, dim=1).indices  # [B, k], best first
        keep = torch.arange(k, device=x.device) < computed[:, None]  # [B, k]: the image's own n_i
        if valid is not None:
            keep = keep & valid.gather(1, idx)
        gate = torch.sigmoid(score.gather(1, idx))
        gate = torch.where(keep, 1.0 + gate - gate.detach(), 0.0).unsqueeze(-1)  # straight-through: value 1
        sel = idx.unsqueeze(-1)
        x_sel = x.gather(1, sel.expand(-1, -1, D))
        c_sel = coords.gather(1, sel.expand(-1, -1, coords.shape[-1]))
        g_sel = None if group is None else group.expand(B, -1).gather(1, idx)
        spec = AttentionSpec.build(self.spatial_bias, c_sel, g_sel, keep, reads)
        out, _ = self.run_blocks(x_sel, prepare_mask(spec, x_sel))
        x = x.scatter(1, sel.expand(-1, -1, D), x_sel + gate.to(x.dtype) * (out - x_sel))
        return x, alpha


def budget_loss(alphas: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """JIN eq. 10 budget term: ``Σ_l (mean α_l − target_l)²``."""
    return sum((a.float().mean() - t) ** 2 for a, t in zip(alphas, targets))
