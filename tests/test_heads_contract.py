"""The head contract (DESIGN.md), run over every head that has a config file."""
from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import HEAD_CONFIGS
from prob_jepa.eval.metrics import pearson_r
from prob_jepa.heads import HEADS, build_head
from prob_jepa.synthetic import BimodalTask, cond_features, train_head

NAMES = sorted(HEAD_CONFIGS)
PROBABILISTIC = [n for n in NAMES if n != "deterministic"]
D, C, N, S = 3, 5, 7, 4


def make(name: str, dim: int = D, cond_dim: int = C, seed: int = 0):
    torch.manual_seed(seed)
    return build_head(name, dim=dim, cond_dim=cond_dim, **HEAD_CONFIGS[name])


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g), torch.randn(N, D, generator=g)


def test_every_config_names_a_registered_head():
    assert set(NAMES) <= set(HEADS), f"configs without a head: {set(NAMES) - set(HEADS)}"
    assert {"deterministic", "mdn", "autoregressive", "flow", "diffusion"} <= set(NAMES)


def test_unknown_head_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_head("gaussian_process", dim=2, cond_dim=2)
    for name in HEADS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_head_option_lists_valid_options(name):
    with pytest.raises(TypeError, match="valid options"):
        build_head(name, dim=2, cond_dim=2, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_shapes(name):
    head = make(name)
    cond, y = data()
    assert head.loss(cond, y).shape == ()
    assert head.log_prob(y, cond).shape == (N,)
    assert head.energy(y, cond).shape == (N,)
    assert head.mean(cond).shape == (N, D)
    assert head.sample(cond, S).shape == (S, N, D)
    assert torch.isfinite(head.log_prob(y, cond)).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_receives_a_gradient(name):
    head = make(name)
    cond, y = data()
    cond.requires_grad_(True)
    head.loss(cond, y).backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0, "no gradient reaches the predictor trunk"
    for pname, p in head.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_is_deterministic_and_eval_equals_train(name):
    head = make(name)
    cond, y = data()
    a = head.train().log_prob(y, cond)
    b = head.eval().log_prob(y, cond)
    c = head.log_prob(y, cond)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, c)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name):
    head = make(name, seed=0)
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    other = make(name, seed=1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    cond, y = data()
    torch.testing.assert_close(head.eval().log_prob(y, cond), other.eval().log_prob(y, cond))


@pytest.mark.parametrize("name", NAMES)
def test_stable_under_bf16_autocast(name):
    head = make(name).eval()
    cond, y = data()
    ref = head.log_prob(y, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = head.log_prob(y, cond.bfloat16())
        loss = head.loss(cond.bfloat16(), y.bfloat16())
    assert lp.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(lp, ref, rtol=1e-2, atol=0.1)


# ---------------------------------------------------------------- trained heads
STEPS = {"diffusion": 1000}


@pytest.fixture(scope="module")
def trained():
    """Each head fitted once to the 1-D and the 2-D bimodal task (cached across tests)."""
    cache = {}

    def get(name: str, dim: int):
        if (name, dim) not in cache:
            task = BimodalTask(dim=dim, cond_dim=8, weight=0.5, sigma=0.3)
            head = make(name, dim=dim, cond_dim=8)
            train_head(head, task, steps=STEPS.get(name, 1500), batch_size=256, lr=3e-3)
            cache[name, dim] = (head, task)
        return cache[name, dim]

    return get


def grid_integral(head, cond: torch.Tensor, dim: int, half_width: float, points: int) -> float:
    axis = torch.linspace(-half_width, half_width, points)
    step = (axis[1] - axis[0]).item()
    grid = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
    with torch.no_grad():
        lp = torch.cat([head.log_prob(y, cond.expand(len(y), -1)) for y in grid.split(8192)])
    return (lp.exp().sum() * step**dim).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [1, 2])
def test_log_prob_integrates_to_one(name, dim, trained):
    head, _ = trained(name, dim)
    for c in (-0.7, 0.1, 0.6):
        cond = cond_features(torch.tensor([c]), 8)
        total = grid_integral(head, cond, dim, half_width=5.0, points=1001 if dim == 1 else 121)
        assert math.isclose(total, 1.0, abs_tol=0.05), f"{name}: ∫p = {total:.4f} at c={c}"


@pytest.mark.slow
@pytest.mark.parametrize("name", PROBABILISTIC)
def test_samples_cover_both_modes(name, trained):
    head, task = trained(name, 2)
    c = torch.tensor([-0.8, -0.3, 0.2, 0.7])
    with torch.no_grad():
        samples = head.sample(cond_features(c, 8), 1000)  # [S, 4, 2]
    share = task.mode_of(samples, c).float().mean(0)  # [4]: share of samples in mode 2 per context
    assert ((share >= 0.25) & (share <= 0.75)).all(), f"{name}: share of samples in mode 2 per context = {share}"


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two ``[N]`` vectors without ties: Pearson's r of their ranks."""
    return pearson_r(a.argsort().argsort(), b.argsort().argsort())


@pytest.mark.slow
@pytest.mark.parametrize("name", PROBABILISTIC)
def test_energy_ranks_targets_like_the_true_density(name, trained):
    """A fitted head's energy orders targets as the task's true −log p does: low on the two modes, high
    at their midpoint and far away (a head whose energy ignored the target, or whose sign flipped, fails)."""
    head, task = trained(name, 2)
    g = torch.Generator().manual_seed(3)
    c = torch.rand(400, generator=g) * 2 - 1
    on_modes = task.sample_y(c, g)
    anywhere = (torch.rand(400, 2, generator=g) * 2 - 1) * 3.0  # the box [-3, 3]^2 holds modes and midpoint
    y, c = torch.cat([on_modes, anywhere]), torch.cat([c, c])
    with torch.no_grad():
        energy = head.energy(y, cond_features(c, 8))
    rho = rank_correlation(energy, -task.log_prob(y, c))
    assert rho > 0.8, f"{name}: Spearman ρ(energy, true −log p) = {rho:.3f}"


@pytest.mark.slow
def test_deterministic_mean_falls_between_the_modes(trained):
    head, task = trained("deterministic", 2)
    c = torch.tensor([-0.8, -0.3, 0.2, 0.7])
    with torch.no_grad():
        mean = head.mean(cond_features(c, 8))
    # both modes lie at distance 2 from the origin; the average of two equal modes is the origin
    assert (mean.norm(dim=-1) < 1.0).all(), mean
