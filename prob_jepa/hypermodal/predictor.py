"""The hypermodal predictor: every task of a step in one pass, separated by the attention mask."""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from jin.layers import MoEMLP, Stage
from jin.layers.init import init_weights


class HypermodalPredictor(nn.Module):
    """Predicts ``cond`` for the masked tokens of each task from the context of its source modalities.

    The sequence is the context tokens of every present modality followed by one query per
    target token of every task (a mask token plus the target token's position and modality
    embedding). The attention mask keeps tasks apart: a modality's context tokens attend
    to that modality's context; a task's queries attend to the context of the task's sources
    and to their own task's queries. So within-modality, cross-modal and joint predictions
    are made together, the context is embedded once, and none of them sees another's answer.

    Args:
        dim: encoder width ``D``; pred_dim, depth, num_heads, mlp_ratio: the predictor's shape.
        moe_experts, moe_top_k: > 0 experts makes every MLP a top-k mixture (:class:`MoEMLP`).
        num_gates: routers over the shared experts (M3-JEPA: one per task direction).
    """

    def __init__(self, dim: int, pred_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 moe_experts: int = 0, moe_top_k: int = 2, num_gates: int = 1, drop_path_rate: float = 0.0):
        super().__init__()
        if num_gates > 1 and not moe_experts:
            raise ValueError(f"num_gates={num_gates} needs a mixture of experts (predictor.moe_experts > 0)")
        self.dim = pred_dim
        self.embed = nn.Linear(dim, pred_dim)
        self.query_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(pred_dim))
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.stage = Stage(pred_dim, depth, num_heads, mlp_ratio, rates, None)
        if moe_experts:
            for block in self.stage.blocks:
                block.mlp = MoEMLP(pred_dim, int(pred_dim * mlp_ratio), moe_experts, moe_top_k, num_gates)
        self.norm = nn.LayerNorm(pred_dim)
        self.apply(init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def moe_layers(self) -> list[MoEMLP]:
        return [b.mlp for b in self.stage.blocks if isinstance(b.mlp, MoEMLP)]

    def balance_loss(self) -> torch.Tensor | None:
        """Mean Switch load-balancing loss of the last forward; ``None`` without experts."""
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).mean() if losses else None

    @staticmethod
    def attention_mask(context_group: torch.Tensor, query_task: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Additive ``[1, 1, N, N]`` mask.

        Args:
            context_group: ``[Nc]`` modality index of each context token.
            query_task: ``[Nq]`` task index of each query.
            sources: ``[tasks, modalities]`` bool, which modalities each task reads.
        """
        nc = len(context_group)
        n = nc + len(query_task)
        allowed = torch.zeros(n, n, dtype=torch.bool, device=context_group.device)
        allowed[:nc, :nc] = context_group[:, None] == context_group[None, :]
        allowed[nc:, :nc] = sources[query_task][:, context_group]
        allowed[nc:, nc:] = query_task[:, None] == query_task[None, :]
        return torch.zeros(n, n, device=allowed.device).masked_fill(~allowed, float("-inf"))[None, None]

    def forward(self, context: torch.Tensor, context_group: torch.Tensor, queries: torch.Tensor,
                query_task: torch.Tensor, sources: torch.Tensor, gate: int = 0) -> torch.Tensor:
        """``context [B, Nc, D]``, ``queries [B, Nq, D]`` (position + modality embeddings) → cond ``[B, Nq, P]``."""
        for moe in self.moe_layers():
            moe.active_gate = gate
        x = torch.cat([self.embed(context), self.mask_token + self.query_embed(queries)], 1)
        x = self.stage.run_blocks(x, self.attention_mask(context_group, query_task, sources))
        return self.norm(x[:, context.shape[1]:])
