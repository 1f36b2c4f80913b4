"""experiments/bench.py measures the real training step of the image JEPA and of the hypermodal JEPA."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT, TINY
from test_hypermodal import SMALL


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [TINY, SMALL + ["hypermodal.predictor.moe_experts=4"]], ids=["image", "hypermodal"]
)
def test_bench_measures_a_training_step(overrides):
    row = load_bench().measure(list(overrides), steps=2, warmup=1)
    assert row["step_ms"] > 0 and row["images_per_s"] > 0 and row["gflops_per_step"] > 0
    assert row["peak_memory_mb"] > 0 and 0 < row["mfu"] < 1
    assert row["model"] == ("hypermodal" if "experiment=hypermodal_shapes" in overrides else "vit_tiny")
