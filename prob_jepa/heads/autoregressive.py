"""Autoregressive head: per-coordinate mixtures conditioned on the previous coordinates (MADE / RNADE)."""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from ..config import is_count
from . import register_head
from .base import Head, fp32
from .layers import mlp

# Uniform draws are clamped away from 0 so the logistic inverse CDF stays finite
# (torch.rand returns exactly 0 with probability 2⁻²⁴ per draw).
_U_MIN = 2.0**-25

# Standardized location-scale families: (log-density of z, draw of z).
FAMILIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "gaussian": (lambda z: -0.5 * z**2 - 0.5 * math.log(2 * math.pi), torch.randn_like),
    "logistic": (lambda z: -z - 2 * F.softplus(-z), lambda t: torch.rand_like(t).clamp_(min=_U_MIN).logit()),
}


@register_head("autoregressive")
class AutoregressiveHead(Head):
    """``p(y | c) = Π_i Σ_k π_ik f((y_i − μ_ik) / s_ik) / s_ik``, exact log-density.

    RNADE (Uria et al. 2013): every coordinate is a one-dimensional mixture whose
    parameters are functions of ``y_<i`` and the context only, here computed for all
    coordinates in one pass by pyro's conditional MADE (Germain et al. 2015; context
    as in Paige & Wood 2016) in the identity order. ``f`` is the standard Gaussian or
    logistic density (``log f(z) = −z − 2 softplus(−z)``); ``s = softplus(·) + min_scale``.
    The context is an MLP embedding of ``cond`` (width ``context_dim``). The MADE sees
    it at every hidden unit, and a linear map adds it to every coordinate's parameters:
    in the MADE alone the first coordinate would see the context only through the
    hidden units of degree 0, about ``H / 2D`` of them per layer (one at ``H = 256, D = 192``).

    ``log_prob`` is one pass. ``sample`` is ``D`` passes, each filling one coordinate
    (component by its weight, then location + scale · noise; the logistic noise by the
    inverse CDF ``logit(u)``); samples carry no gradient. ``mean`` is the sequential
    mean: coordinate ``i`` is set to the mean of its conditional mixture given the
    coordinates already set (also ``D`` passes). It equals ``E[y | c]`` when the
    coordinates are conditionally independent or their conditional means are linear in
    the previous coordinates; for multimodal targets it is a deterministic point
    prediction, not the exact mean.

    Args:
        dim, cond_dim: target and condition widths.
        distribution: ``gaussian`` | ``logistic`` mixture per coordinate.
        num_components: ``K`` per coordinate.
        hidden: MADE hidden widths (one width or a list); a width below ``dim`` is raised to
            ``dim``, since MADE needs at least one unit per degree.
        context_dim: width of the context embedding (an MLP with one hidden layer of that width).
        min_scale: floor added to every scale.

    References:
        Uria, Murray, Larochelle, RNADE: The real-valued neural autoregressive density
        estimator, arXiv:1306.0186;
        Germain et al., MADE: Masked Autoencoder for Distribution Estimation, arXiv:1502.03509;
        Paige & Wood, Inference Networks for Sequential Monte Carlo in Graphical Models,
        arXiv:1602.06701 (sec. 3.3, the conditional MADE).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        distribution: str = "logistic",
        num_components: int = 4,
        hidden: int | Sequence[int] = (256, 256),
        context_dim: int = 64,
        min_scale: float = 1e-3,
    ):
        super().__init__(dim, cond_dim)
        if distribution not in FAMILIES:
            raise ValueError(f"distribution {distribution!r}; valid: {', '.join(FAMILIES)}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths:
            raise ValueError("autoregressive head needs at least one MADE hidden layer (hidden)")
        if not all(is_count(w) for w in widths):
            raise ValueError(f"hidden={hidden!r}: positive MADE layer widths")
        if not is_count(num_components):
            raise ValueError(f"num_components={num_components!r}: a positive number of mixture components")
        widths = [max(w, dim) for w in widths]  # MADE needs >= D units per layer (one per degree)
        self.log_f, self.draw = FAMILIES[distribution]
        self.num_components, self.min_scale = num_components, min_scale
        self.embed = mlp(cond_dim, context_dim, context_dim)
        with warnings.catch_warnings():  # pyro suggests an affine map for D = 1; the mixture is the point here
            warnings.filterwarnings("ignore", message="ConditionalAutoRegressiveNN input_dim = 1")
            self.made = ConditionalAutoRegressiveNN(
                dim,
                context_dim,
                widths,
                param_dims=[num_components] * 3,
                permutation=torch.arange(dim),
                nonlinearity=nn.SiLU(),
            )
        self.direct = nn.Linear(context_dim, 3 * num_components * dim)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[M, 3K, ...]`` raw outputs → log-weights, locations, scales, each ``[M, K, ...]``."""
        logits, loc, raw = out.split(self.num_components, dim=1)
        return logits.log_softmax(1), loc, F.softplus(raw) + self.min_scale

    def _direct(self, context: torch.Tensor) -> torch.Tensor:
        """``[M, 3K, D]``: the context's linear path to every coordinate's parameters."""
        return self.direct(context).unflatten(-1, (3 * self.num_components, self.dim))

    def _params(self, y: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y [M, D]``, ``context [M, C']`` → parameters of every coordinate, each ``[M, K, D]``."""
        out = [o.view(len(y), -1, self.dim) for o in self.made(y, context)]  # pyro drops the K axis when K = 1
        return self._split(torch.cat(out, dim=1) + self._direct(context))

    def _coordinate_params(
        self, y: torch.Tensor, context: torch.Tensor, direct: torch.Tensor, i: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_params`` of coordinate ``i`` alone (each ``[M, K]``), computing only its ``3K`` outputs.

        Sampling needs one coordinate per pass; skipping the other ``3K(D − 1)`` rows of
        the MADE's output layer makes a pass several times cheaper at large ``D``.
        """
        h = torch.cat([context, y], dim=-1)  # the input order of pyro's forward
        for layer in self.made.layers[:-1]:
            h = self.made.f(layer(h))
        out = self.made.layers[-1]
        rows = torch.arange(3 * self.num_components, device=y.device) * self.dim + i
        return self._split(F.linear(h, out.weight[rows] * out.mask[rows], out.bias[rows]) + direct[..., i])

    @fp32
    def log_prob(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        log_w, loc, scale = self._params(target, self.embed(cond))
        z = (target.unsqueeze(1) - loc) / scale
        return torch.logsumexp(log_w + self.log_f(z) - scale.log(), dim=1).sum(-1)

    @fp32
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        context = self.embed(cond)
        direct = self._direct(context).repeat(num_samples, 1, 1)
        context = context.repeat(num_samples, 1)
        y = cond.new_zeros(len(context), self.dim)
        for i in range(self.dim):
            log_w, loc, scale = self._coordinate_params(y, context, direct, i)
            k = torch.multinomial(log_w.exp(), 1)
            loc, scale = loc.gather(1, k).squeeze(1), scale.gather(1, k).squeeze(1)
            y[:, i] = loc + scale * self.draw(loc)
        return y.view(num_samples, len(cond), self.dim)

    @fp32
    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        context = self.embed(cond)
        direct = self._direct(context)
        y = cond.new_zeros(len(cond), self.dim)
        for i in range(self.dim):
            log_w, loc, _ = self._coordinate_params(y, context, direct, i)
            y = torch.cat([y[:, :i], (log_w.exp() * loc).sum(1, keepdim=True), y[:, i + 1 :]], dim=1)
        return y
