"""Datasets by name: ``build_datasets(cfg.data) -> (train, val)``."""
from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from .sampler import GlobalBatchSampler, SeededDataset, seed_for
from .shapes import ShapesDataset, build_shapes

BUILDERS: dict[str, Callable] = {"shapes": build_shapes}


def build_datasets(cfg) -> tuple[Dataset, Dataset]:
    """Train and validation sets of ``cfg`` (the ``data`` config group)."""
    if cfg.name not in BUILDERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.name](cfg)


__all__ = ["BUILDERS", "GlobalBatchSampler", "SeededDataset", "ShapesDataset", "build_datasets", "seed_for"]
