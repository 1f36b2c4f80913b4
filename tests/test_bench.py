"""experiments/bench.py measures the real training step of the image JEPA and of the hypermodal JEPA."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, TINY, load_experiment, shrunk_model
from test_hypermodal import SMALL


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [TINY, SMALL + ["hypermodal.predictor.moe_experts=4"]], ids=["image", "hypermodal"]
)
def test_bench_measures_a_training_step(overrides):
    row = load_experiment("bench").measure(list(overrides), steps=2, warmup=1, compiled=False)
    assert row["step_ms"] > 0 and row["images_per_s"] > 0 and row["gflops_per_step"] > 0
    assert row["peak_memory_mb"] > 0 and 0 < row["mfu"] < 1
    assert row["model"] == ("hypermodal" if "experiment=hypermodal_flat" in overrides else "vit_tiny")


@pytest.mark.slow
def test_bench_compiles_the_step_and_counts_graphs_and_breaks():
    row = load_experiment("bench").measure(TINY + ["trainer.compile_backend=aot_eager"], steps=2, warmup=1, compiled=True)
    assert row["compiled"] and row["graphs"] == 1 and row["graph_breaks"] == 0
    assert row["first_step_s"] > 0 and row["step_ms"] > 0


def test_bench_measures_the_flops_adaptive_computation_saves():
    bench = load_experiment("bench")
    saved = bench.adaptive_flops(shrunk_model("jin_tiny") + ["model.capacity=[0.5,0.5]", "trainer.batch_size=4"])
    assert saved["gflops_adaptive"] < saved["gflops_full"] and 0.02 < saved["flops_saved"] < 0.6
    assert bench.adaptive_flops(shrunk_model("jin_tiny") + ["model.adaptive=false"]) is None


def test_bench_sizes_the_moe_comparison_by_the_trunk():
    dim, hidden, tokens = load_experiment("bench").trunk_tokens([])  # the default run: jin_tiny predicts level 1 only
    assert (dim, hidden) == (96, 384)
    assert tokens == 64 * (19 + 4 * 12)  # K_c context units + 4 target blocks of K_t units, one token each


def test_bench_ijepa_names_the_checkout_it_expects(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_ijepa.py"), "--ijepa", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert f"--ijepa {tmp_path}: no src/train.py (expected a facebookresearch/ijepa checkout)" in done.stderr


def test_bench_prints_every_preset_with_measured_and_claimed_parameters():
    rows = {r["preset"]: r for r in load_experiment("bench").presets()}
    assert set(rows) >= {"jin_s", "jin_b", "jin_l", "jin_xl", "hiera_s", "jin_tiny", "vit_tiny"}
    claimed = {name: r["paper_M"] for name, r in rows.items() if r["paper_M"] is not None}
    assert claimed == {"jin_s": 28, "jin_b": 112, "jin_l": 632, "jin_xl": 1800}  # JIN Table 5
    assert rows["vit_tiny"]["params_M"] == pytest.approx(5.38, abs=0.01)  # test_presets counts it by hand
    assert rows["jin_s"]["params_M"] > 3 * claimed["jin_s"] and rows["jin_s"]["last_level_M"] > 2 * claimed["jin_s"]
    assert all(r["gflops"] > 0 for r in rows.values())
    assert rows["jin_xl"]["gflops"] > rows["jin_l"]["gflops"] > rows["jin_b"]["gflops"] > rows["jin_s"]["gflops"]
