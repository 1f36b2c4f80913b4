"""JIN Table 3's rows (conf/ablation) change what their names say, and the sweep runs every one."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from jin.layers import SpatialBias
from jin.zoom import NoZoom
from prob_jepa.config import group_options
from prob_jepa.eval.summary import model_label
from prob_jepa.model import build_model

ROWS = ["full", "no_cross_scale", "no_hierarchy", "no_spatial_attention", "single_scale"]  # image runs
HYPERMODAL_ROWS = {  # experiment=hypermodal_shapes with these alignment weights (energy λ2, InfoNCE)
    "full_hypermodal": (0.1, 1.0), "no_ebm": (0.0, 1.0), "no_alignment": (0.0, 0.0),
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
    assert model.context_encoder.levels == 1 and model.predict_levels == [0]


def test_a_hypermodal_run_refuses_the_image_rows(compose):
    from prob_jepa.config import ConfigError
    from prob_jepa.hypermodal import build_hypermodal

    with pytest.raises(ConfigError, match="ablation=no_hierarchy .* are image runs"):
        build_hypermodal(compose("experiment=hypermodal_shapes", "ablation=no_hierarchy"))


@pytest.mark.parametrize("row", list(HYPERMODAL_ROWS))
def test_the_multimodal_rows_are_the_hypermodal_run_without_their_alignment_terms(row, compose):
    cfg = compose("experiment=sweep_jin_ablations", f"ablation={row}")
    energy, infonce = HYPERMODAL_ROWS[row]
    assert (cfg.hypermodal.objectives.energy, cfg.hypermodal.objectives.infonce) == (energy, infonce)
    assert model_label(cfg) == f"hypermodal+jin_tiny/{row}"
    cfg.hypermodal.ablation = None
    cfg.hypermodal.objectives.energy, cfg.hypermodal.objectives.infonce = 0.1, 1.0
    assert cfg == compose("experiment=hypermodal_shapes")  # and nothing else changes


@pytest.mark.parametrize("row", ROWS[1:])
def test_each_ablation_removes_its_component_and_nothing_else(row, compose):
    _, full = built(compose)
    cfg, model = built(compose, f"ablation={row}")
    enc = model.context_encoder
    hierarchical = row not in ("no_hierarchy", "single_scale")
    assert enc.levels == (2 if hierarchical else 1)
    assert (model.cross_scale is None) == (row == "no_cross_scale" or not hierarchical)
    has_bias = any(isinstance(m, SpatialBias) for m in model.modules())
    assert has_bias == (row != "no_spatial_attention")
    assert isinstance(enc.zoom, NoZoom) == (row == "single_scale")
    assert enc.unit_grid == full.context_encoder.unit_grid  # the same mask units: the same masks
    assert model.sigreg is not None and cfg.predictor.name == "deterministic" and cfg.model.ablation == row
