"""Deterministic head: I-JEPA's point prediction, with a learned isotropic scale."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import register_head
from .base import Head, fp32


@register_head("deterministic")
class DeterministicHead(Head):
    """Point prediction ``μ(c) = W c + b`` trained with I-JEPA's regression loss.

    A learned isotropic scale σ turns the point into ``p(y | c) = N(y; μ(c), σ² I)``
    so the head has a likelihood comparable with the others. σ is fitted by the
    Gaussian NLL of the residuals with μ detached, so the point objective (and
    the representation it teaches) is exactly I-JEPA's.

    Args:
        dim, cond_dim: target and condition widths.
        point_loss: ``smooth_l1`` (I-JEPA code) or ``l2`` (I-JEPA paper).
    """

    def __init__(self, dim: int, cond_dim: int, point_loss: str = "smooth_l1"):
        super().__init__(dim, cond_dim)
        losses = {"smooth_l1": F.smooth_l1_loss, "l2": F.mse_loss}
        if point_loss not in losses:
            raise ValueError(f"point_loss {point_loss!r}; valid: {', '.join(losses)}")
        self.point_loss = losses[point_loss]
        self.proj = nn.Linear(cond_dim, dim)
        self.log_sigma = nn.Parameter(torch.zeros(1))  # 1-D: FSDP shards no scalars

    @fp32
    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(cond)

    def _gaussian_log_prob(self, target: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        z = (target - mu) * torch.exp(-self.log_sigma)
        return -0.5 * (z**2).sum(-1) - self.dim * (self.log_sigma + 0.5 * math.log(2 * math.pi))

    @fp32
    def log_prob(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._gaussian_log_prob(target, self.mean(cond))

    @fp32
    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mu = self.mean(cond)
        scale_nll = -self._gaussian_log_prob(target, mu.detach()).mean() / self.dim
        return self.point_loss(mu, target) + scale_nll

    @fp32
    def sample(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        mu = self.mean(cond)
        return mu + torch.exp(self.log_sigma) * torch.randn(num_samples, *mu.shape, device=mu.device)
