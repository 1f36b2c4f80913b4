"""Representation quality of frozen features: linear probe and k-NN."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encode`` over ``dataset``; returns features ``[N, D]`` (fp32, CPU) and labels ``[N]``."""
    feats, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    bf16 = device.type == "cuda"
    for images, y in tqdm(loader, desc=desc, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(encode(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 1000, tolerance: float = 1e-6
) -> torch.Tensor:
    """Multinomial logistic regression by full-batch L-BFGS, run to convergence; returns ``[D + 1, C]`` weights.

    Minimises ``mean_i CE(x_i W + b, y_i) + ½ · weight_decay · ‖W‖²`` (the bias is not penalized); this is
    scikit-learn's ``LogisticRegression(C=1 / (weight_decay · N))``. The problem is strictly convex, so the
    optimum is unique: L-BFGS stops when the largest gradient entry falls below ``tolerance`` (or after
    ``max_iter`` iterations; weak penalties on separable features are the slow case).

    Args:
        x: ``[N, D]`` features; y: ``[N]`` labels in ``[0, num_classes)``.
        weight_decay: the L2 penalty on ``W``.
    """
    w = torch.zeros(x.shape[1] + 1, num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance, history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w[:-1] + w[-1], y) + 0.5 * weight_decay * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def _accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x @ w[:-1] + w[-1]).argmax(1) == y).float().mean().item()


@dataclass
class ProbeResult:
    """accuracy on the test features, the chosen L2 penalty, the test logits ``[N, C]``, and the fitted probe:
    ``weights [D + 1, C]`` (last row: the bias) on features standardized by the training ``mean`` and ``std``
    ``[D]``."""

    accuracy: float
    weight_decay: float
    logits: torch.Tensor
    weights: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` of raw features ``[N, D]`` (standardized as the training features were)."""
        x = (x - self.mean) / self.std
        return x @ self.weights[:-1] + self.weights[-1]


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    max_iter: int = 1000,
) -> ProbeResult:
    """Linear-probe top-1 accuracy on standardized features.

    The L2 penalty is chosen on a held-out fifth of the training features, then
    the probe is refit on all of them and scored on the test features. Every fit
    runs to convergence (:func:`fit_logistic`): a probe stopped early under-reads
    weakly regularized features, and a margin between two encoders is only as
    good as the probe (``tests/test_representation.py`` compares it with scikit-learn).

    Args:
        train_x, test_x: ``[N, D]`` features; train_y, test_y: ``[N]`` labels.
        weight_decays: the L2 penalties tried (``weight_decay · N_fit = 1 / C`` in scikit-learn's terms).
        max_iter: L-BFGS iterations per fit at most (:func:`fit_logistic`).
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    hold, fit = perm[: len(perm) // 5], perm[len(perm) // 5 :]
    scores = {
        wd: _accuracy(fit_logistic(train_x[fit], train_y[fit], num_classes, wd, max_iter), train_x[hold], train_y[hold])
        for wd in weight_decays
    }
    best = max(scores, key=scores.get)
    w = fit_logistic(train_x, train_y, num_classes, best, max_iter)
    return ProbeResult(_accuracy(w, test_x, test_y), best, test_x @ w[:-1] + w[-1], w, mu, sd)


def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class of each test row ``[N]`` from features ``[N_train, D]`` / ``[N, D]``, L2-normalized
    (cosine, DINO's ``exp(s / T)`` votes over the ``k`` nearest training rows; Wu et al. 2018, arXiv:1805.01978)."""
    num_classes = int(train_y.max()) + 1  # a class no training row has gets no vote
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    out = []
    for start in range(0, len(test_x), chunk):
        top, idx = (test_x[start : start + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN top-1 accuracy on L2-normalized features (:func:`knn_predict`)."""
    return (knn_predict(train_x, train_y, test_x, k, temperature, chunk) == test_y).sum().item() / len(test_x)


def factor_r2(
    train_x: torch.Tensor,
    train_factors: dict[str, torch.Tensor],
    test_x: torch.Tensor,
    test_factors: dict[str, torch.Tensor],
    ridge: float = 1.0,
) -> dict[str, float]:
    """How linearly each known factor of variation can be read from frozen features: held-out R² per factor.

    A ridge regression (penalty ``ridge`` on standardized features, bias unpenalized) is fit on the training
    features for every factor and scored on the test features: ``R² = 1 − MSE / Var(test factor)`` (1: read
    exactly; ≤ 0: not at all). Factors are scalars per image; a circular one (a hue) should come as its sine and
    cosine.

    Args:
        train_x, test_x: ``[N, D]`` features; train_factors, test_factors: name → ``[N]`` values.
    """
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = ((x.double() - mu) / sd for x in (train_x, test_x))
    a, b = (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in (a, b))
    penalty = ridge * torch.eye(a.shape[1], dtype=a.dtype)
    penalty[-1, -1] = 0
    gram = a.T @ a + penalty
    out = {}
    for name, y in train_factors.items():
        w = torch.linalg.solve(gram, a.T @ y.double())
        target = test_factors[name].double()
        out[name] = 1 - ((b @ w - target) ** 2).mean().item() / target.var(unbiased=False).item()
    return out
