"""SIGReg against closed forms of the Epps–Pulley distance."""
import math

import torch

from prob_jepa.regularizers import SIGReg


def gaussian_distance(scale: float, t_max: float = 3.0) -> float:
    """``∫_{−t_max}^{t_max} (e^{−s²t²/2} − e^{−t²/2})² e^{−t²/2} dt`` for projections ``N(0, s²)``, on a fine grid."""
    t = torch.linspace(-t_max, t_max, 200_001, dtype=torch.float64)
    f = (torch.exp(-0.5 * scale**2 * t**2) - torch.exp(-0.5 * t**2)) ** 2 * torch.exp(-0.5 * t**2)
    return torch.trapezoid(f, t).item()


def test_standard_normal_is_near_zero_and_scaled_normal_matches_closed_form():
    torch.manual_seed(0)
    reg = SIGReg(num_slices=64, num_points=33)
    z = torch.randn(20_000, 16)
    assert reg(z).item() < 1e-3  # finite-sample bias of |φ̂ − φ|² is O(1/N)
    for scale in (0.0, 0.5, 2.0):
        expected = gaussian_distance(scale)
        assert math.isclose(reg(scale * z).item(), expected, rel_tol=0.03, abs_tol=1e-3), (scale, expected)


def test_gradient_undoes_dimensional_collapse():
    torch.manual_seed(0)
    basis = torch.randn(2, 8)
    z = (torch.randn(512, 2) @ basis + 0.01 * torch.randn(512, 8)).requires_grad_(True)  # rank ~2 of 8
    reg = SIGReg(num_slices=128)
    opt = torch.optim.Adam([z], lr=0.05)
    start = reg(z).item()
    for _ in range(300):
        opt.zero_grad()
        reg(z).backward()
        opt.step()
    spectrum = torch.linalg.svdvals(z.detach() - z.detach().mean(0)) ** 2
    assert reg(z).item() < start / 10
    variance = spectrum / len(z)  # per principal direction; it starts at ~1e-4 in six of the eight
    assert variance.min() > 0.7 and variance.min() / variance.max() > 0.25
