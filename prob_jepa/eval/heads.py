"""How well a head models held-out target embeddings: likelihood, samples, calibration, energies."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from ..heads import Head
from ..masks import ImageMasks
from ..jepa import LevelJEPA
from .calibration import (
    apply_temperature,
    energy_probabilities,
    expected_calibration_error,
    fit_energy_temperature,
    fit_sample_temperature,
    interval_coverage,
    pit_histogram,
    pit_ks,
    pit_values,
)
from .metrics import crps, energy_score, nll_per_dim, pearson_r

EVAL_DRAWS = 10**9  # mask draws for evaluation never coincide with training draws


@dataclass
class Rows:
    """Held-out target tokens: ``cond [N, C]``, ``target [N, D]``, source ``image [N]`` (dataset index)."""

    cond: torch.Tensor
    target: torch.Tensor
    image: torch.Tensor

    def __len__(self) -> int:
        return len(self.target)

    def take(self, idx: torch.Tensor | slice) -> "Rows":
        return Rows(self.cond[idx], self.target[idx], self.image[idx])

    def fit_half(self) -> torch.Tensor:
        """``[N]`` bool: the rows of every other image (of the distinct images present, in index order), on which a
        temperature is fit; the rest are scored. No image has rows on both sides, so the fit never sees the images
        it is scored on (tokens of one image share its context)."""
        return torch.isin(self.image, self.image.unique()[::2])

    def first_per_image(self, k: int) -> "Rows":
        """At most the first ``k`` rows of every image (rows of an image are consecutive)."""
        _, counts = torch.unique_consecutive(self.image, return_counts=True)
        start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        return self.take(torch.arange(len(self)) - start < k)


@torch.no_grad()
def collect_rows(
    model: LevelJEPA, dataset: Dataset, masks: ImageMasks, num_images: int, batch_size: int, device: torch.device
) -> Rows:
    """Mask the first ``num_images`` images (evaluation draws of the first mask spec) and gather ``cond`` / target
    rows of the coarsest predicted level — the level the probes read, of the same width for every backbone."""
    conds, targets, images = [], [], []
    loader = DataLoader(torch.utils.data.Subset(dataset, range(min(num_images, len(dataset)))), batch_size=batch_size)
    for b, (x, _) in enumerate(loader):
        x = x.to(device)
        m = masks(len(x), EVAL_DRAWS + b)[0].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = model.predict(x, m.context, m.targets).cond
            y = model.gather_targets(model.target_features(x), m.targets)
        c, t = cond[-1].float(), y[-1].float()  # [B, M, N, C], [B, M, N, D]
        conds.append(c.flatten(0, 2).cpu())
        targets.append(t.flatten(0, 2).cpu())
        per_image = c.shape[1] * c.shape[2]
        images.append((b * batch_size + torch.arange(len(x))).repeat_interleave(per_image))
    return Rows(torch.cat(conds), torch.cat(targets), torch.cat(images))


def on_head(head: Head, method: str, *args: Any) -> torch.Tensor:
    """``head.<method>(*args)`` on the head's device: CPU tensors in, an fp32 CPU tensor out.

    Rows are kept on the CPU (they are many); the head may live on a GPU.
    """
    device = next(head.parameters()).device
    return getattr(head, method)(*(a.to(device) if torch.is_tensor(a) else a for a in args)).float().cpu()


def timed(fn, *args) -> tuple[Any, float]:
    tic = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - tic


def spread(rows: Rows, n: int, seed: int) -> Rows:
    """``n`` rows drawn without replacement, so every image contributes."""
    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[: min(n, len(rows))]
    return rows.take(idx)


def calibration(samples: torch.Tensor, target: torch.Tensor, levels) -> dict[str, Any]:
    pit = pit_values(samples, target, generator=torch.Generator().manual_seed(0))
    return {
        "coverage": {str(k): v for k, v in interval_coverage(samples, target, levels).items()},
        "pit_histogram": pit_histogram(pit).tolist(),
        "pit_ks": pit_ks(pit),
    }


@torch.no_grad()
def head_metrics(head: Head, rows: Rows, e: DictConfig) -> tuple[dict[str, Any], dict[str, list]]:
    """Likelihood, sample quality, calibration (before / after temperature) and energy metrics of ``head``.

    Returns the metrics and the candidate energies for the plots.
    """
    head.eval()
    out: dict[str, Any] = {"rows": len(rows), "dim": head.dim}
    lik = spread(rows, e.head_rows, seed=1)
    log_prob, t_lp = timed(on_head, head, "log_prob", lik.target, lik.cond)
    mean = on_head(head, "mean", lik.cond)
    energy = on_head(head, "energy", lik.target, lik.cond)
    error = (mean - lik.target).square().sum(-1)
    out["likelihood"] = {"nll_per_dim": nll_per_dim(log_prob, head.dim)}
    out["point"] = {"mse_per_dim": (error.mean() / head.dim).item()}
    out["energy_error_pearson_r"] = pearson_r(energy, error)

    samp = spread(rows, e.sample_rows, seed=2)
    samples, t_s = timed(on_head, head, "sample", samp.cond, e.num_samples)
    out["samples"] = {"energy_score": energy_score(samples, samp.target), "crps": crps(samples, samp.target)}
    fit = samp.fit_half()
    tau = fit_sample_temperature(samples[:, fit], samp.target[fit])
    held_out = samples[:, ~fit], samp.target[~fit]
    out["calibration"] = {
        "before": calibration(*held_out, e.coverage_levels),
        "after": calibration(apply_temperature(held_out[0], tau), held_out[1], e.coverage_levels),
        "temperature": tau,
    }
    retrieval, energies = energy_retrieval(head, spread(rows, e.retrieval_queries, seed=3), rows, e.retrieval_candidates)
    out["energy_retrieval"] = retrieval
    out["timings"] = {
        "log_prob_ms_per_row": 1e3 * t_lp / len(lik),
        "sample_ms_per_sample": 1e3 * t_s / (len(samp) * e.num_samples),
    }
    return out, energies


@torch.no_grad()
def energy_retrieval(head: Head, queries: Rows, pool: Rows, candidates: int) -> tuple[dict[str, Any], dict]:
    """JIN eq. 11 on targets: which of ``K`` candidate embeddings belongs to the context?

    Each query's candidates are its true target and ``K − 1`` targets of other
    images, the truth at a seeded random position (so tied energies, which the
    top-1 pick breaks by position, score chance and not a hit); ``p(k | x) ∝
    exp(−E_k / T)`` with ``E = head.energy``. ``T`` is fit on the queries of half the images
    (:meth:`Rows.fit_half`) and those of the other images are scored: top-1 accuracy, NLL (nats) of the true
    candidate and ECE of the top-1 confidence, at ``T = 1`` and at the fit ``T``. Also returns the
    energies of the true ``[Q]`` and the other ``[Q·(K − 1)]`` candidates (for the figure).
    """
    Q, K = len(queries), candidates
    g = torch.Generator().manual_seed(4)
    others = torch.randint(len(pool), (Q, K - 1), generator=g)
    clash = pool.image[others] == queries.image[:, None]
    others[clash] = (others[clash] + len(pool) // 2) % len(pool)  # another image's token, almost always
    cands = torch.cat([queries.target[:, None], pool.target[others]], 1)  # [Q, K, D]; index 0 is the truth
    order = torch.rand(Q, K, generator=g).argsort(1)  # candidate slot j holds cands[:, order[:, j]]
    is_truth = order == 0  # [Q, K]
    truth = is_truth.int().argmax(1)  # [Q] the slot of the truth
    energies = on_head(head, "energy", cands.gather(1, order[..., None].expand_as(cands)).flatten(0, 1),
                       queries.cond.repeat_interleave(K, 0)).view(Q, K)
    fit = queries.fit_half()
    T = fit_energy_temperature(energies[fit], truth[fit])

    def scores(temperature: float) -> dict[str, float]:
        p = energy_probabilities(energies[~fit], temperature)
        conf, pick = p.max(1)
        hit = pick == truth[~fit]
        return {
            "accuracy": hit.float().mean().item(),
            "nll": -torch.log(p.gather(1, truth[~fit, None]).squeeze(1).clamp_min(1e-12)).mean().item(),
            "ece": expected_calibration_error(conf, hit),
        }

    return (
        {"candidates": K, "queries": int((~fit).sum()), "temperature": T, "before": scores(1.0), "after": scores(T)},
        {"true": energies[is_truth].tolist(), "other": energies[~is_truth].tolist()},
    )
