"""Flow head: a conditional normalizing flow (nflows) on a standard normal or Gaussian-mixture base, or a mixture of
such flows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nflows.distributions import StandardNormal
from nflows.distributions.base import Distribution
from nflows.flows import Flow
from nflows.nn.nets import ResidualNet
from nflows.transforms import (
    AffineCouplingTransform,
    CompositeTransform,
    PiecewiseRationalQuadraticCouplingTransform,
    ReversePermutation,
)
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from . import register_head
from ..config import is_count, is_finite_number
from .base import Head, fp32
from .layers import mlp

# Bound on |log scale| per affine layer (a soft clamp) so that a bad step cannot overflow the Jacobian.
MAX_LOG_SCALE = 5.0


class _AffineCoupling(AffineCouplingTransform):
    """nflows' affine coupling with scale ``exp(b · tanh(s / b))`` instead of ``sigmoid(s + 2)``.

    nflows bounds the data → noise scale by 1.001, so a stack of its affine layers can only
    contract and cannot fit a target whose conditional spread is below one; this scale
    expands or contracts by up to ``e^b`` per layer, and is 1 at ``s = 0``.
    """

    def _scale_and_shift(self, transform_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_transform_features
        raw = transform_params[:, n:]
        return torch.exp(MAX_LOG_SCALE * torch.tanh(raw / MAX_LOG_SCALE)), transform_params[:, :n]


def rational_quadratic_spline(
    inputs: torch.Tensor,
    params: torch.Tensor,
    num_bins: int,
    tail_bound: float,
    inverse: bool = False,
    softmax_scale: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotonic rational-quadratic spline on ``[-B, B]``, identity outside (linear tails).

    Durkan et al. 2019 (arXiv:1906.04032), sec. 3.1: eq. 4 (the map within bin ``k``), eq. 5 (its derivative);
    the inverse solves the quadratic of their appendix A. Same parametrization and
    results as nflows' ``unconstrained_rational_quadratic_spline(tails="linear")``,
    but laid out bins-first (``[3K − 1, N, F]``): the softmax, cumsum and gathers then
    run along a leading axis over long contiguous rows instead of along a last axis of
    length ``K``, and nothing is gathered by a boolean mask: about twice as fast on CPU.

    Args:
        inputs: ``[N, F]``.
        params: ``[N, F, 3K − 1]`` unnormalized widths (``K``), heights (``K``) and
            interior-knot derivatives (``K − 1``); the two end knots have slope 1.
        softmax_scale: multiplies the width and height logits (nflows: 1/√hidden).
    Returns:
        outputs ``[N, F]`` and ``log |d out / d in|`` ``[N, F]``.
    """
    k, b = num_bins, tail_bound
    p = params.movedim(-1, 0).contiguous()  # [3K - 1, N, F]
    widths = min_bin_width + (1 - min_bin_width * k) * torch.softmax(p[:k] * softmax_scale, dim=0)
    heights = min_bin_height + (1 - min_bin_height * k) * torch.softmax(p[k : 2 * k] * softmax_scale, dim=0)
    edge = torch.ones_like(inputs)[None]
    slopes = torch.cat([edge, min_derivative + F.softplus(p[2 * k :]), edge])  # [K + 1, N, F]

    def knots(sizes: torch.Tensor) -> torch.Tensor:  # [K, N, F] fractions → [K + 1, N, F] positions
        inner = 2 * b * torch.cumsum(sizes, dim=0)[:-1] - b
        return torch.cat([-b * edge, inner, b * edge])

    xs, ys = knots(widths), knots(heights)
    widths, heights = xs[1:] - xs[:-1], ys[1:] - ys[:-1]
    inside = (inputs >= -b) & (inputs <= b)
    x = inputs.clamp(-b, b)
    grid = ys if inverse else xs
    bin_ = (x[None] >= grid[1:-1]).sum(0, keepdim=True)  # [1, N, F], 0 … K − 1

    def at(t: torch.Tensor) -> torch.Tensor:
        return t.gather(0, bin_)[0]

    x_k, y_k, w_k, h_k, d_k, d_k1 = at(xs), at(ys), at(widths), at(heights), at(slopes), at(slopes[1:])
    s_k = h_k / w_k
    curvature = d_k1 + d_k - 2 * s_k
    if inverse:  # the root of the quadratic in ξ that lies in [0, 1]
        dy = x - y_k
        a = dy * curvature + h_k * (s_k - d_k)
        b_ = h_k * d_k - dy * curvature
        c = -s_k * dy
        xi = 2 * c / (-b_ - torch.sqrt((b_.square() - 4 * a * c).clamp_min(0)))
    else:
        xi = (x - x_k) / w_k
    xi_1 = xi * (1 - xi)
    denominator = s_k + curvature * xi_1
    numerator = s_k.square() * (d_k1 * xi.square() + 2 * s_k * xi_1 + d_k * (1 - xi).square())
    logabsdet = torch.log(numerator) - 2 * torch.log(denominator)  # of the forward map, at ξ
    if inverse:
        out, logabsdet = xi * w_k + x_k, -logabsdet
    else:
        out = y_k + h_k * (s_k * xi.square() + d_k * xi_1) / denominator
    return torch.where(inside, out, inputs), torch.where(inside, logabsdet, 0.0)


