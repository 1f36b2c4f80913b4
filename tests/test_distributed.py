"""torchrun: two processes (gloo, CPU) train exactly like one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from prob_jepa.run_dir import RunDir
from prob_jepa.train import pretrain


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_only_rank0_writes(strategy, compose, tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "trainer.max_steps=3", "trainer.checkpoint_every=100", "eval.enabled=false",
                 f"trainer.strategy={strategy}"]
    single = pretrain(compose(*overrides), run_dir=tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "experiments/run.py", *overrides, f"hydra.run.dir={tmp_path / 'ranks'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = RunDir(single.run_dir).read_metrics(), RunDir(tmp_path / "ranks").read_metrics()
    assert [r["step"] for r in two] == [1, 2, 3], "each step logged once (rank 0 only)"
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    written = {p.name for p in (tmp_path / "ranks").iterdir()}
    assert written == {"config.yaml", "metrics.jsonl", "checkpoints", "plots", ".hydra", "run.log"}, written
    assert [p.name for p in (tmp_path / "ranks" / "checkpoints").iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_hypermodal_model_trains_under_torchrun(tmp_path):
    """Ranks draw their own masks and modality dropout, so some encoders get no gradient on a rank: DDP copes."""
    from test_hypermodal import SMALL

    overrides = [*SMALL, "trainer.max_steps=2", "eval.enabled=false", "hypermodal.modality_dropout=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "experiments/run.py", *overrides, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in RunDir(tmp_path).read_metrics()] == [1, 2]
    assert (tmp_path / "checkpoints" / "last.pt").exists()
