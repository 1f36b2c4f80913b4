"""The run directory: the one place a run writes (layout in DESIGN.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .data.shapes import Scene

# Scene options added after runs had been saved, at Scene's defaults, which draw nothing new: a run saved without one
# drew exactly the scenes these values draw, so it loads, evaluates and resumes with them.
ADDED_SCENE_OPTIONS = {
    key: list(default) if isinstance(default, tuple) else default
    for key in ("occluder", "decoy", "decoy_radius", "decoys") for default in [Scene.__dataclass_fields__[key].default]
}


def with_added_keys(cfg: DictConfig) -> DictConfig:
    """A saved config (``config.yaml``, or a checkpoint's ``config``), with the keys added since it was saved at the
    values it was trained with (in place; returns ``cfg``): ``recipe`` (``hypermodal`` for a config with a
    ``hypermodal`` node, else ``image``), ``hypermodal.image.backbone`` (null: the flat patch encoder),
    ``hypermodal.image.levels`` (null: the coarsest), ``hypermodal.predictor.drop_path_rate`` (0),
    ``hypermodal.objectives.energy_loss`` (hinge) and ``energy_norm_weight`` (0),
    ``hypermodal.hierarchy.modalities`` (none: only the image had JIN's hierarchy), ``hypermodal.shared_blocks``
    (true), ``hypermodal.within_targets`` (shared: every within-modality prediction in the shared space),
    ``hypermodal.points.voxel_levels`` (1: pillars of full height), ``optim.head_lr_scale`` (1),
    ``predictor.prediction_type`` of the diffusion head (``epsilon``), ``predictor.num_components``,
    ``base_components`` and ``hold_steps`` of the flow head (1, 1, 0: one flow over N(0, I), trained from the first
    step), ``model.paper_params`` (null: a claim, not a
    setting), ``model.ablation`` and ``hypermodal.ablation`` (null),
    and the scene options of :data:`ADDED_SCENE_OPTIONS`; masks saved before every modality had a list of mask specs
    (``mask.<modality>``) become that list: the image run's one ``mask`` node ``[{kind: multiblock, …}]`` as
    ``mask.image``, the hypermodal run's ``hypermodal.mask.<modality>`` ``[{kind: blocks, …}]`` as
    ``mask.<modality>``."""
    hypermodal = cfg.get("hypermodal")
    if "recipe" not in cfg:
        cfg.recipe = "image" if hypermodal is None else "hypermodal"
    mask = cfg.get("mask")
    if mask is not None and "num_targets" in mask:
        cfg.mask = {"image": [{"kind": "multiblock", **OmegaConf.to_container(mask)}]}
    if hypermodal is not None and "mask" in hypermodal:
        cfg.mask = {m: [{"kind": "blocks", **OmegaConf.to_container(spec)}] for m, spec in hypermodal.mask.items()}
        del hypermodal["mask"]
    scene = cfg.get("data", {}).get("scene")
    if scene is not None:
        for key, value in ADDED_SCENE_OPTIONS.items():
            scene.setdefault(key, value)
    if cfg.get("optim") is not None:
        cfg.optim.setdefault("head_lr_scale", 1.0)
    if cfg.get("predictor", {}).get("name") == "diffusion":
        cfg.predictor.setdefault("prediction_type", "epsilon")
    if cfg.get("predictor", {}).get("name") == "flow":
        for key, value in {"num_components": 1, "base_components": 1, "hold_steps": 0}.items():
            cfg.predictor.setdefault(key, value)
    if cfg.get("model") is not None:
        cfg.model.setdefault("paper_params", None)
        cfg.model.setdefault("ablation", None)
    if hypermodal is not None:
        hypermodal.image.setdefault("backbone", None)
        hypermodal.image.setdefault("levels", None)
        hypermodal.predictor.setdefault("drop_path_rate", 0.0)
        hypermodal.objectives.setdefault("energy_loss", "hinge")
        hypermodal.objectives.setdefault("energy_norm_weight", 0.0)
        hypermodal.setdefault("hierarchy", {"modalities": []})
        hypermodal.setdefault("ablation", None)
        hypermodal.setdefault("shared_blocks", True)
        hypermodal.setdefault("within_targets", "shared")
        hypermodal.points.setdefault("voxel_levels", 1)
    return cfg


class RunDir:
    """``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``, ``eval.json``, ``plots/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def create(self) -> None:
        for p in (self.path, self.checkpoint.parent, self.plots):
            p.mkdir(parents=True, exist_ok=True)

    def save_config(self, cfg: DictConfig) -> None:
        OmegaConf.save(cfg, self.config, resolve=True)

    def load_config(self) -> DictConfig:
        """The saved ``config.yaml``, with the keys added since (:func:`with_added_keys`)."""
        return with_added_keys(OmegaConf.load(self.config))

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past ``after_step`` (a resumed run re-logs them)."""
        keep = [r for r in self.read_metrics() if r["step"] <= after_step]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write_eval(self, metrics: dict[str, Any]) -> None:
        self.eval.write_text(json.dumps(_finite(metrics), indent=2) + "\n")

    def read_eval(self) -> dict[str, Any]:
        return json.loads(self.eval.read_text())

    @property
    def plot_data(self) -> Path:
        return self.plots / "plot_data.json"

    def write_plot_data(self, data: dict[str, Any]) -> None:
        """The arrays behind the figures, so ``experiments/compare.py`` can redraw them across runs."""
        self.plot_data.write_text(json.dumps(_finite(data)))

    def read_plot_data(self) -> dict[str, Any]:
        return json.loads(self.plot_data.read_text())


def _finite(x: Any) -> Any:
    """JSON has no NaN / inf: write them as null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
