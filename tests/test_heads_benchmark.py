"""experiments/heads_benchmark.py runs every head config it finds, with or without a ``per_head`` entry."""
from __future__ import annotations

import math

from omegaconf import OmegaConf

from conftest import HEAD_CONFIGS, load_experiment


def test_the_default_benchmarks_every_head_config():
    hb = load_experiment("heads_benchmark")
    cfg = OmegaConf.load(hb.CONF / "heads_benchmark.yaml")
    assert hb.head_names(cfg) == list(HEAD_CONFIGS)
    assert hb.head_names(OmegaConf.merge(cfg, {"heads": ["flow"]})) == ["flow"]


def test_a_head_without_a_per_head_entry_runs_with_the_defaults():
    hb = load_experiment("heads_benchmark")
    cfg = OmegaConf.merge(OmegaConf.load(hb.CONF / "heads_benchmark.yaml"),
                          {"steps": 3, "batch_size": 16, "test_size": 32, "timing_rows": 4, "num_samples": 4})
    del cfg.per_head["mdn"]
    row = hb.run_one(cfg, "mdn", "bimodal", 2)
    assert row["steps"] == 3 and math.isfinite(row["nll"]) and 0 <= row["mode_share"] <= 0.5
