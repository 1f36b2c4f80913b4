"""torchrun: two processes (gloo, CPU) train exactly like one process with the same global batch."""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, SMALL_EVAL, image_class_name, shrunk_model
from prob_jepa.distributed import DistInfo, init_distributed, mean_over_ranks, settle
from prob_jepa.run_dir import RunDir
from prob_jepa.train import pretrain


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_terms(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    terms = [{"loss": 1.0, "jepa/within": 2.0}, {"jepa/cross": 4.0, "loss": 3.0}][rank]
    logged = mean_over_ranks({k: torch.tensor(v) for k, v in terms.items()}, DistInfo(rank, 2, rank, torch.device("cpu")))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(logged, f)
    dist.destroy_process_group()


def test_logged_terms_are_averaged_by_name_over_the_ranks_that_have_them(tmp_path):
    """Ranks whose steps made different terms (modality dropout, curriculum) log the same names, each the mean of
    the ranks that computed it — not the values of another name that sat at the same position."""
    mp.spawn(_log_terms, args=(_free_port(), str(tmp_path / "logged")), nprocs=2)
    logged = [json.loads((tmp_path / f"logged.{r}").read_text()) for r in range(2)]
    assert logged[0] == logged[1] == {"loss": 2.0, "jepa/within": 2.0, "jepa/cross": 4.0}


def _exit_after_a_run(rank: int, port: int, out: str, settled: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    after_the_run = []

    def record_and_leave() -> None:  # registered first, so it runs after any handler init_distributed registers
        Path(f"{out}.{rank}").write_text(f"{after_the_run} {dist.is_initialized()}")
        os._exit(0)  # past the interpreter's finalization, where a group left up can abort the process

    atexit.register(record_and_leave)
    info = init_distributed("cpu")
    if settled:
        settle(info)
    else:  # a run stopped before its last barrier
        dist.barrier()
    after_the_run.append(dist.is_initialized())


@pytest.mark.parametrize("settled", [True, False])
def test_a_rank_destroys_its_process_group_at_exit_only_after_the_run_settled(settled, tmp_path):
    """A Gloo group left to the interpreter's finalization aborted a rank that had finished its run (SIGABRT,
    "terminate called without an active exception": a torchrun test in CI), so a settled run's group is gone by
    the time the process's exit handlers are done — and not before (the process's next run, a multirun's job, uses
    it: re-creating it fails under torchrun); one that did not settle (a rank leaving by an exception) is left,
    since destroying it waits for work its peers will never finish."""
    mp.spawn(_exit_after_a_run, args=(_free_port(), str(tmp_path / "initialized"), settled), nprocs=2)
    assert [(tmp_path / f"initialized.{r}").read_text() for r in range(2)] == [f"[True] {not settled}"] * 2


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
def test_an_image_run_of_before_the_one_model_resumes_under_fsdp(compose, tiny_overrides, tmp_path):
    """A checkpoint under the image JEPA's old names is renamed before FSDP shards it by name: two ranks resume it
    and take the step one process takes from the same checkpoint."""
    overrides = [*tiny_overrides, "trainer.checkpoint_every=100", "eval.enabled=false", "trainer.strategy=fsdp"]
    for run in ("single", "ranks"):
        pretrain(compose(*overrides, "trainer.max_steps=2"), run_dir=tmp_path / run)
    checkpoint = RunDir(tmp_path / "ranks").checkpoint
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {image_class_name(k): v for k, v in state["model"].items()}
    state["optimizer"]["state"] = {image_class_name(k): v for k, v in state["optimizer"]["state"].items()}
    for group in state["optimizer"]["param_groups"]:
        group["params"] = [image_class_name(k) for k in group["params"]]
    torch.save(state, checkpoint)
    single = pretrain(compose(*overrides, "trainer.max_steps=3"), run_dir=tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "experiments/run.py",
           *overrides, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'ranks'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (RunDir(d).read_metrics()[-1] for d in (single.run_dir, tmp_path / "ranks"))
    assert one["step"] == two["step"] == 3 and two["loss"] == pytest.approx(one["loss"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_run_evaluates_on_rank_0(tiny_overrides, tmp_path):
    """Only rank 0 receives the full state under cpu_offload; the other ranks must not try to load it."""
    overrides = [*tiny_overrides, *SMALL_EVAL, "trainer.max_steps=2", "trainer.strategy=fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "experiments/run.py", *overrides, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "representation" in RunDir(tmp_path).read_eval()


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


# JIN Table 3's ablations (our switches for each row) and every predictor.levels choice of the 2-level preset.
# Equality with one process needs a loss that is a sum over images: adaptive computation (its budget term
# squares the batch-mean α) and SIGReg (a statistic of the rank's batch) are not, so the rows compared switch
# them off, and the preset with both ("default") is held to training through without a stall.
ABLATIONS = {
    "full": [],
    "no_hierarchy": ["model.levels=1"],
    "no_cross_scale": ["model.cross_scale=false"],
    "no_spatial_attention": ["model.spatial_bias=false"],
    "single_scale": ["model.levels=1", "model.zoom=false"],
    "predict_every_level": ["model.predictor.levels=null"],
    "predict_level_1_no_cross_scale": ["model.predictor.levels=1", "model.cross_scale=false"],
    "predict_both_no_cross_scale": ["model.predictor.levels=2", "model.cross_scale=false"],
}
BATCH_STATISTICS_OFF = ["model.adaptive=false", "model.sigreg_weight=0"]


@pytest.mark.slow
def test_every_ablation_trains_under_torchrun_like_one_process(compose, tmp_path):
    """A module that no loss reads must not stall DDP (it waited for the level-0 norm's gradient at step 2
    with ``model.cross_scale=false``); each ablation's 2-rank losses equal one process's."""
    base = [*shrunk_model("jin_tiny"), "trainer.max_steps=3", "trainer.checkpoint_every=100", "eval.enabled=false"]
    runs = {name: [*base, *BATCH_STATISTICS_OFF, *extra] for name, extra in ABLATIONS.items()}
    runs["default"] = [*base, "model.cross_scale=false"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path / "ranks"), "runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/torchrun_configs.py", str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, overrides in runs.items():
        two = RunDir(tmp_path / "ranks" / name).read_metrics()
        assert [r["step"] for r in two] == [1, 2, 3], name
        if name == "default":
            continue
        one = RunDir(pretrain(compose(*overrides), run_dir=tmp_path / "single" / name).run_dir).read_metrics()
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (name, a["step"], a["loss"], b["loss"])
