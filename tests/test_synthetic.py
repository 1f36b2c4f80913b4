"""The heads benchmark's synthetic tasks: normalized densities and the right conditional entropy."""
from __future__ import annotations

import pytest
import torch

from prob_jepa.synthetic import TASKS, Task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_density_integrates_to_one_in_two_dimensions(name):
    task = TASKS[name](dim=2)
    axis = torch.linspace(-12, 12, 1201)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    y = torch.stack([xx.flatten(), yy.flatten()], 1)
    c = torch.full((len(y),), 0.3)
    mass = task.log_prob(y, c).exp().sum().item() * (axis[1] - axis[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=0.01)  # heavy tails leave ~0.3% beyond ±12


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("dim", [2, 32])
def test_task_entropy_matches_monte_carlo_of_its_samples(name, dim):
    task = TASKS[name](dim=dim)
    monte_carlo = Task.entropy(task, n=100_000)
    assert task.entropy() == pytest.approx(monte_carlo, abs=0.01 * dim)


def test_heavy_tailed_rows_share_one_scale_and_product_rows_do_not():
    g = torch.Generator().manual_seed(0)
    c = torch.zeros(20_000)
    for name, shared in (("heavy_tailed", True), ("heavy_tailed_product", False)):
        task = TASKS[name](dim=8)
        r = (task.sample_y(c, g) - task.loc(c)).abs()
        # a common χ² makes |y_i − m_i| positively correlated across coordinates
        corr = torch.corrcoef(r.T.log())[0, 1:].mean().item()
        assert (corr > 0.1) == shared, (name, corr)


def test_ambiguous_task_puts_nine_in_ten_true_draws_on_a_mode_at_the_marker_weights():
    # modes 5 σ apart: a draw's axis coordinate is N(0 or 1, 0.2²), on a mode iff it is below 0.25 or above 0.75
    from prob_jepa.eval.multimodality import on_mode_share
    from prob_jepa.synthetic import AmbiguousTask

    task = AmbiguousTask(dim=64)
    c, _, y = task.sample(20_000, torch.Generator().manual_seed(0))
    mode = task.centre(c)
    assert on_mode_share(y[None], mode, -mode) == pytest.approx(0.894, abs=0.01)  # Φ(0.25 / 0.2)
    assert task.mode_of(y, c).float().mean().item() == pytest.approx(0.3, abs=0.01)
