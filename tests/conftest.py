"""Shared test fixtures: config composition and the list of heads from their config files."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Sleep rather than spin while waiting for OpenMP work: spinning threads slow small ops ~100x when the
# cores are shared (CI neighbours, torchrun children). Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from prob_jepa.config import group_options  # noqa: E402

# pytest-xdist workers share the cores: one worker per core, each with its share of the threads.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "experiments" / "conf"


def paired_scene() -> "Scene":
    """The scene of ``data=paired_shapes`` as its config file sets it (the hypermodal world's default)."""
    from prob_jepa.data.shapes import Scene

    return Scene.from_config(OmegaConf.load(CONF / "data" / "paired_shapes.yaml").scene)


def load_experiment(name: str) -> ModuleType:
    """The script ``experiments/<name>.py`` imported as a module (its ``main`` not run), with ``experiments/`` on the
    import path as when the script runs (a script may import another: ``from evaluate import …``)."""
    if str(ROOT / "experiments") not in sys.path:
        sys.path.append(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head_configs() -> dict[str, dict]:
    """Every ``experiments/conf/predictor/*.yaml`` as ``{name: options}`` — a new head is tested once its config exists."""
    out = {}
    for stem in group_options(CONF, "predictor"):
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "predictor" / f"{stem}.yaml"), resolve=True)
        out[cfg.pop("name")] = cfg
    return out


HEAD_CONFIGS = head_configs()


@pytest.fixture
def compose():
    """``compose(*overrides)`` → the composed Hydra config of ``experiments/conf``."""
    from prob_jepa.config import compose_config

    return lambda *overrides: compose_config(CONF, overrides)


TINY = [
    "model=vit_tiny",
    "data.image_size=32",
    "data.train_size=128",
    "data.val_size=64",
    "data.marker.size=8",
    "model.patch_size=4",
    "model.dims=[32]",
    "model.depths=[2]",
    "model.num_heads=[2]",
    "model.predictor.dim=24",
    "model.predictor.depth=1",
    "model.predictor.num_heads=2",
    "mask.image.0.min_keep=2",
    "trainer.batch_size=16",
    "trainer.epochs=2",
    "trainer.log_every=1",
    "trainer.progress=false",
    "eval.batch_size=64",
]
SMALL_EVAL = ["eval.head_images=32", "eval.head_rows=256", "eval.sample_rows=64", "eval.num_samples=16",
              "eval.retrieval_queries=64", "eval.ambiguity_pairs=16", "eval.map_images=2", "trainer.max_steps=4"]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A CPU-second-sized run: a 2-block ViT on 32 px shapes."""
    return list(TINY)


MODEL_PRESETS = group_options(CONF, "model")


def shrunk_model(name: str) -> list[str]:
    """Overrides building model preset ``name`` at CPU size.

    Kept from the preset: levels, heads per level, every switch (spatial bias, adaptive, zoom,
    cross-scale, mask-unit attention), drop-path, dropout, SIGReg and ``predictor.levels``. Shrunk:
    8 channels per head (16 at least), one block per level, a 1-block predictor, and images of
    4×4 mask units (3×3 and patch 2 from three levels on: a unit then holds 8×8 level-0 tokens).
    """
    preset = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    heads = list(preset.num_heads)
    levels = len(heads)
    patch = 2 if levels >= 3 else 4
    size = patch * 2 ** (levels - 1) * (4 if levels <= 2 else 3)
    dims = [max(16, 8 * h) for h in heads]
    return [
        f"model={name}", f"data.image_size={size}", f"data.marker.size={size // 4}", f"model.patch_size={patch}",
        f"model.dims=[{','.join(map(str, dims))}]", f"model.depths=[{','.join(['1'] * levels)}]",
        "model.predictor.dim=24", "model.predictor.depth=1", "model.predictor.num_heads=2",
        "data.train_size=64", "data.val_size=32", "mask.image.0.min_keep=2", "trainer.batch_size=8",
        "trainer.log_every=1", "trainer.progress=false", "eval.batch_size=64",
    ]


def image_class_name(name: str) -> str:
    """A parameter's name in the image JEPA's checkpoints before it became the one-modality model: its encoder at
    ``context_encoder.*`` / ``target_encoder.*``, its predictor's embeddings at ``predictor.tokens.*``."""
    return name.replace("encoders.image.backbone.", "").replace("predictor.tokens.image.", "predictor.tokens.")


def level_predictor_name(name: str) -> str:
    """A parameter's name in an image checkpoint of the one model before its predictions became one predictor pass:
    its predictor at ``level_predictors.image.*``."""
    if not name.startswith("predictor."):
        return name
    return "level_predictors.image." + name[len("predictor."):].replace("tokens.image.", "tokens.")


# the names of an image run's checkpoints in the layouts of before, by layout
OLD_IMAGE_LAYOUTS = {"image_class": image_class_name, "level_predictor": level_predictor_name}
