"""Collapse diagnostics logged during training."""
from __future__ import annotations

import torch


@torch.no_grad()
def feature_std(x: torch.Tensor) -> float:
    """Mean over channels of the per-channel std across rows of ``x [N, D]`` (0 = collapsed)."""
    return x.float().std(dim=0).mean().item()


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> float:
    """RankMe: ``exp(entropy(σ / Σσ))`` of the singular values of centred ``x [N, D]`` (Garrido et al., arXiv:2210.02885)."""
    x = x.float()
    s = torch.linalg.svdvals(x - x.mean(dim=0))
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()


@torch.no_grad()
def variance_share(x: torch.Tensor, k: int) -> float:
    """Fraction of the total variance of ``x`` ``[N, D]`` along its ``k`` largest principal components."""
    s = torch.linalg.svdvals(x.double() - x.double().mean(0)) ** 2
    return (s[:k].sum() / s.sum()).item()
