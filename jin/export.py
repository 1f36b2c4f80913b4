"""Load an encoder exported by ``experiments/export.py``: plain PyTorch, no Hydra, no training code."""
from __future__ import annotations

from pathlib import Path

import torch

from .encoder import HierarchicalEncoder


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> HierarchicalEncoder:
    """The exported target encoder (eval mode): ``encoder(images [B, 3, H, W])`` → one ``Level`` per level.

    The file holds ``{"encoder": HierarchicalEncoder kwargs, "state_dict": weights}`` and loads with
    ``torch.load(..., weights_only=True)``. A frozen image feature ``[B, D_L]`` is
    ``encoder(images)[-1].features.mean(dim=(1, 2))`` (average-pooled last level, as the run's probe).
    """
    blob = torch.load(path, map_location=map_location, weights_only=True)
    encoder = HierarchicalEncoder(**blob["encoder"])
    encoder.load_state_dict(blob["state_dict"])
    return encoder.to(map_location).eval()
