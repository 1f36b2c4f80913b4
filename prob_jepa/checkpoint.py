"""Resumable checkpoints that load with ``torch.load(..., weights_only=True)``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated ``last.pt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), with an error that says what to do."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 — re-raised with guidance, never swallowed
        raise RuntimeError(
            f"could not load checkpoint {path}: {type(e).__name__}: {e}\n"
            f"It is damaged or not a prob-jepa checkpoint. Move it away to start this run over, "
            f"or point trainer.resume / hydra.run.dir at another run."
        ) from e
