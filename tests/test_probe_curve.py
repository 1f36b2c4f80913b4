"""The probe curve (``eval.probe_curve``): the representation during training, read without changing training."""
from __future__ import annotations

import json

import pytest

from conftest import SMALL_EVAL

from prob_jepa.config import ConfigError
from prob_jepa.run_dir import RunDir
from prob_jepa.train import pretrain


def curve(run: RunDir) -> dict[int, tuple[float, float]]:
    points = [r for r in run.read_metrics() if "linear_probe" in r]
    assert len({r["step"] for r in points}) == len(points), "metrics.jsonl must hold each point once"
    return {r["step"]: (r["linear_probe"], r["knn"]) for r in points}


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


@pytest.mark.slow
def test_the_curve_starts_at_the_random_init_ends_at_the_pretrained_encoder_and_leaves_training_alone(
    compose, tiny_overrides, tmp_path
):
    """With the curve's subsets as large as the evaluation's (the tiny data is smaller than both), its first point
    is eval.json's random-initialization reference and its last the pretrained encoder's — the same instrument."""
    probed = pretrain(compose(*tiny_overrides, *SMALL_EVAL, "eval.probe_curve.every=2"), run_dir=tmp_path / "probed")
    run = RunDir(probed.run_dir)
    points = curve(run)
    assert sorted(points) == [0, 2, 4]  # step 0 and every 2 steps (max_steps=4 stops before the schedule's end)
    rep = probed.metrics["representation"]
    assert points[0] == (rep["random_init"]["linear_probe"], rep["random_init"]["knn"])
    assert points[4] == (rep["pretrained"]["linear_probe"], rep["pretrained"]["knn"])
    assert json.loads(run.eval.read_text())["train"]["probe_curve"] == {
        "step": [0, 2, 4], "linear_probe": [p[0] for p in points.values()], "knn": [p[1] for p in points.values()]}
    assert (run.plots / "training_curves.png").exists()

    plain = pretrain(compose(*tiny_overrides, *SMALL_EVAL, "eval.enabled=false"), run_dir=tmp_path / "plain")
    assert losses(run) == losses(RunDir(plain.run_dir)) and len(losses(run)) == 4


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_curve(compose, tiny_overrides, tmp_path):
    overrides = (*tiny_overrides, "eval.enabled=false", "eval.probe_curve.every=5", "trainer.checkpoint_every=100")
    pretrain(compose(*overrides, "trainer.max_steps=7"), run_dir=tmp_path / "resumed")
    resumed = pretrain(compose(*overrides), run_dir=tmp_path / "resumed")
    straight = pretrain(compose(*overrides), run_dir=tmp_path / "straight")
    assert resumed.step == straight.step == 16
    a, b = RunDir(resumed.run_dir), RunDir(straight.run_dir)
    assert sorted(curve(a)) == [0, 5, 10, 15, 16]
    assert curve(a) == curve(b)
    assert losses(a) == losses(b)


@pytest.mark.parametrize("override, message", [
    ("eval.probe_curve.every=0", "eval.probe_curve.every=0"),
    ("eval.probe_curve.every=2.5", "eval.probe_curve.every=2.5"),
    ("eval.probe_curve.train_size=5", "eval.probe_curve.train_size=5"),
])
def test_a_curve_that_cannot_be_drawn_fails_before_anything_is_written(compose, tiny_overrides, tmp_path, override,
                                                                       message):
    with pytest.raises(ConfigError, match=message):
        pretrain(compose(*tiny_overrides, "eval.probe_curve.every=2", override), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_recipe_without_frozen_features_refuses_the_curve(compose, tmp_path):
    with pytest.raises(ConfigError, match="recipe=hypermodal has no frozen features"):
        pretrain(compose("experiment=hypermodal_shapes", "eval.probe_curve.every=2"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_that_starts_afresh_drops_the_records_of_an_attempt_without_a_checkpoint(compose, tiny_overrides,
                                                                                        tmp_path):
    """An attempt that died before its first checkpoint left records; the new start must not append to them (the
    step-0 point and every step would be there twice)."""
    run = RunDir(tmp_path / "run")
    run.create()
    run.log({"step": 0, "epoch": 0.0, "linear_probe": 0.5, "knn": 0.5})
    run.log({"step": 1, "loss": 123.0})
    pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=2", "eval.probe_curve.every=5"),
             run_dir=run.path)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]
    assert 123.0 not in losses(run).values() and curve(run)[0] != (0.5, 0.5)
