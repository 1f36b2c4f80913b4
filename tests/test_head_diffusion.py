"""Diffusion head: the probability-flow likelihood, DDIM and mean() are exact for the true denoiser of a Gaussian.

The denoiser is replaced by the closed-form ε̂ of ``y ~ N(μ, Σ)``: ``x_t ~ N(√ᾱ μ, ᾱ Σ + σ² I)``, so
``E[ε | x_t] = σ (ᾱ Σ + σ² I)⁻¹ (x_t − √ᾱ μ)`` and ``E[y | x_t] = μ + √ᾱ Σ (ᾱ Σ + σ² I)⁻¹ (x_t − √ᾱ μ)``, whence
``v̂ = √ᾱ ε̂ − σ ŷ``. What is left of the error is the head's own: the schedule mapping, the prediction type's
conversions, the ODE and its divergence, the DDIM loop.
"""
from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from prob_jepa.config import ConfigError
from prob_jepa.eval.multimodality import axis_coordinates
from prob_jepa.heads.diffusion import PREDICTION_TYPES, DiffusionHead
from prob_jepa.run_dir import RunDir
from prob_jepa.run_io import load_run
from prob_jepa.synthetic import TASKS, train_head
from prob_jepa.train import pretrain


class GaussianOracle(DiffusionHead):
    """The head with its network swapped for the exact ε̂ or v̂ of ``N(mu, cov)`` (time travels in ``mod``)."""

    def __init__(self, mu: float, cov: torch.Tensor, **options):
        super().__init__(dim=len(cov), cond_dim=3, **options)
        self.mu, self.cov = mu, cov

    def _modulation(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return t.expand(len(c))[:, None]

    def _denoiser(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        _, sigma = self._vp(mod[0])  # every row of an ODE or DDIM step shares t
        alpha_bar = 1 - sigma**2
        precision = torch.linalg.inv(alpha_bar * self.cov + sigma**2 * torch.eye(len(self.cov)))
        residual = (x - alpha_bar.sqrt() * self.mu) @ precision
        eps = sigma * residual
        if self.ddpm.config.prediction_type == "epsilon":
            return eps
        y = self.mu + alpha_bar.sqrt() * residual @ self.cov  # E[y | x_t], finite where ᾱ → 0
        return alpha_bar.sqrt() * eps - sigma * y

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
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusion_ode_log_prob_is_exact_for_the_true_score(beta_schedule, prediction_type):
    head = GaussianOracle(0.0, correlated(2, 0.4), beta_schedule=beta_schedule, prediction_type=prediction_type,
                          rtol=1e-6, atol=1e-6)
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


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_diffusion_ddim_samples_and_mean_match_the_gaussian(prediction_type):
    head = GaussianOracle(0.7, 0.4**2 * torch.eye(3), sampling_steps=200, prediction_type=prediction_type)
    torch.manual_seed(0)
    samples = head.sample(torch.zeros(2, 3), 4000)  # [S, N, D]
    torch.testing.assert_close(samples.mean(0), torch.full((2, 3), 0.7), rtol=0, atol=0.03)
    torch.testing.assert_close(samples.std(0), torch.full((2, 3), 0.4), rtol=0.05, atol=0)
    # the DDIM map of a Gaussian is affine in the noise: antithetic pairs give its mean exactly
    # (8 independent draws would miss by ~0.4/√8 ≈ 0.14)
    torch.testing.assert_close(head.mean(torch.zeros(2, 3)), torch.full((2, 3), 0.7), rtol=0, atol=5e-3)


def test_diffusion_samples_spread_like_the_data_after_short_training():
    """On the 64-D ``ambiguous`` task, 500 steps of the default head give DDIM samples of the data's spread and
    the marker's mode weights (measured on seeds 0–4: spread ratio 1.04–1.06, minority share 0.31–0.32; the ratio
    compares the samples' conditional spread with the data's marginal one, which exact samples read 0.98). The
    ε-predicting head's samples were 23–24× too wide at any length of training (README, "The head comparison").
    The trained head pickles (whole-module ``torch.save``, spawned workers)."""
    task = TASKS["ambiguous"](dim=64, cond_dim=8, seed=0)
    torch.manual_seed(0)
    head = DiffusionHead(64, 8)
    train_head(head, task, steps=500, batch_size=256, lr=3e-3, seed=0)
    c, cond, y = task.sample(256, torch.Generator().manual_seed(1))
    samples = head.sample(cond, 32)
    spread = (samples.std(0).mean() / y.std(0).mean()).item()
    assert 0.85 < spread < 1.2, f"samples' spread is {spread:.2f}× the data's"
    mode = task.centre(c)
    minority = (axis_coordinates(samples, mode, -mode) < 0.5).double().mean().item()
    assert abs(minority - (1 - task.weight)) < 0.1, f"minority-mode share {minority:.2f}, true {1 - task.weight}"
    copy = pickle.loads(pickle.dumps(head))
    torch.manual_seed(1)
    expected = head.sample(cond[:4], 2)
    torch.manual_seed(1)
    torch.testing.assert_close(copy.sample(cond[:4], 2), expected)


def test_a_diffusion_run_saved_before_prediction_type_loads_as_the_epsilon_head_it_was(compose, tiny_overrides,
                                                                                         tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = compose(*tiny_overrides, "predictor=diffusion", "eval.enabled=false", "trainer.max_steps=1")
    pretrain(cfg, run_dir=run.path)
    assert load_run(run.path)[0].heads[0].ddpm.config.prediction_type == "v_prediction"
    old = OmegaConf.load(run.config)
    del old.predictor.prediction_type
    OmegaConf.save(old, run.config)
    model, trained = load_run(run.path)
    assert trained.predictor.prediction_type == "epsilon"
    assert model.heads[0].ddpm.config.prediction_type == "epsilon"
    with pytest.raises(ConfigError, match="predictor.prediction_type: 'epsilon' -> 'v_prediction'"):
        pretrain(compose(*tiny_overrides, "predictor=diffusion", "eval.enabled=false", "trainer.max_steps=2"),
                 run_dir=run.path)
