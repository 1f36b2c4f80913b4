"""Diffusion head: conditional latent diffusion over the target embedding (DDPM / DDIM / probability-flow ODE)."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from torchdiffeq import odeint

from . import register_head
from ..config import is_count
from .base import Head, fp32

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# What the denoiser predicts (diffusers' names): the training target given (y, noise, k), and ε̂ from the
# network's output at noisy x and noise level σ (ᾱ = 1 − σ²). v = √ᾱ ε − σ y (Salimans & Ho 2022), so
# ε = √ᾱ v + σ x. Named functions, not lambdas, so that the head pickles.
def noise_target(scheduler: DDPMScheduler, target: torch.Tensor, noise: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return noise


def velocity_target(
    scheduler: DDPMScheduler, target: torch.Tensor, noise: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    return scheduler.get_velocity(target, noise, k)


def eps_from_eps(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return output


def eps_from_velocity(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (1 - sigma**2).sqrt() * output + sigma * x


class Parametrization(NamedTuple):
    """What the network is trained to predict, and how ε̂ is read from its output."""

    training_target: Callable[[DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    eps_from_output: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


PREDICTION_TYPES: dict[str, Parametrization] = {
    "epsilon": Parametrization(noise_target, eps_from_eps),
    "v_prediction": Parametrization(velocity_target, eps_from_velocity),
}


class AdaLNBlock(nn.Module):
    """DiT block without attention: ``h + gate ⊙ MLP(LN(h) ⊙ (1 + scale) + shift)`` (adaLN-Zero).

    ``h [..., N, W]``; ``mod [N, 3W]`` = (shift, scale, gate), broadcast over leading sample dims.
    """

    def __init__(self, width: int, mlp_ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = mod.chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


@register_head("diffusion")
class DiffusionHead(Head):
    """Conditional diffusion model ``p(y | c)`` with a DiT-style MLP denoiser predicting v (or ε).

    Denoiser: ``D → W`` input projection, ``depth`` adaLN-Zero blocks, adaLN output layer, ``W → D``;
    (shift, scale, gate) come from ``SiLU(MLP(sinusoid(t · time_scale)) + MLP(c))``. The residual
    width is ``W = max(hidden, D)`` so that the output (v̂ or ε̂) is never rank-limited. The blocks start as the
    identity (adaLN-Zero); the output layer's modulation does not, so the context reaches the output from step 0.

    Training: DDPM noising by diffusers' ``DDPMScheduler`` at a uniform step ``k ∈ {0..T−1}``; the
    loss is the MSE of the ``prediction_type`` target averaged over rows and dimensions (a training
    objective, not a likelihood). Sampling: DDIM (η = 0, trailing spacing).

    ``prediction_type``: ``v_prediction`` (default; ``v = √ᾱ ε − σ y``, Salimans & Ho 2022,
    arXiv:2202.00512, §4) or ``epsilon`` (DDPM's ε). With ε, DDIM's estimate of y at a noisy step is
    ``(x − σ ε̂)/√ᾱ``: at the first steps of the linear schedule √ᾱ ≈ 0.01, so an ε̂ error of 0.15
    becomes a y error of ~15, and the trajectory leaves the region the network was trained on. This
    denoiser makes that error: at high noise the best ε̂ is ≈ x, but the LayerNorms (no affine) hand the
    output layer x's direction only, not its length, and ε̂'s error stays ≈ 0.15 from 300 to 3000 training
    steps. On the 64-D ``ambiguous`` task (per-dimension std 0.84) the ε head's DDIM samples had a
    per-dimension std of 19–20 (23–24×) whatever the training length, while its ODE likelihood was fair;
    the v head's (at high noise v ≈ −E[y | c], whatever |x|) read 0.81–0.93 (README, "The head comparison").

    Time: step ``k`` is continuous time ``t = (k+1)/T`` (training, DDIM and ODE alike). The
    discrete schedule becomes a VP SDE whose ``β(t)`` interpolates ``−T log(1 − β_k) ≈ T β_k``
    linearly between the cell midpoints ``(k + ½)/T`` (0.1 … 20 for ``linear``: Song et al.'s VP
    SDE), with ``log ᾱ(t) = −∫₀ᵗ β`` and ``σ(t)² = 1 − ᾱ(t)``; ``ᾱ((k+1)/T)`` then equals the DDPM
    table up to the schedule's second difference (< 1e-5 relative for ``linear`` and ``scaled_linear``;
    ``squaredcos_cap_v2`` departs only where its clipped last β's leave ᾱ < 1e-3). A
    continuous β matters: with a piecewise-constant one, dopri5's error estimate misses the jumps.
    ``time_scale`` sets the sinusoid's top frequency: with DDPM's ``t·T`` the network oscillates
    in t between the trained steps, and the ODE solver pays for it in steps.

    ``log_prob``: the probability-flow ODE (Song et al. 2021, arXiv:2011.13456, eq. 13, App. D.2)
    ``dx/dt = −½β(t)(x − ε̂(x, t)/σ(t))`` from ``t_min`` to 1 with torchdiffeq's dopri5, augmented
    with its divergence: ``log p(y) = log N(x(1); 0, I) + ∫ div f dt`` — the exact density of the
    model's ``x(t_min)`` up to ODE error. One solve covers all rows (step sizes are shared; the
    error norm is torchdiffeq's RMS over the batch). The divergence is exact (D vector-Jacobian
    products) for ``D ≤ exact_divergence_max_dim``, else Hutchinson's estimate (FFJORD,
    arXiv:1810.01367) with one Rademacher probe per row, fixed over the solve and drawn from a
    generator seeded with ``seed``: unbiased and deterministic given the input. Not differentiable.

    DDIM's deterministic first-order steps under-disperse sharp conditionals: with the exact ε̂ of
    ``N(μ, s² I)``, 50 steps give a sample std of 0.93·s for s = 0.4 and 0.74·s for s = 0.1 (200
    steps: 0.98·s, 0.93·s); raise ``sampling_steps`` where sample calibration matters.

    ``mean``: the average of ``mean_samples`` DDIM samples from antithetic noise pairs ``±z`` seeded
    with ``seed``: exact in one pair wherever the DDIM map is affine in the noise (Gaussian p(y | c)).

    Args:
        dim, cond_dim: target and condition widths.
        hidden, depth, mlp_ratio: minimum residual width, adaLN blocks, MLP expansion.
        timesteps: T, the DDPM training schedule length.
        prediction_type: ``v_prediction`` | ``epsilon``, what the network predicts.
        sampling_steps: DDIM steps.
        beta_schedule: ``linear`` | ``scaled_linear`` | ``squaredcos_cap_v2`` (diffusers names).
        time_scale: the timestep embedding is ``sinusoid(t · time_scale)``.
        rtol, atol, t_min: probability-flow ODE tolerances and start time.
        exact_divergence_max_dim: largest D given the exact divergence.
        mean_samples, seed: DDIM draws behind ``mean`` (even); seed of their noise and of the Hutchinson probes.

    Raises:
        ValueError: an unknown ``beta_schedule`` or ``prediction_type``, ``timesteps`` not a positive integer,
            ``sampling_steps`` not between 1 and ``timesteps``, ``mean_samples`` not even and positive.

    References:
        Ho et al. 2020 (DDPM, arXiv:2006.11239); Song et al. 2021 (DDIM, arXiv:2010.02502);
        Peebles & Xie 2023 (DiT, arXiv:2212.09748); Song et al. 2021 (arXiv:2011.13456).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        hidden: int = 64,
        depth: int = 3,
        mlp_ratio: int = 2,
        timesteps: int = 1000,
        sampling_steps: int = 50,
        beta_schedule: str = "linear",
        prediction_type: str = "v_prediction",
        time_scale: float = 100.0,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        t_min: float = 1e-5,
        exact_divergence_max_dim: int = 8,
        mean_samples: int = 8,
        seed: int = 0,
    ):
        super().__init__(dim, cond_dim)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if not is_count(timesteps):
            raise ValueError(f"timesteps={timesteps!r}: a positive number of diffusion steps")
        if not 1 <= sampling_steps <= timesteps:
            raise ValueError(
                f"sampling_steps={sampling_steps} must be between 1 and timesteps={timesteps}: "
                f"DDIM's steps are a subset of the training schedule's"
            )
        if mean_samples < 2 or mean_samples % 2:
            raise ValueError(f"mean_samples must be even and positive (antithetic pairs), got {mean_samples}")
        self.timesteps, self.sampling_steps, self.time_scale = timesteps, sampling_steps, time_scale
        self.rtol, self.atol, self.t_min = rtol, atol, t_min
        self.exact_divergence_max_dim, self.mean_samples, self.seed = exact_divergence_max_dim, mean_samples, seed
        self.parametrization = PREDICTION_TYPES[prediction_type]
        schedule = dict(num_train_timesteps=timesteps, beta_schedule=beta_schedule, clip_sample=False,
                        prediction_type=prediction_type)
        self.ddpm = DDPMScheduler(**schedule)
        self.ddim = DDIMScheduler(**schedule, timestep_spacing="trailing")
        rate = -timesteps * torch.log1p(-self.ddpm.betas.double())
        rate = torch.cat([rate[:1], rate, rate[-1:]])  # β at the knots (j − ½)/T, j = 0 … T + 1
        integral = torch.cat([rate[:1] * -0.5, (rate[1:] + rate[:-1]) / 2]).cumsum(0) / timesteps
        self.register_buffer("beta_knots", rate.float(), persistent=False)
        self.register_buffer("beta_integral", integral.float(), persistent=False)  # ∫₀ β up to each knot

        width = max(hidden, dim)
        self.t_freq = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embed = TimestepEmbedding(width, width)
        self.c_embed = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        # every block's (shift, scale, gate), then the output layer's (shift, scale)
        self.modulation = nn.Linear(width, (3 * depth + 2) * width)
        nn.init.zeros_(self.modulation.weight[: 3 * depth * width])
        nn.init.zeros_(self.modulation.bias[: 3 * depth * width])
        self.x_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(width, dim)

    def _modulation(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``[N, (3·depth + 2)·W]`` from continuous time ``t`` (``[N]`` or ``[1]``) and ``c = c_embed(cond)``."""
        return self.modulation(F.silu(self.t_embed(self.t_freq(t * self.time_scale)) + c))

    def _denoiser(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """The network's prediction (v̂ or ε̂) ``[..., N, D]`` from noisy ``x [..., N, D]`` and ``mod [N, ·]``."""
        width = self.x_in.out_features
        *mods, final = mod.split([3 * width] * len(self.blocks) + [2 * width], dim=-1)
        h = self.x_in(x)
        for block, m in zip(self.blocks, mods):
            h = block(h, m)
        shift, scale = final.chunk(2, dim=-1)
        return self.out(self.norm_out(h) * (1 + scale) + shift)

    def _eps(self, x: torch.Tensor, mod: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ε̂ ``[..., N, D]`` at noise level ``σ`` (a scalar tensor), whatever the network predicts."""
        return self.parametrization.eps_from_output(self._denoiser(x, mod), x, sigma)

    def _vp(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(β(t), σ(t))`` of the continuous VP SDE at ``t ∈ [0, 1]`` (any shape)."""
        u = t * self.timesteps + 0.5
        j = u.floor().clamp(0, self.timesteps).long()
        frac, lo, hi = u - j, self.beta_knots[j], self.beta_knots[j + 1]
        beta = lo + frac * (hi - lo)
        log_alpha_bar = -(self.beta_integral[j] + frac * (lo + beta) / (2 * self.timesteps))
        return beta, torch.sqrt(-torch.expm1(log_alpha_bar))

    @fp32
    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = torch.randint(0, self.timesteps, (len(target),))  # on CPU, where the scheduler's tables live
        noise = torch.randn_like(target)
        noisy = self.ddpm.add_noise(target, noise, k)
        t = (k + 1).to(target.device, torch.float32) / self.timesteps
        prediction = self._denoiser(noisy, self._modulation(t, self.c_embed(cond)))
        return F.mse_loss(prediction, self.parametrization.training_target(self.ddpm, target, noise, k))

    @fp32
    @torch.no_grad()
    def log_prob(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n, d = target.shape
        c = self.c_embed(cond)
        probe = None
        if d > self.exact_divergence_max_dim:
            g = torch.Generator(device=target.device).manual_seed(self.seed)
            probe = torch.randint(0, 2, (n, d), generator=g, device=target.device).float() * 2 - 1

        def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            beta, sigma = self._vp(t)
            mod = self._modulation(t.reshape(1), c)
            with torch.enable_grad():  # the divergence needs autograd even when the caller is under no_grad
                x = state[0].detach().requires_grad_(True)
                eps = self._eps(x, mod, sigma)
                if probe is None:  # tr(∂ε̂/∂x), one vector-Jacobian product per dimension
                    trace = sum(torch.autograd.grad(eps[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(d))
                else:
                    trace = (torch.autograd.grad(eps, x, probe)[0] * probe).sum(-1)
            drift = -0.5 * beta * (x.detach() - eps.detach() / sigma)
            return drift, -0.5 * beta * (d - trace / sigma)

        times = torch.tensor([self.t_min, 1.0], device=target.device)
        x, div = odeint(dynamics, (target, target.new_zeros(n)), times, rtol=self.rtol, atol=self.atol, method="dopri5")
        return -0.5 * (x[-1] ** 2).sum(-1) - 0.5 * d * math.log(2 * math.pi) + div[-1]

    def _ddim(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDIM (η = 0) from ``noise [S, N, D]`` given ``cond [N, C]`` → ``[S, N, D]``, all at once.

        The context's modulation is computed once per step for the N rows and broadcast over the S samples.
        """
        c = self.c_embed(cond)
        x = noise
        self.ddim.set_timesteps(self.sampling_steps)
        for k in self.ddim.timesteps.tolist():
            t = torch.full((1,), (k + 1) / self.timesteps, device=x.device)
            x = self.ddim.step(self._denoiser(x, self._modulation(t, c)), k, x).prev_sample
        return x

    @fp32
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        return self._ddim(cond, torch.randn(num_samples, len(cond), self.dim, device=cond.device))

    @fp32
    @torch.no_grad()
    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=cond.device).manual_seed(self.seed)
        noise = torch.randn(self.mean_samples // 2, len(cond), self.dim, generator=g, device=cond.device)
        return self._ddim(cond, torch.cat([noise, -noise])).mean(0)
