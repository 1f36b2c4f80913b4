"""torch.compile of the default training step: one graph per run, equal to eager (issue 17)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from prob_jepa.config import ConfigError
from prob_jepa.run_dir import RunDir
from prob_jepa.train import pretrain

STEPS = 50
# the default configuration (jin_tiny on shapes, deterministic head), at a batch that fits 50 steps in a test;
# aot_eager: Dynamo's capture and AOT autograd exactly as with inductor, without inductor's C++ code generation
# (minutes on 2 cores; experiments/bench.py --compile measures inductor)
RUN = ["trainer.batch_size=16", f"data.train_size={16 * STEPS}", "data.val_size=64", "trainer.epochs=1",
       "trainer.log_every=1", "trainer.progress=false", "eval.enabled=false", "trainer.compile_backend=aot_eager"]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in RunDir(run_dir).read_metrics()]


@pytest.mark.slow
def test_the_default_training_step_compiles_to_one_graph_equal_to_eager(compose, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    compiled = pretrain(compose(*RUN, "trainer.compile=true"), run_dir=tmp_path / "compiled")
    graph_breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    eager = pretrain(compose(*RUN, "trainer.compile=false"), run_dir=tmp_path / "eager")
    assert compiled.step == eager.step == STEPS
    assert graph_breaks == {}, f"graph breaks in the training step: {graph_breaks}"
    assert 1 <= graphs <= 3, f"{graphs} graphs compiled over {STEPS} steps (at most 2 recompiles)"
    a, b = losses(compiled.run_dir), losses(eager.run_dir)
    assert len(a) == len(b) == STEPS
    torch.testing.assert_close(torch.tensor(a[:5]), torch.tensor(b[:5]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-3, atol=0)  # 50 steps of drift at most


def test_an_unknown_compile_backend_fails_before_step_1(compose, tmp_path):
    with pytest.raises(ConfigError, match="trainer.compile_backend='inductr'.*inductor"):
        pretrain(compose(*RUN, "trainer.compile=true", "trainer.compile_backend=inductr"), run_dir=tmp_path)


@pytest.mark.slow
def test_a_one_level_model_trains_under_inductor(compose, tmp_path):
    """``model=vit_tiny`` compiled by inductor: with one level of weight 1 the loss simplifies to the level's term,
    and a detached copy of that term among the outputs once cost the loss its gradient (failed at backward)."""
    torch._dynamo.reset()
    small = ["model=vit_tiny", "model.depths=[2]", "model.predictor.depth=1", "trainer.batch_size=4",
             "data.train_size=8", "data.val_size=8", "trainer.epochs=1", "trainer.progress=false",
             "eval.enabled=false", "trainer.compile=true", "trainer.compile_backend=inductor"]
    trainer = pretrain(compose(*small), run_dir=tmp_path)
    assert trainer.step == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in RunDir(tmp_path).read_metrics())
