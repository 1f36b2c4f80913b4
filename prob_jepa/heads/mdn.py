"""Mixture density network head: a K-component diagonal Gaussian mixture (Bishop 1994)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ..config import is_count, is_finite_number
from . import register_head
from .base import Head, fp32
from .layers import mlp


@register_head("mdn")
class MDNHead(Head):
    """``p(y | c) = Σ_k π_k(c) N(y; μ_k(c), diag σ_k(c)²)``, exact log-density.

    One MLP on ``cond [N, C]`` outputs the mixture logits ``[N, K]`` (softmax weights
    ``π``), the means ``μ [N, K, D]`` and the scales ``σ = softplus(·) + min_scale``
    (Bishop 1994, eq. 25-27: softmax priors, positive widths, free centres; Bishop's
    kernels are isotropic, these are diagonal; softplus replaces exp and the floor
    keeps the likelihood bounded when a component collapses onto a point). The
    density is a ``torch.distributions.MixtureSameFamily``: its ``log_prob`` is the
    logsumexp over components, its ``mean`` the mixture mean ``Σ_k π_k μ_k`` (what
    ``mean`` returns), and its ``sample`` draws a component, then the Gaussian.

    At initialization the means are spread by a standard normal draw per component
    (their biases) and every scale is ``≈ 1``, the scale of layer-normed targets, so
    the components start apart and training does not begin by collapsing them.

    Args:
        dim, cond_dim: target and condition widths.
        num_components: ``K``.
        hidden: hidden widths of the MLP (one width, a list, or 0 / null for a linear map).
        min_scale: floor added to every ``σ``, in [0, 1) (every ``σ`` starts at 1).

    Raises:
        ValueError: ``num_components`` not a positive integer, ``min_scale`` not a finite number in [0, 1).

    References:
        Bishop, Mixture Density Networks, Aston University NCRG/94/004 (1994).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        num_components: int = 4,
        hidden: int | Sequence[int] | None = (256, 256),
        min_scale: float = 1e-3,
    ):
        super().__init__(dim, cond_dim)
        if not is_count(num_components):
            raise ValueError(f"num_components={num_components!r}: a positive number of mixture components")
        if not (is_finite_number(min_scale) and 0 <= min_scale < 1):
            raise ValueError(f"min_scale={min_scale!r}: a floor on the scales in [0, 1) (every scale starts at 1)")
        self.num_components, self.min_scale = num_components, min_scale
        self.net = mlp(cond_dim, hidden, num_components * (1 + 2 * dim))
        out = self.net[-1]
        k, kd = num_components, num_components * dim
        with torch.no_grad():
            out.bias[:k].zero_()
            out.bias[k : k + kd].normal_()
            out.bias[k + kd :].fill_(math.log(math.expm1(1.0 - min_scale)))  # softplus⁻¹: σ = 1

    def _distribution(self, cond: torch.Tensor) -> MixtureSameFamily:
        k, kd = self.num_components, self.num_components * self.dim
        logits, loc, raw = self.net(cond).split([k, kd, kd], dim=-1)
        scale = F.softplus(raw) + self.min_scale
        comps = Normal(loc.unflatten(-1, (k, self.dim)), scale.unflatten(-1, (k, self.dim)), validate_args=False)
        return MixtureSameFamily(
            Categorical(logits=logits, validate_args=False), Independent(comps, 1, validate_args=False), validate_args=False
        )

    @fp32
    def log_prob(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._distribution(cond).log_prob(target)

    @fp32
    def sample(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        return self._distribution(cond).sample((num_samples,))

    @fp32
    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        return self._distribution(cond).mean
