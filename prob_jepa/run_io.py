"""A finished run, reused: load its model, re-evaluate it, export its encoder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .checkpoint import load_checkpoint
from .config import ConfigError
from .distributed import resolve_device
from .recipes import recipe_of
from .run_dir import RunDir


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, DictConfig]:
    """The trained model of a run directory (eval mode) and the resolved config it was trained with.

    Weights load with ``torch.load(..., weights_only=True)``; the model is the one at the last
    checkpoint (``checkpoints/last.pt``), i.e. at the end of training for a completed run.

    Args:
        run_dir: a folder written by ``experiments/run.py`` / :func:`~prob_jepa.train.pretrain`.
        device: ``"cpu"``, ``"cuda"``, a :class:`torch.device`, or ``None`` for CUDA when available.
    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml`` or no ``checkpoints/last.pt``.
    """
    run = RunDir(run_dir)
    missing = [p.name for p in (run.config, run.checkpoint) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{run.path} is not a trained run directory: it has no {' or '.join(missing)} "
            f"(experiments/run.py writes both; hydra.run.dir= names the folder)"
        )
    cfg = run.load_config()
    device = resolve_device("auto" if device is None else str(device))
    model = recipe_of(cfg).build_model(cfg)
    model.load_state_dict(load_checkpoint(run.checkpoint)["model"])
    return model.to(device).eval(), cfg


def override(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with ``key=value`` overrides of existing keys (values parsed as YAML).

    Raises:
        ConfigError: an override is not ``key=value`` or names a key ``cfg`` does not have.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r} is not key=value (e.g. eval.num_samples=64)")
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            valid = ", ".join(map(str, node.keys())) if isinstance(node, DictConfig) else "(none)"
            raise ConfigError(f"unknown config key '{key}'. Valid keys of {parent or '<root>'}: {valid}")
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), merge=False)
    return cfg


def encoder_export(model: nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """The target encoder of an image run alone: ``{"encoder": kwargs of HierarchicalEncoder, "state_dict": ...}``.

    Raises:
        ConfigError: a hypermodal run (its encoders are per modality: export one image model at a time).
    """
    if cfg.recipe != "image":
        raise ConfigError(f"export.py takes image runs (recipe=image), not recipe={cfg.recipe}: a hypermodal run's "
                          f"encoders are per modality")
    from .model import encoder_kwargs

    state = {k: v.detach().cpu() for k, v in model.level_jepa("image").target_encoder.state_dict().items()}
    return {"encoder": encoder_kwargs(cfg), "state_dict": state}
