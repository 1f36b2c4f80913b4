"""Diffusion head: the probability-flow likelihood, DDIM and mean() are exact for the true ε̂ of a Gaussian.

The denoiser is replaced by the closed-form ε̂ of ``y ~ N(μ, Σ)``: ``x_t ~ N(√ᾱ μ, ᾱ Σ + σ² I)``,
so ``E[ε | x_t] = σ (ᾱ Σ + σ² I)⁻¹ (x_t − √ᾱ μ)``. What is left of the error is the head's own:
the schedule mapping, the ODE and its divergence, the DDIM loop.
"""
from __future__ import annotations

import pytest
import torch

from prob_jepa.heads.diffusion import DiffusionHead


class GaussianOracle(DiffusionHead):
    """The head with its network swapped for the exact ε̂ of ``N(mu, cov)`` (time travels in ``mod``)."""

    def __init__(self, mu: float, cov: torch.Tensor, **options):
        super().__init__(dim=len(cov), cond_dim=3, **options)
        self.mu, self.cov = mu, cov

    def _modulation(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return t.expand(len(c))[:, None]

    def _eps(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        _, sigma = self._vp(mod[0])  # every row of an ODE or DDIM step shares t
        alpha_bar = 1 - sigma**2
        precision = torch.linalg.inv(alpha_bar * self.cov + sigma**2 * torch.eye(len(self.cov)))
        return sigma * (x - alpha_bar.sqrt() * self.mu) @ precision

    def true_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Density of ``x(t_min) ~ N(√ᾱ μ, ᾱ Σ + σ² I)``, which the head's ``log_prob`` computes."""
        _, sigma = self._vp(torch.tensor(self.t_min))
        alpha_bar = 1 - sigma**2
        cov = alpha_bar * self.cov + sigma**2 * torch.eye(self.dim)
        mean = torch.full((self.dim,), alpha_bar.sqrt() * self.mu)
        return torch.distributions.MultivariateNormal(mean, cov).log_prob(y)


def correlated(dim: int, scale: float) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)) / dim**0.5
    return scale**2 * (a @ a.T + 0.1 * torch.eye(dim))


# μ = 0 keeps the t = 1 marginal at N(0, I − ᾱ(1)(I − Σ)), so the head's prior N(0, I) is exact to ~ᾱ(1)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusion_ode_log_prob_is_exact_for_the_true_score(beta_schedule):
    head = GaussianOracle(0.0, correlated(2, 0.4), beta_schedule=beta_schedule, rtol=1e-6, atol=1e-6)
    y = 1.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(head.cov).T
    torch.testing.assert_close(head.log_prob(y, torch.zeros(64, 3)), head.true_log_prob(y), rtol=0, atol=0.01)


def test_diffusion_hutchinson_log_prob_is_unbiased_and_deterministic():
    head = GaussianOracle(0.0, correlated(16, 0.4), exact_divergence_max_dim=8, rtol=1e-5, atol=1e-5)
    y = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(head.cov).T
    lp = head.log_prob(y, torch.zeros(512, 3))
    err = lp - head.true_log_prob(y)
    assert err.std() > 0.1, "a 16-D Hutchinson estimate of a non-diagonal Jacobian should differ per row"
    standard_error = err.std() / 512**0.5
    assert err.mean().abs() < 4 * standard_error, f"biased: mean error {err.mean():.3f} ± {standard_error:.3f}"
    torch.testing.assert_close(head.log_prob(y, torch.zeros(512, 3)), lp)


def test_diffusion_ddim_samples_and_mean_match_the_gaussian():
    head = GaussianOracle(0.7, 0.4**2 * torch.eye(3), sampling_steps=200)
    torch.manual_seed(0)
    samples = head.sample(torch.zeros(2, 3), 4000)  # [S, N, D]
    torch.testing.assert_close(samples.mean(0), torch.full((2, 3), 0.7), rtol=0, atol=0.03)
    torch.testing.assert_close(samples.std(0), torch.full((2, 3), 0.4), rtol=0.05, atol=0)
    # the DDIM map of a Gaussian is affine in the noise: antithetic pairs give its mean exactly
    # (8 independent draws would miss by ~0.4/√8 ≈ 0.14)
    torch.testing.assert_close(head.mean(torch.zeros(2, 3)), torch.full((2, 3), 0.7), rtol=0, atol=5e-3)
