"""Datasets by name: ``build_datasets(cfg.data, splits) -> one dataset per split``.

Splits: ``train`` (with the training augmentation), ``val``, and ``train_eval``
(the training images with the evaluation transform, for probes).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .imagenet import IMAGENET_MEAN, IMAGENET_STD, build_imagenet, build_tiny_imagenet
from .multimodal import PairedShapes, build_paired_shapes
from .sampler import GlobalBatchSampler, SeededDataset, seed_for
from .shapes import MEAN, STD, ShapesDataset, build_shapes

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

# How each dataset normalizes its images, (mean, std) per RGB channel: what display_images undoes.
NORMALIZATION: dict[str, tuple] = {
    "shapes": ((MEAN,) * 3, (STD,) * 3),
    "paired_shapes": ((MEAN,) * 3, (STD,) * 3),
    "tiny_imagenet_100": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet_1k": (IMAGENET_MEAN, IMAGENET_STD),
}


def display_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """Normalized images of dataset ``name`` ``[..., 3, H, W]`` → displayable ``[..., H, W, 3]`` in [0, 1] (CPU).

    Raises:
        ValueError: for a dataset not in :data:`NORMALIZATION`.
    """
    if name not in NORMALIZATION:
        raise ValueError(f"no normalization known for dataset {name!r}; valid: {', '.join(sorted(NORMALIZATION))}")
    mean, std = (torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in NORMALIZATION[name])
    return (images.detach().float().cpu() * std + mean).clamp(0, 1).movedim(-3, -1)


__all__ = [
    "BUILDERS", "NORMALIZATION", "GlobalBatchSampler", "PairedShapes", "SeededDataset", "ShapesDataset",
    "build_datasets", "display_images", "seed_for",
]