class _SplineCoupling(PiecewiseRationalQuadraticCouplingTransform):
    """nflows' rational-quadratic coupling (linear tails) evaluated by :func:`rational_quadratic_spline`."""

    def _piecewise_cdf(
        self, inputs: torch.Tensor, transform_params: torch.Tensor, inverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rational_quadratic_spline(
            inputs,
            transform_params,
            self.num_bins,
            self.tail_bound,
            inverse=inverse,
            softmax_scale=1.0 / math.sqrt(self.transform_net.hidden_features),  # as nflows
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
        )


def start_at_identity(coupling: nn.Module) -> None:
    """Set a coupling layer (:class:`_AffineCoupling`, :class:`_SplineCoupling`) to the identity: its conditioner's
    last layer outputs scale 1 / shift 0, or equal bins with slope 1 at every knot (``softplus⁻¹(1 − min slope)``)."""
    final = coupling.transform_net.final_layer
    nn.init.zeros_(final.weight)
    nn.init.zeros_(final.bias)
    if isinstance(coupling, _SplineCoupling):
        with torch.no_grad():
            k = coupling.num_bins
            params = final.bias.view(-1, 3 * k - 1)  # [features, widths K | heights K | inner slopes K - 1]
            params[:, 2 * k :] = math.log(math.expm1(1 - coupling.min_derivative))


class _MixtureBase(Distribution):
    """A flow's base distribution set by its context: ``K`` diagonal Gaussians (an MDN, Bishop 1994) whose weights,
    means and log-scales are a linear map of the context embedding ``[N, H]``; samples ``[N, S, D]``.

    The means start apart (weights of std 1/√H on an O(1) embedding), the scales at 1, the weights uniform.
    """

    def __init__(self, dim: int, context_features: int, num_components: int):
        super().__init__()
        self.dim, self.num_components = dim, num_components
        self.net = nn.Linear(context_features, num_components * (2 * dim + 1))
        nn.init.normal_(self.net.weight, std=context_features ** -0.5)
        nn.init.zeros_(self.net.bias)
        with torch.no_grad():
            rows = self.net.weight.view(num_components, 2 * dim + 1, context_features)
            rows[:, dim:].zero_()  # log-scales 0, logits 0

    def distribution(self, context: torch.Tensor) -> MixtureSameFamily:
        p = self.net(context).view(len(context), self.num_components, 2 * self.dim + 1)
        mean, log_scale, logits = p[..., : self.dim], p[..., self.dim : -1], p[..., -1]
        scale = torch.exp(MAX_LOG_SCALE * torch.tanh(log_scale / MAX_LOG_SCALE))
        components = Independent(Normal(mean, scale, validate_args=False), 1, validate_args=False)
        return MixtureSameFamily(Categorical(logits=logits, validate_args=False), components, validate_args=False)

    def _log_prob(self, inputs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.distribution(context).log_prob(inputs)

    def _sample(self, num_samples: int, context: torch.Tensor) -> torch.Tensor:
        return self.distribution(context).sample((num_samples,)).transpose(0, 1)


@register_head("flow")
class FlowHead(Head):
    """Conditional normalizing flow ``y = f(z; c)``, ``z`` from its base, or a mixture of ``K`` of them; exact log p.

    Data → noise, the flow applies: a conditional element-wise affine layer (shift and
    scale are functions of the context only: it standardizes ``y`` given ``c``), then
    ``num_layers`` coupling layers separated by a reverse permutation, so each coordinate
    is transformed every other layer conditioned on the other half and the context.
    Couplings are affine (RealNVP) or monotonic rational-quadratic splines with linear
    tails outside ``[-tail_bound, tail_bound]`` (neural spline flow). The context goes
    through a shared MLP embedding; every conditioner (an nflows ``ResidualNet``) sees
    it at its input and gates each residual block with it. With ``D = 1`` a coupling has
    no other half to read, so every layer is element-wise in the context alone; the
    spline layers then still model multimodal 1-D targets, the affine ones a Gaussian.

    With ``num_components = K > 1`` the head is a mixture of ``K`` such flows that share their networks and differ
    in the component's one-hot index appended to the context: ``p(y | c) = Σ_k π_k(c) p_f(y | c, k)``, the weights
    ``π(c)`` from an MLP (softmax; uniform at initialization), the log-density a logsumexp over ``K`` flow passes.
    One flow over ``N(0, I)`` is a diffeomorphism of a Gaussian, so it cannot put zero density between two separated
    modes: it keeps a bridge of mass between them unless its Jacobian grows without bound (Cornish et al. 2020), and
    learns the sharp map slowly (README, "The head comparison": on the 64-D ``ambiguous`` task one flow over
    ``N(0, I)`` puts 52 % of its samples nearer a mode than the midpoint after 300 steps, two flows 80 %, the truth
    89 %). Each component needs only one mode; the mixture weight picks it. The index enters the context embedding
    with weights of O(1), so the components start apart whatever the width of ``c``. In the JEPA the weights collapse
    onto one component at every seed tried (README, "The head comparison"), so one flow is the preset.

    With ``base_components = K > 1`` the base is itself a mixture set by the context (an MDN in the coordinates the
    first, standardizing layer produces, reversed when ``num_layers`` is even), and ``hold_steps`` keeps the
    couplings at the identity while it learns: the base then splits the modes first, as the MDN head does, and the
    couplings refine each mode afterwards.
    Unheld, the couplings explain the second mode as a dependence between the halves of the target before the
    base's components separate (README, "The head comparison"). The preset (``experiments/conf/predictor/flow.yaml``)
    has ``base_components=4``, ``hold_steps=300`` since 2026-12-05; the defaults here (1, 0) are what a saved config
    without the keys was trained with.

    Sampling inverts all layers in one pass (couplings, not autoregressive layers), each draw with its component.
    ``mean`` is the Monte-Carlo mean of ``S = mean_samples`` draws from a fixed seed (the
    global RNG state is restored), so the same input gives the same output; its standard
    error is ``std(y | c) / √S`` per coordinate. It costs ``S`` inverse passes.

    Args:
        dim, cond_dim: target and condition widths.
        transform: ``affine`` | ``spline``.
        num_layers: coupling layers.
        hidden: width of the context embedding and of the conditioner networks.
        num_blocks: residual blocks per conditioner network.
        num_bins, tail_bound: rational-quadratic spline bins, and the half-width of the
            interval the splines act on (identity outside), in the units the first,
            standardizing layer produces.
        mean_samples: draws averaged by ``mean``.
        num_components: ``K``, flows in the mixture (1: one flow, no mixture weights).
        base_components: Gaussians in the base distribution (1: ``N(0, I)``; more: a mixture whose weights, means
            and scales are set by the context embedding, :class:`_MixtureBase`).
        hold_steps: optimizer steps during which the coupling layers stay at the identity they start at (their
            learning rate is 0, :meth:`held_parameters`), so a mixture base splits the modes before the couplings
            can explain them as a dependence between the halves of the target (README, "The head comparison": on
            a JEPA's frozen rows, base K = 4 held 300 of 1000 steps puts 0.95-0.98 of the marker's samples on a
            mode; unheld 0.50, one flow 0.16-0.20). The training loop enforces it (the trainer's
            :func:`~prob_jepa.train.param_groups`, :func:`~prob_jepa.synthetic.train_head`; an optimizer built
            from ``parameters()`` alone ignores it). The optimizer's moments of the held couplings follow their
            gradients through the hold, so their first steps after it are ordinary Adam steps, and their gradients
            count in the clipped gradient norm. 0: the couplings start as nflows initializes them and train from
            the first step.

    Raises:
        ValueError: an unknown ``transform``; ``num_components``, ``base_components``, ``hidden`` or
            ``mean_samples`` not a positive integer; ``num_layers``, ``num_blocks`` or ``hold_steps`` not a
            non-negative integer; for splines, ``num_bins`` not a positive integer or ``tail_bound`` not a finite
            number > 0.

    References:
        Dinh et al., Density estimation using Real NVP, arXiv:1605.08803 (eq. 4-6);
        Durkan et al., Neural Spline Flows, arXiv:1906.04032 (sec. 3.1, linear tails);
        Papamakarios et al., Normalizing Flows for Probabilistic Modeling and Inference,
        arXiv:1912.02762 (eq. 2, change of variables);
        Dinh et al., A RAD approach to deep mixture models, arXiv:1903.07714 (a discrete latent that picks an
        invertible piece: the same remedy);
        Izmailov et al., Semi-supervised learning with normalizing flows, arXiv:1912.13025 (a flow with a
        Gaussian-mixture base);
        Cornish et al., Relaxing bijectivity constraints with continuously indexed normalising flows,
        arXiv:1909.13833 (sec. 2: one flow cannot separate the support of its base into disjoint modes).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        transform: str = "spline",
        num_layers: int = 2,
        hidden: int = 64,
        num_blocks: int = 1,
        num_bins: int = 5,
        tail_bound: float = 5.0,
        mean_samples: int = 32,
        num_components: int = 1,
        base_components: int = 1,
        hold_steps: int = 0,
    ):
        super().__init__(dim, cond_dim)
        if transform not in ("affine", "spline"):
            raise ValueError(f"transform {transform!r}; valid: affine, spline")
        if not is_count(num_components):
            raise ValueError(f"num_components={num_components!r}: a positive number of flows in the mixture")
        if not is_count(base_components):
            raise ValueError(f"base_components={base_components!r}: a positive number of Gaussians in the base")
        if not is_count(hold_steps, low=0):
            raise ValueError(f"hold_steps={hold_steps!r}: a number of optimizer steps >= 0")
        if not is_count(num_layers, low=0):
            raise ValueError(f"num_layers={num_layers!r}: a number of coupling layers >= 0")
        if not is_count(num_blocks, low=0):
            raise ValueError(f"num_blocks={num_blocks!r}: a number of residual blocks >= 0")
        for name, value in (("hidden", hidden), ("mean_samples", mean_samples)):
            if not is_count(value):
                raise ValueError(f"{name}={value!r}: a positive integer")
        if transform == "spline":  # an affine flow reads neither
            if not is_count(num_bins):
                raise ValueError(f"num_bins={num_bins!r}: a positive integer")
            if not (is_finite_number(tail_bound) and tail_bound > 0):
                raise ValueError(f"tail_bound={tail_bound!r}: a finite number > 0 (the splines act on [-tail_bound, "
                                 f"tail_bound])")
        self.mean_samples, self.num_components = mean_samples, num_components

        def conditioner(in_features: int, out_features: int) -> nn.Module:
            return ResidualNet(in_features, out_features, hidden, context_features=hidden, num_blocks=num_blocks)

        def coupling(mask: torch.Tensor) -> nn.Module:
            if transform == "affine":
                return _AffineCoupling(mask, conditioner)
            return _SplineCoupling(mask, conditioner, num_bins=num_bins, tails="linear", tail_bound=tail_bound)

        # the second half is transformed; for D = 1 that is the only coordinate
        half = (torch.arange(dim) >= dim // 2).float()
        layers = [_AffineCoupling(torch.ones(dim), conditioner)]
        for i in range(num_layers):
            if i > 0 and dim > 1:
                layers.append(ReversePermutation(dim))
            layers.append(coupling(half))
        indexed = cond_dim + (num_components if num_components > 1 else 0)  # the component's one-hot index
        embed = nn.Sequential(nn.Linear(indexed, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # The index moves the context embedding by O(1) whatever the condition's width, so the components start
        # apart (as the MDN spreads its means); at nn.Linear's 1/√fan-in it is one input among C + K and they start
        # as one (the 64-D ``ambiguous`` task with C = 192, 300 steps: on-mode 0.52 instead of 0.87).
        nn.init.normal_(embed[0].weight[:, cond_dim:])
        base = StandardNormal([dim]) if base_components == 1 else _MixtureBase(dim, hidden, base_components)
        self.flow = Flow(CompositeTransform(layers), base, embedding_net=embed)
        self.hold_steps = hold_steps
        if hold_steps:
            for layer in self._couplings():
                start_at_identity(layer)
        self.weights = mlp(cond_dim, hidden, num_components) if num_components > 1 else None
        if self.weights is not None:  # uniform mixture weights at initialization
            nn.init.zeros_(self.weights[-1].weight)
            nn.init.zeros_(self.weights[-1].bias)

    def _log_weights(self, cond: torch.Tensor) -> torch.Tensor:
        """``log π(c)`` ``[N, K]`` of a mixture (``K > 1``)."""
        return self.weights(cond).log_softmax(-1)

    def _context(self, cond: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
        """A mixture's flow context of rows ``cond [M, C]`` in components ``[M]``: ``[M, C + K]``."""
        return torch.cat([cond, F.one_hot(component, self.num_components).to(cond.dtype)], -1)

    @fp32
    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().loss(cond, target)

    def _couplings(self) -> list[nn.Module]:
        """The coupling layers after the first, standardizing one."""
        return [t for t in self.flow._transform._transforms if isinstance(t, (_AffineCoupling, _SplineCoupling))][1:]

    def held_parameters(self) -> list[nn.Parameter]:
        """The coupling layers' parameters when ``hold_steps > 0`` (not the first, standardizing layer's)."""
        return [p for layer in self._couplings() for p in layer.parameters()] if self.hold_steps else []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # heads of fd10cd3 to 85b5553 counted their hold in a buffer; the trainer's step counts it now
        state_dict.pop(prefix + "updates", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @fp32
    def log_prob(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``[N]`` nats: ``logsumexp_k (log π_k(c) + log p_f(y | c, k))``, the ``K`` flow passes as one batch."""
        if self.weights is None:  # one flow: no copies of the rows, no logsumexp
            return self.flow.log_prob(target, context=cond)
        K, N = self.num_components, len(cond)
        component = torch.arange(K, device=cond.device).repeat_interleave(N)
        log_p = self.flow.log_prob(target.repeat(K, 1), context=self._context(cond.repeat(K, 1), component))
        return torch.logsumexp(self._log_weights(cond) + log_p.view(K, N).T, dim=-1)

    @fp32
    def sample(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``[S, N, D]``: each draw picks its component from ``π(c)``, then inverts the flow in one pass."""
        N, S = len(cond), num_samples
        if self.weights is None:  # one flow: the draws of the head before mixtures, bit for bit
            return self.flow.sample(S, context=cond).transpose(0, 1)
        weights = torch.distributions.Categorical(logits=self._log_weights(cond), validate_args=False)
        component = weights.sample((S,)).T  # [N, S]
        context = self._context(cond.repeat_interleave(S, 0), component.flatten())
        return self.flow.sample(1, context=context).view(N, S, self.dim).transpose(0, 1)

    @fp32
    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        device = cond.device
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            torch.manual_seed(0)
            return self.sample(cond, self.mean_samples).mean(0)
