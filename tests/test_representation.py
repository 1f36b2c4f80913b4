"""The representation instruments against known answers: the linear probe is scikit-learn's logistic
regression run to convergence, and k-NN votes as DINO's."""
from __future__ import annotations

import pytest
import torch

from prob_jepa.eval.diagnostics import effective_rank, feature_std, variance_share
from prob_jepa.eval.representation import factor_r2, fit_logistic, knn_accuracy, linear_probe

sklearn = pytest.importorskip("sklearn.linear_model")


def hidden_classes(n: int, dim: int = 192, nuisance: int = 16, classes: int = 8, seed: int = 1):
    """Features whose class signal is small beside a large low-rank nuisance, as in pooled ViT features:
    the class lives in low-variance directions, so the probe needs a weak penalty and a fit run to
    convergence (an L-BFGS stopped after 100 iterations reads 0.72 here, the optimum 0.90)."""
    g = torch.Generator().manual_seed(seed)
    mix, class_dirs = torch.randn(nuisance, dim, generator=g), torch.randn(classes, dim, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, nuisance, generator=g) @ mix + 0.008 * class_dirs[y] + 0.03 * torch.randn(n, dim, generator=g)
    return x, y


def standardized(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref.mean(0)) / ref.std(0)


def test_fit_logistic_reaches_the_scikit_learn_optimum():
    x, y = hidden_classes(1500)
    x = standardized(x, x).double()
    weight_decay = 1e-4
    w = fit_logistic(x, y, 8, weight_decay)
    ref = sklearn.LogisticRegression(C=1 / (weight_decay * len(x)), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    ours = (x @ w[:-1] + w[-1]).softmax(1)
    assert (ours - torch.as_tensor(ref.predict_proba(x.numpy()))).abs().max() < 1e-3


def test_linear_probe_matches_scikit_learn_with_a_tuned_penalty():
    x, y = hidden_classes(3000)
    tx, ty, vx, vy = x[:2000], y[:2000], x[2000:], y[2000:]
    probe = linear_probe(tx, ty, vx, vy)
    best = max(
        sklearn.LogisticRegression(C=c, max_iter=10_000)
        .fit(standardized(tx, tx).numpy(), ty.numpy())
        .score(standardized(vx, tx).numpy(), vy.numpy())
        for c in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    )
    # scikit-learn's C is tuned on the test rows here (an upper bound); ours is chosen on held-out training rows
    assert probe.accuracy >= best - 0.01
    assert probe.logits.shape == (1000, 8)


def test_knn_votes_with_the_nearest_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=2) == 1.0
    assert knn_accuracy(train, labels, test, torch.tensor([1, 0]), k=2) == 0.0


def test_factor_r2_reads_a_planted_factor_and_not_an_independent_one():
    g = torch.Generator().manual_seed(0)
    factor, other = torch.rand(3000, generator=g), torch.rand(3000, generator=g)
    x = torch.randn(3000, 16, generator=g)
    x[:, 3] += 4 * factor  # one feature carries the factor (+ unit noise: R² = Var(4f) / Var(4f + n) = 4/7)
    r2 = factor_r2(x[:2000], {"f": factor[:2000], "o": other[:2000]}, x[2000:], {"f": factor[2000:], "o": other[2000:]})
    assert abs(r2["f"] - 4 / 7) < 0.05 and abs(r2["o"]) < 0.02


def test_variance_share_of_a_planted_spectrum():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    x = torch.randn(20000, 8, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 1, 1, 1, 1]).double() @ q.T
    assert abs(variance_share(x, 2) - 13 / 19) < 0.01  # (9 + 4) / (9 + 4 + 6)
    assert variance_share(x, 8) == pytest.approx(1.0)


def test_effective_rank_of_matrices_of_known_rank():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    for rank in (1, 4, 16):  # ±each of `rank` orthogonal directions equally often: RankMe = rank exactly
        basis = torch.eye(rank, 32, dtype=torch.float64)
        x = torch.cat([basis, -basis]).repeat(2000 // rank, 1) @ q.T
        assert effective_rank(x) == pytest.approx(rank, rel=1e-3), rank  # fp32 SVD: zeros come back ~1e-7
    x = torch.randn(4000, 32, generator=g) @ q.T.float()
    assert 29 < effective_rank(x) <= 32  # isotropic noise: nearly full rank
    assert effective_rank(x + 5.0) == pytest.approx(effective_rank(x), rel=1e-4)  # centred: a shift changes nothing


def test_feature_std_is_the_mean_per_channel_std_and_zero_when_collapsed():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert feature_std(x) == pytest.approx(3.0, rel=0.02)
    assert feature_std(torch.ones(100, 4) * torch.randn(1, 4, generator=g)) == 0.0  # every row the same point
