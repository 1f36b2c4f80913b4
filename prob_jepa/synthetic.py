"""Synthetic conditional densities with known log-density and conditional entropy.

Each task draws a context ``c ~ U(-1, 1)`` (``cond = [c]`` padded with fixed
features to ``cond_dim``) and a target ``y ∈ R^D`` from a known ``p(y | c)``, so
a head's held-out NLL can be compared with the true conditional entropy
``H(Y | C) = E[-log p(y | c)]``: the difference (excess NLL, nats) is what the
head fails to model. The 2-D structure of the bimodal task is rotated into D
dimensions by a fixed orthogonal matrix, so it is not axis-aligned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pyro.distributions import MultivariateStudentT

from .heads import Head


def cond_features(c: torch.Tensor, cond_dim: int) -> torch.Tensor:
    """``c [N] → [N, cond_dim]``: ``c`` followed by fixed sinusoidal features of it."""
    freqs = torch.arange(1, cond_dim, dtype=torch.float32, device=c.device)
    return torch.cat([c[:, None], torch.sin(freqs * math.pi * c[:, None] / 2)], dim=1)[:, :cond_dim]


def _orthogonal(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
    return q


@dataclass
class Task:
    """Base: subclasses define ``sample_y`` and ``log_prob``; ``entropy`` is ``E[-log p]``."""

    dim: int
    cond_dim: int = 8
    seed: int = 0
    name: str = field(init=False, default="task")

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c [N], cond [N, C], y [N, D])``."""
        c = torch.rand(n, generator=generator) * 2 - 1
        return c, cond_features(c, self.cond_dim), self.sample_y(c, generator)

    def sample_y(self, c: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def entropy(self, n: int = 200_000, seed: int = 12345) -> float:
        """Conditional entropy ``H(Y | C)`` in nats (exact where a closed form exists, else Monte Carlo)."""
        c, _, y = self.sample(n, torch.Generator().manual_seed(seed))
        return -self.log_prob(y, c).mean().item()


@dataclass
class BimodalTask(Task):
    """Two Gaussian modes at ``±2·(cos πc, sin πc)`` (rotated into D dims), weights ``(w, 1 − w)``, std σ."""

    weight: float = 0.5
    sigma: float = 0.3
    name: str = field(init=False, default="bimodal")

    def __post_init__(self):
        self.rotation = _orthogonal(self.dim, self.seed)

    def centre(self, c: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` centre of the first mode; the second is its negation."""
        mu = torch.zeros(len(c), self.dim)
        mu[:, 0] = 2 * torch.cos(math.pi * c)
        if self.dim > 1:
            mu[:, 1] = 2 * torch.sin(math.pi * c)
        return mu @ self.rotation.T

    def sample_y(self, c, generator):
        sign = torch.where(torch.rand(len(c), generator=generator) < self.weight, 1.0, -1.0)
        return sign[:, None] * self.centre(c) + self.sigma * torch.randn(len(c), self.dim, generator=generator)

    def log_prob(self, y, c):
        mu = self.centre(c)
        norm = -0.5 * self.dim * math.log(2 * math.pi * self.sigma**2)
        lp = torch.stack(
            [
                math.log(self.weight) - 0.5 * ((y - mu) ** 2).sum(-1) / self.sigma**2,
                math.log(1 - self.weight) - 0.5 * ((y + mu) ** 2).sum(-1) / self.sigma**2,
            ]
        )
        return torch.logsumexp(lp, 0) + norm

    def mode_of(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` 0 where a sample is nearer the first mode, 1 where nearer the second."""
        mu = self.centre(c)
        return ((y - mu).norm(dim=-1) > (y + mu).norm(dim=-1)).long()


@dataclass
class AmbiguousTask(BimodalTask):
    """The bimodal task with the `shapes` marker's weights (0.7 / 0.3) and modes only 5 σ apart (σ = 0.8, gap 4):
    along the axis between the modes a sample's coordinate has std 0.2 (modes at 0 and 1), so Φ(1.25) = 89.4 % of
    the true draws lie nearer a mode than the midpoint, while the spread over the other D − 1 directions,
    0.8·√(D − 1), exceeds the gap from D = 27 on. A head can fit its likelihood to within 0.01 nats/dim with its
    samples between the modes (README, "The head comparison"); the on-mode share of
    :func:`~prob_jepa.eval.multimodality.on_mode_share` tells the two apart."""

    weight: float = 0.7
    sigma: float = 0.8
    name: str = field(init=False, default="ambiguous")


@dataclass
class HeteroscedasticTask(Task):
    """``y = m(c) + σ(c) ⊙ ε``; σ grows with c and differs per dimension."""

    name: str = field(init=False, default="heteroscedastic")

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self.a = torch.randn(self.dim, generator=g)
        self.b = 0.5 + torch.rand(self.dim, generator=g)

    def loc(self, c):
        return torch.sin(2 * c[:, None] + self.a)

    def scale(self, c):
        return 0.05 + 0.4 * self.b * (1 + c[:, None]) / 2

    def sample_y(self, c, generator):
        return self.loc(c) + self.scale(c) * torch.randn(len(c), self.dim, generator=generator)

    def log_prob(self, y, c):
        s = self.scale(c)
        return (-0.5 * ((y - self.loc(c)) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)


@dataclass
class HeavyTailedTask(Task):
    """Multivariate Student-t: ``y = m(c) + s · z / √w``, ``z ~ N(0, I_D)``, one ``w ~ χ²_ν / ν`` per row.

    The heavy-tailed density every head family can represent in any ``D``: a Gaussian
    scale mixture shared by the coordinates (elliptical), so a mixture of Gaussians
    with a few scales approximates it, as do autoregressive and flow heads.
    """

    df: int = 3
    scale: float = 0.3
    name: str = field(init=False, default="heavy_tailed")

    def __post_init__(self):
        self.a = torch.randn(self.dim, generator=torch.Generator().manual_seed(self.seed))

    def loc(self, c):
        return torch.cos(2 * c[:, None] + self.a)

    def sample_y(self, c, generator):
        z = torch.randn(len(c), self.dim, generator=generator)
        chi2 = (torch.randn(len(c), self.df, generator=generator) ** 2).sum(-1, keepdim=True)
        return self.loc(c) + self.scale * z / torch.sqrt(chi2 / self.df)

    def log_prob(self, y, c):
        scale_tril = self.scale * torch.eye(self.dim)
        return MultivariateStudentT(float(self.df), self.loc(c), scale_tril).log_prob(y)

    def entropy(self, n: int = 0, seed: int = 0) -> float:
        """Closed form: ``log Γ(ν/2) − log Γ((ν+D)/2) + D/2·log(νπ) + D·log s + (ν+D)/2·[ψ((ν+D)/2) − ψ(ν/2)]``."""
        nu, d = float(self.df), self.dim
        digamma = torch.special.digamma(torch.tensor([(nu + d) / 2, nu / 2], dtype=torch.float64))
        return (
            math.lgamma(nu / 2) - math.lgamma((nu + d) / 2) + d / 2 * math.log(nu * math.pi)
            + d * math.log(self.scale) + (nu + d) / 2 * (digamma[0] - digamma[1]).item()
        )


@dataclass
class HeavyTailedProductTask(HeavyTailedTask):
    """``y = m(c) + s · t_ν`` with *independent* Student-t coordinates.

    Its density is a product of ``D`` one-dimensional scale mixtures; a diagonal
    K-component mixture can match it only with ``K^D`` components, so at ``D = 32``
    the MDN head's excess NLL measures that structural limit rather than training.
    Not in the benchmark's default task list.
    """

    name: str = field(init=False, default="heavy_tailed_product")

    def sample_y(self, c, generator):
        z = torch.randn(len(c), self.dim, generator=generator)
        chi2 = (torch.randn(len(c), self.dim, self.df, generator=generator) ** 2).sum(-1)
        return self.loc(c) + self.scale * z / torch.sqrt(chi2 / self.df)

    def log_prob(self, y, c):
        return torch.distributions.StudentT(self.df, self.loc(c), self.scale).log_prob(y).sum(-1)

    def entropy(self, n: int = 0, seed: int = 0) -> float:
        return self.dim * torch.distributions.StudentT(float(self.df), 0.0, self.scale).entropy().item()


TASKS = {t.name: t for t in (BimodalTask, AmbiguousTask, HeteroscedasticTask, HeavyTailedTask, HeavyTailedProductTask)}


def train_head(
    head: Head,
    task: Task,
    steps: int,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Fit ``head`` to ``task`` by its own ``loss`` (Adam, cosine decay; the head's held parameters at learning
    rate 0 for its first ``hold_steps`` steps, :meth:`~prob_jepa.heads.Head.held_parameters`); returns the loss
    curve."""
    g = torch.Generator().manual_seed(seed)
    held = head.held_parameters()
    ids = {id(p) for p in held}
    groups = [{"params": [p for p in head.parameters() if id(p) not in ids]}] + ([{"params": held}] if held else [])
    opt = torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    head.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups[1:]:  # held: the schedule's learning rate from step hold_steps on
            group["lr"] = opt.param_groups[0]["lr"] if step >= head.hold_steps else 0.0
        _, cond, y = task.sample(batch_size, g)
        loss = head.loss(cond, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 10.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    head.eval()
    return losses
