"""Every model preset builds and reports its size; the scale presets compose as documented."""
from __future__ import annotations

import pytest
import torch

from conftest import MODEL_PRESETS
from prob_jepa.eval.cost import level_report
from prob_jepa.model import build_model
from prob_jepa.train import accumulation

@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_every_model_preset_builds_on_meta_and_reports_parameters_and_flops(name, compose):
    cfg = compose(f"model={name}")
    cfg.data.image_size = cfg.model.image_size
    cfg.model.adaptive = False  # FLOPs of the full computation (α = 1)
    with torch.device("meta"):
        model = build_model(cfg)
    rows = {r["part"]: r for r in level_report(model, cfg.model.image_size)}
    total = rows["encoder total"]
    assert total["gflops"] > 0
    levels = [r for k, r in rows.items() if k.startswith("level")]
    assert len(levels) == cfg.model.levels
    # the levels (and the zoom's ROI net) partition the encoder: every parameter is reported once
    parts = sum(r["params"] for r in levels) + rows.get("zoom", {"params": 0})["params"]
    assert parts == total["params"] > 0


def test_vit_tiny_reports_the_parameters_of_a_vit_tiny(compose):
    """ViT-Tiny/8 counted by hand: 12 blocks of 12·d² + 13·d (qkv, projection, 4× MLP, two LayerNorms), the
    8 × 8 patch embedding 3·8²·d + d and the final LayerNorm 2·d, with d = 192 and no learned position
    embedding (JIN's spatial bias is off in this preset; I-JEPA's position embedding is fixed sin-cos)."""
    cfg = compose("model=vit_tiny")
    with torch.device("meta"):
        model = build_model(cfg)
    d = 192
    rows = {r["part"]: r for r in level_report(model, cfg.model.image_size, count_flops=False)}
    assert rows["encoder total"]["params"] == 12 * (12 * d**2 + 13 * d) + (3 * 8**2 * d + d) + 2 * d


def test_jin_presets_follow_the_documented_shapes(compose):
    expected = {"jin_s": 35, "jin_b": 52, "jin_l": 214, "jin_xl": 673}  # encoder parameters, millions (README)
    for name, millions in expected.items():
        cfg = compose(f"model={name}")
        cfg.data.image_size = cfg.model.image_size
        with torch.device("meta"):
            enc = build_model(cfg).context_encoder
        assert enc.levels == 4 and enc.grid == 56 and enc.unit_grid == 7
        assert sum(p.numel() for p in enc.parameters()) / 1e6 == pytest.approx(millions, rel=0.05), name


def test_a100_preset_reaches_its_global_batch_by_accumulation(compose):
    cfg = compose("experiment=a100_jin_l")
    assert (cfg.model.name, cfg.data.name, cfg.trainer.strategy) == ("jin_l", "imagenet_1k", "fsdp")
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.warmup_epochs == 40 and cfg.trainer.epochs == 400
    assert accumulation(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, 8) == (128, 4)
    assert accumulation(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, 32) == (128, 1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        accumulation(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, 3)


def test_tiny_imagenet_preset_keeps_a_user_chosen_model(compose):
    assert compose("experiment=tiny_imagenet_100").model.dims == [384]
    cfg = compose("experiment=tiny_imagenet_100", "model=jin_tiny")
    assert cfg.model.name == "jin_tiny" and cfg.data.name == "tiny_imagenet_100" and cfg.trainer.batch_size == 256
