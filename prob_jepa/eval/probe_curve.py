"""The representation during training: a linear probe and k-NN of the frozen features every few steps."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ..config import ConfigError, is_count
from . import first, with_validation
from .representation import extract_features, knn_accuracy, linear_probe

Encode = Callable[[torch.Tensor], torch.Tensor]


class ProbeCurve:
    """Linear probe (:func:`~prob_jepa.eval.representation.linear_probe`) and k-NN top-1 accuracy of a model's frozen
    features on fixed image subsets, at step 0 and every ``every`` optimizer steps (``eval.probe_curve``).

    The subsets are the first ``train_size`` images of the probes' training split and the first ``val_size`` of
    their validation split, so every point of a run's curve — and the curves of runs on the same data — is read
    with one instrument. It is a smaller instrument than the final evaluation's (``eval.probe_train_size``): its
    absolute accuracy reads lower; the final step's point and ``eval.json`` differ by that. A point changes nothing
    in training: the features come from the target encoder without gradient, and the global RNG state is restored.

    Args:
        every: optimizer steps between points.
        train_set, val_set: the probes' (un-augmented) training images and the validation images (``None``: a
            held-out fifth of ``train_set``, as the final evaluation splits it).
        eval_cfg: ``cfg.eval`` (``probe_curve.train_size`` / ``val_size``, ``batch_size``, ``probe_max_iter``,
            ``knn_k``, ``knn_temperature``).
    """

    def __init__(self, every: int, train_set: Dataset, val_set: Dataset | None, eval_cfg: DictConfig,
                 device: torch.device):
        train_set, val_set = with_validation(train_set, val_set)
        self.every, self.eval_cfg, self.device = every, eval_cfg, device
        self.train_set = first(train_set, eval_cfg.probe_curve.train_size)
        self.val_set = first(val_set, eval_cfg.probe_curve.val_size)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, encode: Encode) -> dict[str, float]:
        """``{"linear_probe": accuracy, "knn": accuracy}`` of ``encode(images [B, 3, H, W]) → [B, D]``."""
        e = self.eval_cfg
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            tx, ty = extract_features(encode, self.train_set, e.batch_size, self.device, "probe curve train features")
            vx, vy = extract_features(encode, self.val_set, e.batch_size, self.device, "probe curve val features")
        return {
            "linear_probe": linear_probe(tx, ty, vx, vy, max_iter=e.probe_max_iter).accuracy,
            "knn": knn_accuracy(tx, ty, vx, vy, k=e.knn_k, temperature=e.knn_temperature),
        }


def probe_curve(cfg: DictConfig, features: Callable | None, train_set: Dataset, val_set: Dataset | None,
                device: torch.device) -> ProbeCurve | None:
    """The run's :class:`ProbeCurve` (``eval.probe_curve.every``; ``None`` when it is null).

    Args:
        features: the recipe's frozen features (:attr:`~prob_jepa.recipes.Recipe.frozen_features`), ``None`` for a
            recipe without them.
    Raises:
        ConfigError: ``every``, ``train_size`` or ``val_size`` is not a positive integer (``train_size`` below 10
            leaves the probe's penalty choice no held-out images), or the recipe has no frozen features to probe.
    """
    c = cfg.eval.probe_curve
    if c.every is None:
        return None
    for key, low in (("every", 1), ("train_size", 10), ("val_size", 1)):
        value = c[key]
        if not is_count(value, low):
            raise ConfigError(f"eval.probe_curve.{key}={value!r}: an integer ≥ {low}"
                              + (" (or eval.probe_curve.every=null: no probe during training)" if key == "every" else ""))
    if features is None:
        raise ConfigError(f"eval.probe_curve.every={c.every}: recipe={cfg.recipe} has no frozen features to probe "
                          f"during training (its evaluation probes each modality at the end); leave it null")
    return ProbeCurve(c.every, train_set, val_set, cfg.eval, device)
