"""The configuration space: every sampled combination trains 2 steps and evaluates to ``eval.json``,
or fails before step 1 with a message naming its offending keys (never in between)."""
from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from conftest import CONF, HEAD_CONFIGS, MODEL_PRESETS, shrunk_model
from prob_jepa.config import ConfigError
from prob_jepa.run_dir import RunDir
from prob_jepa.train import pretrain

NUM_SAMPLES = 40

# knobs per head; a head without an entry is sampled with its config's defaults
HEAD_KNOBS: dict[str, dict[str, list]] = {
    "deterministic": {"point_loss": ["smooth_l1", "l2"]},
    "mdn": {"num_components": [1, 3], "hidden": ["[32]", "0"]},
    "autoregressive": {"distribution": ["gaussian", "logistic"], "num_components": [1, 3], "hidden": ["[16]", "[32,32]"]},
    "flow": {"transform": ["spline", "affine"], "num_layers": [1, 2], "hidden": [16, 32], "num_bins": [3, 5],
             "num_components": [1, 2, 3]},
    "diffusion": {"timesteps": [20, 100], "sampling_steps": [4, 50], "depth": [1, 2],
                  "beta_schedule": ["linear", "squaredcos_cap_v2"], "prediction_type": ["v_prediction", "epsilon"]},
}
IMAGE_KNOBS = {
    "model.cross_scale": ["true", "false"],
    "model.spatial_bias": ["true", "false"],
    "model.adaptive": ["true", "false"],
    "model.zoom": ["true", "false"],
    "model.sigreg_weight": [0.0, 0.1],
    "model.dropout": [0.0, 0.1],
    "model.predictor.levels": ["null", 1, 2, 5],
    "model.predictor.moe_experts": [0, 0, 4],
    "model.predictor.moe_top_k": [1, 2, 6],
    "model.predictor.num_heads": [2, 2, 2, 5],  # 5 does not divide the predictor width 24
}
EVAL_KNOBS = {
    "eval.num_samples": [2, 8],
    "eval.knn_k": [1, 5, 100],
    "eval.retrieval_candidates": [2, 4],
    "eval.coverage_levels": ["[0.5]", "[0.5,0.8,0.95]"],
    "eval.energy_tokens_per_image": [1, 16],
}
HYPERMODAL = [
    "experiment=hypermodal_flat", "data.train_size=64", "data.val_size=32", "hypermodal.dim=24",
    "hypermodal.depth=1", "hypermodal.num_heads=2", "hypermodal.embed_dim=16", "hypermodal.points.group_size=8",
    "hypermodal.predictor.dim=24", "hypermodal.predictor.depth=1", "hypermodal.predictor.num_heads=2",
    "trainer.batch_size=8", "trainer.log_every=1", "trainer.progress=false", "eval.batch_size=64",
]
HYPERMODAL_KNOBS = {
    "data.modalities": ["[image,audio]", "[image,text,points]", "[audio,video]"],
    "hypermodal.objectives.joint": [0.0, 1.0],
    "hypermodal.m3.enabled": ["false", "false", "true"],
    "hypermodal.predictor.moe_experts": [0, 4],
    "hypermodal.dim": [24, 24, 20],  # 20: not a multiple of 6 (sin-cos of three coordinates)
}
SMALL_EVAL = ["eval.probe_train_size=32", "eval.probe_val_size=16", "eval.head_images=4", "eval.head_rows=32",
              "eval.sample_rows=16", "eval.retrieval_queries=8", "eval.ambiguity_pairs=2", "eval.probe_max_iter=20",
              "eval.map_images=1"]


def pick(rng: random.Random, knobs: dict[str, list]) -> list[str]:
    return [f"{key}={rng.choice(values)}" for key, values in knobs.items() if rng.random() < 0.5]


def sample(index: int) -> list[str]:
    """Combination ``index`` of the seeded sample: head and knobs, model (or modalities), ablations, eval knobs."""
    rng = random.Random(index)
    head = sorted(HEAD_CONFIGS)[index % len(HEAD_CONFIGS)]  # every head equally often
    overrides = [f"predictor={head}"]
    overrides += [f"predictor.{k}" for k in pick(rng, HEAD_KNOBS.get(head, {}))]
    if index % 5 == 4:  # several modalities
        overrides += [*HYPERMODAL, *pick(rng, HYPERMODAL_KNOBS)]
    else:
        preset = MODEL_PRESETS[rng.randrange(len(MODEL_PRESETS))]
        overrides += [*shrunk_model(preset), *pick(rng, IMAGE_KNOBS)]
        levels = len(OmegaConf.load(CONF / "model" / f"{preset}.yaml").dims)
        if rng.random() < 0.3:
            overrides.append(f"model.levels={rng.randint(1, levels + 1)}")  # levels + 1 is invalid
    overrides += [*SMALL_EVAL, *pick(rng, EVAL_KNOBS)]
    overrides += ["trainer.max_steps=2", f"trainer.epochs={rng.choice([1, 1.5, 2])}"]
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("index", range(NUM_SAMPLES))
def test_configuration_trains_and_evaluates_or_fails_before_step_1(index, compose, tmp_path):
    overrides = sample(index)
    cfg = compose(*overrides)
    run = RunDir(tmp_path / "run")
    try:
        result = pretrain(cfg, run_dir=run.path)
    except ConfigError as e:
        assert not run.metrics.exists() and not run.checkpoint.exists(), "failed after training had started"
        named = {o.split("=")[0].rsplit(".", 1)[-1] for o in overrides}
        assert any(key in str(e) for key in named), f"the message names none of the keys {sorted(named)}: {e}"
        return
    assert result.status == "stopped" and result.step == 2
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert run.eval.exists() and result.metrics
