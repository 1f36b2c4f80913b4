"""Evaluation of a trained run, written to ``eval.json`` and ``plots/``."""
from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from ..model import JEPA, build_model
from ..run_dir import RunDir
from . import plots
from .representation import extract_features, knn_accuracy, linear_probe


def split(dataset: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Subset, Subset]:
    """Deterministic (train, held-out) split for users who give no validation set."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(perm) * fraction)
    return Subset(dataset, perm[cut:]), Subset(dataset, perm[:cut])


def first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def representation_metrics(
    model: JEPA, cfg: DictConfig, train_set: Dataset, val_set: Dataset, device: torch.device
) -> dict[str, dict[str, float]]:
    """Linear probe and k-NN on the target encoder, and on the same encoder at its random initialization."""
    e = cfg.eval
    torch.manual_seed(cfg.seed)
    reference = build_model(cfg).to(device).eval()  # the weights training started from
    train_set, val_set = first(train_set, e.probe_train_size), first(val_set, e.probe_val_size)
    out = {}
    for name, m in (("pretrained", model), ("random_init", reference)):
        tx, ty = extract_features(m.features, train_set, e.batch_size, device, f"{name} train features")
        vx, vy = extract_features(m.features, val_set, e.batch_size, device, f"{name} val features")
        probe = linear_probe(tx, ty, vx, vy)
        out[name] = {
            "linear_probe": probe["accuracy"],
            "probe_weight_decay": probe["weight_decay"],
            "knn": knn_accuracy(tx, ty, vx, vy, k=e.knn_k, temperature=e.knn_temperature),
        }
    return out


def evaluate(
    model: JEPA, cfg: DictConfig, train_set: Dataset, val_set: Dataset | None, run: RunDir, device: torch.device
) -> dict[str, Any]:
    """Every evaluation of the run; writes ``eval.json`` and the plots, returns the metrics."""
    model.eval()
    if val_set is None:
        train_set, val_set = split(train_set)
    tic = time.perf_counter()
    metrics: dict[str, Any] = {"representation": representation_metrics(model, cfg, train_set, val_set, device)}
    metrics["timings"] = {"eval_s": time.perf_counter() - tic}
    records = run.read_metrics()
    if records:
        metrics["train"] = {"final_loss": records[-1]["loss"], "steps": records[-1]["step"]}
        plots.training_curves(records, run.plots / "training_curves.png")
    plots.probe_bars(metrics["representation"], run.plots / "probe.png")
    run.write_eval(metrics)
    return metrics
