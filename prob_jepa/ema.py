"""The EMA target encoder shared by every JEPA: a frozen, never stochastic copy of the context encoder."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ContextTargetPair(nn.Module):
    """Base of a model holding ``context_encoder`` and its EMA copy ``target_encoder``.

    Regression targets must be a deterministic function of the EMA weights and the input, so
    the target encoder stays in eval mode whatever mode the model is put in: drop-path and
    dropout inherited from the context encoder never act on it (I-JEPA, arXiv:2301.08243, §3:
    the target encoder's weights are an exponential moving average of the context encoder's).
    """

    def init_target(self, encoder: nn.Module) -> None:
        """Make ``encoder`` the context encoder and a frozen copy of it the target encoder."""
        self.context_encoder = encoder
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "ContextTargetPair":
        super().train(mode)
        self.target_encoder.eval()
        return self

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: ``θ̄ ← m·θ̄ + (1 − m)·θ`` for every parameter of the target encoder."""
        tgt = [p.data for p in self.target_encoder.parameters()]
        src = [p.data for p in self.context_encoder.parameters()]
        torch._foreach_lerp_(tgt, src, 1.0 - momentum)
