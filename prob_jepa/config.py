"""Config helpers: compose the Hydra config, and fail early on mistyped override keys."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf


class ConfigKeyError(KeyError):
    """An override names a key the config does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


def compose_config(config_dir: str | Path, overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed config, as ``experiments/run.py`` would see it (without Hydra's run-time keys)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        return compose(config_name, overrides=list(overrides))


def check_overrides(config_dir: str | Path, overrides: Sequence[str], config_name: str = "config") -> None:
    """Raise :class:`ConfigKeyError` listing the valid keys when an override's key does not exist.

    Group selections (``predictor=flow``) are left to Hydra, which lists the
    available options itself; ``+key`` / ``~key`` / ``hydra.*`` are not checked.
    """
    config_dir = Path(config_dir)
    groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    selections = [o.input_line for o in parsed if o.key_or_group in groups or o.key_or_group.split("@")[0] in groups]
    keys = [o for o in parsed if o.input_line not in selections and not (o.is_add() or o.is_delete() or o.is_force_add())]
    keys = [o for o in keys if not o.key_or_group.startswith("hydra.")]
    if not keys:
        return
    cfg = compose_config(config_dir, selections, config_name)
    for o in keys:
        node: object = cfg
        path = o.key_or_group.split(".")
        for i, part in enumerate(path):
            if not isinstance(node, DictConfig) or part not in node:
                parent = ".".join(path[:i]) or "<root>"
                valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
                raise ConfigKeyError(
                    f"unknown config key '{o.key_or_group}': '{part}' is not in {parent}. "
                    f"Valid keys of {parent}: {', '.join(map(str, valid))}"
                )
            node = node[part]
    GlobalHydra.instance().clear()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
