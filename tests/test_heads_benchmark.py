"""experiments/heads_benchmark.py runs every head config it finds, with or without a ``per_head`` entry."""
from __future__ import annotations

import math
import re

import pytest
from omegaconf import OmegaConf

from conftest import HEAD_CONFIGS, load_experiment


def test_the_default_benchmarks_every_head_config():
    hb = load_experiment("heads_benchmark")
    assert list(hb.load_config([]).heads) == list(HEAD_CONFIGS)
    assert list(hb.load_config(["heads=[flow]"]).heads) == ["flow"]


def test_a_head_without_a_per_head_entry_runs_with_the_defaults():
    hb = load_experiment("heads_benchmark")
    cfg = OmegaConf.merge(OmegaConf.load(hb.CONF / "heads_benchmark.yaml"),
                          {"steps": 3, "batch_size": 16, "test_size": 32, "timing_rows": 4, "num_samples": 4})
    del cfg.per_head["mdn"]
    row = hb.run_one(cfg, "mdn", "bimodal", 2)
    assert row["steps"] == 3 and math.isfinite(row["nll"]) and 0 <= row["mode_share"] <= 0.5


def test_an_unknown_key_is_refused_by_name_and_a_head_s_options_are_not():
    hb = load_experiment("heads_benchmark")
    cfg = hb.load_config(["per_head.flow.num_layers=4", "per_head.mdn.steps=3", "steps=7"])
    assert cfg.per_head.flow.num_layers == 4 and cfg.per_head.mdn.steps == 3 and cfg.steps == 7
    for override, key in (("+per_head.flow.num_layers=4", "+per_head"), ("step=3", "step")):
        with pytest.raises(ValueError, match=rf"unknown key\(s\) {re.escape(key)}; valid: heads, tasks, dims"):
            hb.load_config([override])


@pytest.mark.parametrize("override, message", [
    ("per_head.flow.bogus=1", r"per_head.flow.\*: predictor=flow: invalid predictor.\* options"),
    ("per_head.diffusion.name=mdn", "per_head.diffusion.name=mdn: a head's name is its per_head key"),
    ("cond_dim=0", "cond_dim=0: a positive integer"),
    ("cond_dim=1.5", "cond_dim=1.5: a positive integer"),
    ("num_samples=-2", "num_samples=-2: a positive integer"),
    ("heads=[mdnx]", "heads: mdnx; valid: autoregressive, deterministic, diffusion, flow, mdn"),
    ("per_head.mdnx.steps=5", "per_head: mdnx; valid:"),
    ("tasks=[foo]", "tasks: foo; valid: bimodal"),
    ("tasks=[]", "tasks: none; valid:"),
    ("dims=[0]", r"dims=\[0\]: a list of positive target dimensions"),
    ("per_head.mdn.steps=0", "per_head.mdn.steps=0: a positive number of training steps"),
    ("steps=-1", "steps=-1: a positive number of training steps"),
])
def test_a_benchmark_that_cannot_run_is_refused_before_any_head_trains(override, message):
    with pytest.raises(ValueError, match=message):
        load_experiment("heads_benchmark").load_config([override])


def test_options_for_a_head_that_is_not_trained_are_refused_not_ignored():
    hb = load_experiment("heads_benchmark")
    with pytest.raises(ValueError, match=r"per_head.flow: flow is not among heads=\['mdn'\], so its options would be "
                                         r"ignored"):
        hb.load_config(["heads=[mdn]", "per_head.flow.num_layers=4"])
    # the file's own per_head entries for every head stay defaults, whatever heads trains
    assert list(hb.load_config(["heads=[mdn]", "per_head.mdn.steps=3"]).heads) == ["mdn"]


@pytest.mark.slow
def test_two_mode_tasks_report_where_the_samples_sit_and_where_the_truth_does():
    hb = load_experiment("heads_benchmark")
    cfg = OmegaConf.merge(OmegaConf.load(hb.CONF / "heads_benchmark.yaml"),
                          {"steps": 300, "test_size": 512, "timing_rows": 256, "num_samples": 16,
                           "per_head": {"mdn": {"steps": 300}, "deterministic": {"steps": 300}}})
    mdn, point = hb.run_one(cfg, "mdn", "ambiguous", 64), hb.run_one(cfg, "deterministic", "ambiguous", 64)
    assert mdn["on_mode_true"] == point["on_mode_true"] == pytest.approx(0.894, abs=0.03)
    assert mdn["on_mode"] > 0.75 and abs(mdn["mode_share"] - 0.3) < 0.06
    # the deterministic head's samples are its mean (0.7 along the axis) plus one isotropic noise: one hump
    assert point["on_mode"] < 0.65
    assert hb.run_one(OmegaConf.merge(cfg, {"steps": 2}), "mdn", "heteroscedastic", 2)["on_mode"] is None
