"""JIN Table 3's rows (conf/ablation) change what their names say, and the sweep runs every one."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from jin.layers import SpatialBias
from jin.zoom import NoZoom
from prob_jepa.config import ConfigError, group_options
from prob_jepa.eval.summary import head_label, head_presets, model_label
from prob_jepa.model import build_model

ROWS = ["full", "no_cross_scale", "no_hierarchy", "no_spatial_attention", "single_scale"]  # image runs
HYPERMODAL_ROWS = {  # experiment=hypermodal_shapes with these hypermodal.* values
    "full_hypermodal": {}, "no_ebm": {"objectives.energy": 0}, "no_alignment": {"objectives.energy": 0,
                                                                                "objectives.infonce": 0},
    "late_fusion": {"shared_blocks": False, "objectives.cross": 0},  # and joint 0, as the default has it
}


def built(compose, *overrides):
    cfg = compose(*overrides)
    with torch.device("meta"):
        return cfg, build_model(cfg)


def test_the_ablation_group_holds_table_3s_rows_and_the_sweep_takes_them_all(compose):
    assert group_options(CONF, "ablation") == sorted([*ROWS, *HYPERMODAL_ROWS])
    sweep = OmegaConf.load(CONF / "experiment" / "sweep_jin_ablations.yaml")
    assert sweep.hydra.sweeper.params == {"ablation": "glob(*)"}
    full, default = compose("ablation=full"), compose()
    assert (full.model.ablation, default.model.ablation) == ("full", None)
    default.model.ablation = "full"
    assert full == default  # the first row is the default run


@pytest.mark.parametrize("row", ["no_hierarchy", "single_scale"])
def test_the_one_level_rows_build_from_a_four_level_preset(row, compose):
    cfg, model = built(compose, "model=jin_s", f"ablation={row}")
    assert model.level_jepa("image").levels == 1 and model.predict_levels == [0]


def test_a_hypermodal_run_refuses_the_image_rows(compose):
    from prob_jepa.hypermodal import build_hypermodal

    with pytest.raises(ConfigError, match="ablation=no_hierarchy .* are image runs"):
        build_hypermodal(compose("experiment=hypermodal_shapes", "ablation=no_hierarchy"))


@pytest.mark.parametrize("row", list(HYPERMODAL_ROWS))
def test_the_multimodal_rows_are_the_hypermodal_run_with_their_changes_only(row, compose):
    cfg, base = compose("experiment=sweep_jin_ablations", f"ablation={row}"), compose("experiment=hypermodal_shapes")
    assert model_label(cfg) == f"hypermodal+jin_tiny/{row}"
    cfg.hypermodal.ablation = None
    for key, value in HYPERMODAL_ROWS[row].items():
        assert OmegaConf.select(cfg.hypermodal, key) == value != OmegaConf.select(base.hypermodal, key)
        OmegaConf.update(cfg.hypermodal, key, OmegaConf.select(base.hypermodal, key))
    assert cfg == base  # and nothing else changes


def test_late_fusion_gives_each_modality_blocks_of_its_own_and_predicts_within_modalities_only(compose):
    """``late_fusion``: a modality's features do not depend on the blocks another modality passes (they do with
    shared blocks), and the steps make no cross-modal prediction."""
    from prob_jepa.distributed import DistInfo
    from prob_jepa.hypermodal import build_hypermodal
    from prob_jepa.hypermodal.planner import HypermodalPlanner

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g)
    for row, shared in (("full_hypermodal", True), ("late_fusion", False)):
        cfg = compose("experiment=sweep_jin_ablations", f"ablation={row}")
        torch.manual_seed(0)
        model = build_hypermodal(cfg).eval()
        encoder = model.context_encoder
        before = encoder("image", image).features
        with torch.no_grad():
            for p in encoder.blocks("audio").parameters():
                p.add_(0.1)
        assert torch.equal(encoder("image", image).features, before) != shared, row
    planner = HypermodalPlanner(cfg, model, DistInfo(0, 1, 0, torch.device("cpu")), micro=2, accum=1, total_steps=1)
    for step in range(4):
        inputs = {"image": image, "points": torch.rand(2, 256, 3, generator=g)}
        tasks = planner((inputs, None), step=step, micro=0)["tasks"]
        assert {t.kind for t in tasks} == {"within"} and all(t.sources == (t.target,) for t in tasks)
    with pytest.raises(ConfigError, match=r"hypermodal\.shared_blocks='no': true .* or false"):
        build_hypermodal(compose("experiment=sweep_jin_ablations", "ablation=late_fusion", "hypermodal.shared_blocks=no"))


@pytest.mark.parametrize("row", ROWS[1:])
def test_each_ablation_removes_its_component_and_nothing_else(row, compose):
    _, full = built(compose)
    cfg, model = built(compose, f"ablation={row}")
    enc = model.level_jepa("image").context_encoder
    hierarchical = row not in ("no_hierarchy", "single_scale")
    assert enc.levels == (2 if hierarchical else 1)
    assert (model.cross_scale is None) == (row == "no_cross_scale" or not hierarchical)
    has_bias = any(isinstance(m, SpatialBias) for m in model.modules())
    assert has_bias == (row != "no_spatial_attention")
    assert isinstance(enc.zoom, NoZoom) == (row == "single_scale")
    assert enc.unit_grid == full.level_jepa("image").context_encoder.unit_grid  # the same mask units: the same masks
    assert model.sigreg is not None and cfg.predictor.name == "deterministic" and cfg.model.ablation == row


def test_the_head_column_names_a_head_s_options_that_differ_from_its_preset(compose):
    """``compare.py`` labels a run's head by its name and the options that differ from the head's preset, so a
    two-flow run or an ε-diffusion run is not shown as the preset head."""
    presets = head_presets(CONF)
    for name in presets:
        assert head_label(compose(f"predictor={name}").predictor, presets) == name
    assert head_label(compose("predictor=flow", "predictor.num_components=2").predictor, presets) == \
        "flow(num_components=2)"
    cfg = compose("predictor=diffusion", "predictor.prediction_type=epsilon", "predictor.depth=2")
    assert head_label(cfg.predictor, presets) == "diffusion(depth=2,prediction_type=epsilon)"
    assert head_label(cfg.predictor) == "diffusion"  # without presets: the name
