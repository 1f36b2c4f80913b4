"""The command line: clear errors for bad input, a sweep, and the comparison of its runs."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import HEAD_CONFIGS, ROOT, SMALL_EVAL


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_unknown_predictor_lists_valid_names():
    proc = run("experiments/run.py", "predictor=gaussian_process")
    assert proc.returncode != 0
    for name in ("deterministic", "mdn", "autoregressive", "flow", "diffusion"):
        assert name in proc.stderr + proc.stdout


def test_unknown_config_key_lists_valid_keys():
    proc = run("experiments/run.py", "trainer.batchsize=8")
    assert proc.returncode != 0
    assert "trainer.batchsize" in proc.stderr and "batch_size" in proc.stderr and "max_steps" in proc.stderr


def test_impossible_combination_fails_before_step_1_without_a_traceback(tmp_path):
    """50 DDIM steps cannot sample a 20-step schedule: it used to train to the end and fail in evaluation."""
    proc = run("experiments/run.py", "predictor=diffusion", "predictor.timesteps=20", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "sampling_steps=50" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("override, message", [
    ("data.scene.hue=[0.5,1.5]", "data.scene.hue must be a range 0 <= lo <= hi <= 1"),
    ("mask.image.0.context_quantile=0", "mask.image.0.context_quantile=0 must lie in (0, 1]"),
])
def test_an_out_of_range_value_fails_before_step_1_without_a_traceback(override, message, tmp_path):
    proc = run("experiments/run.py", override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert f"error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_dataset_says_where_and_how(tmp_path):
    proc = run("experiments/run.py", "data=tiny_imagenet_100", f"data.root={tmp_path / 'nowhere'}",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere") in proc.stderr and "tiny-imagenet-200.zip" in proc.stderr


@pytest.mark.slow
def test_five_head_sweep_then_compare(tiny_overrides, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("experiments/run.py", "-m", "-cn", "config", "experiment=compare_heads", *tiny_overrides, *SMALL_EVAL,
               f"hydra.sweep.dir={sweep}", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads = list(HEAD_CONFIGS)  # every head config is swept (glob), in Hydra's alphabetical order
    assert len(heads) == 5
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [  # folders name only what the sweep varies
        f"{i}_predictor={head}" for i, head in enumerate(heads)]
    out = tmp_path / "comparison"
    proc = run("experiments/compare.py", str(sweep), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 5 and table[0].startswith("| run | head |")
    assert {line.split("|")[2].strip() for line in table[2:]} == {
        "deterministic", "mdn", "autoregressive", "flow", "diffusion"}
    assert "| run | head |" in proc.stdout
    for png in ("probe.png", "reliability.png", "pit.png", "energy.png", "ambiguity_pca.png", "ambiguity_axis.png",
                "uncertainty_maps.png", "what_could_be_here.png",
                "tradeoffs.png", "training_curves.png"):
        assert Image.open(out / png).size[0] > 200, png
    assert (out / "comparison.csv").read_text().count("\n") == 6
    with (out / "comparison.csv").open() as f:  # the random-init reference's k-NN has a column
        mdn = next(r for r in csv.DictReader(f) if r["head"] == "mdn")
    reference = json.loads((sweep / f"{heads.index('mdn')}_predictor=mdn" / "eval.json").read_text())
    assert float(mdn["knn_random_init"]) == reference["representation"]["random_init"]["knn"]


@pytest.mark.slow
def test_a_terminated_run_saves_and_exits_non_zero(tmp_path):
    """SIGTERM (preemption) saves the checkpoint; the exit status says the run is not done, so a scheduler requeues
    it rather than counting it a success."""
    import os
    import shlex
    import signal
    import time

    from conftest import TINY

    proc = subprocess.Popen([sys.executable, "experiments/run.py", *TINY, "eval.enabled=false", "trainer.epochs=50",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None) and "interrupted at step" in err, (proc.returncode, err[-2000:])
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    # the command that continues it names the run directory (the default one is named by the start time)
    again = shlex.join([*TINY, "eval.enabled=false", "trainer.epochs=50", f"hydra.run.dir={tmp_path}"])
    assert f"python experiments/run.py {again}" in err, err[-2000:]


def test_a_refused_resume_leaves_the_hydra_record_as_it_was(tmp_path):
    """Hydra writes each attempt's record before the run starts; only an accepted run's record replaces the old one."""
    from conftest import TINY

    common = ["experiments/run.py", *TINY, "eval.enabled=false", f"hydra.run.dir={tmp_path}"]
    first = run(*common, "trainer.max_steps=1")
    assert first.returncode == 0, first.stderr[-2000:]
    record = (tmp_path / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.max_steps=1" in record and not (tmp_path / ".hydra-attempt").exists()
    refusals = {"optim.lr=0.5": "optim.lr: 0.002 -> 0.5", "trainer.resume=false": "nothing is overwritten"}
    for override, message in refusals.items():
        refused = run(*common, "trainer.max_steps=2", override)
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr, \
            refused.stderr[-2000:]
        assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == record
        assert not (tmp_path / ".hydra-attempt").exists()
    resumed = run(*common, "trainer.max_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "trainer.max_steps=2" in (tmp_path / ".hydra" / "overrides.yaml").read_text()
