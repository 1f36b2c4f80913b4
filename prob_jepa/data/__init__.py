"""Datasets by name: ``build_datasets(cfg.data, splits) -> one dataset per split``.

Splits: ``train`` (with the training augmentation), ``val``, and ``train_eval``
(the training images with the evaluation transform, for probes).
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch.utils.data import Dataset

from .imagenet import build_imagenet, build_tiny_imagenet
from .multimodal import PairedShapes, build_paired_shapes
from .sampler import GlobalBatchSampler, SeededDataset, seed_for
from .shapes import ShapesDataset, build_shapes

BUILDERS: dict[str, Callable] = {
    "shapes": build_shapes,
    "tiny_imagenet_100": build_tiny_imagenet,
    "imagenet_1k": build_imagenet,
    "paired_shapes": build_paired_shapes,
}


def build_datasets(cfg, splits: Sequence[str] = ("train", "val")) -> tuple[Dataset, ...]:
    """The datasets of ``cfg`` (the ``data`` config group), one per split."""
    if cfg.name not in BUILDERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.name](cfg, splits)


__all__ = [
    "BUILDERS", "GlobalBatchSampler", "PairedShapes", "SeededDataset", "ShapesDataset", "build_datasets", "seed_for",
]
