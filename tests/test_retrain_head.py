"""experiments/retrain_head.py: heads trained from scratch on a finished run's frozen predictor outputs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CONF, SMALL_EVAL, TINY, load_experiment
from prob_jepa.config import compose_config
from prob_jepa.eval.heads import Rows
from prob_jepa.train import pretrain


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "tiny"
    pretrain(compose_config(CONF, [*TINY, *SMALL_EVAL, "predictor=mdn"]), run_dir=path)
    return path


@pytest.mark.slow
def test_the_run_s_own_head_scores_as_in_eval_json_and_retrained_heads_are_scored_alike(tiny_run, tmp_path):
    """The first row re-scores the run's head on the evaluation's rows, pairs and head samples: every number must be
    eval.json's to the last digit, so the retrained heads below it are scored as the run's head was."""
    rh = load_experiment("retrain_head")
    argv = [str(tiny_run), "heads=[mdn,flow]", "steps=3", "train_images=16", "batch_size=64",
            "per_head.flow.num_components=2", f"out={tmp_path}"]
    rows = rh.main(argv)
    metrics = json.loads((tiny_run / "eval.json").read_text())
    own = rows[0]
    assert own["head"] == "mdn (the run's)"
    calibration, samples = metrics["head"]["calibration"], metrics["multimodality"]["samples"]
    assert own["nll_per_dim"] == metrics["head"]["likelihood"]["nll_per_dim"]
    assert own["sample_temperature"] == calibration["temperature"]
    assert [own[f"cov{round(100 * float(level))}"] for level in calibration["after"]["coverage"]] == \
        list(calibration["after"]["coverage"].values())
    assert (own["on_mode"], own["minority_share"]) == (samples["on_mode"], samples["share_b"])
    assert rh.replay_note(metrics) is None
    assert [r["head"] for r in rows[1:]] == ["mdn", "flow(num_components=2)"]
    assert all(r["steps"] == 3 and math.isfinite(r["nll_per_dim"]) and 0 <= r["on_mode"] <= 1 for r in rows[1:])
    assert json.loads((tmp_path / "retrained_heads.json").read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "retrained_heads.csv").read_text().count("\n") == 1 + 3  # header, the run's head, two retrained
    again = rh.main(argv)  # seeded: the same rows, heads and scores
    assert [{k: v for k, v in r.items() if k != "train_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "train_s"} for r in rows]


@pytest.mark.slow
def test_a_head_option_the_head_rejects_stops_the_command_before_any_row_is_collected(tiny_run, tmp_path, capsys):
    rh = load_experiment("retrain_head")
    with pytest.raises(SystemExit, match=r"error: per_head.flow.\*: predictor=flow: invalid predictor.\* options"):
        rh.main([str(tiny_run), "heads=[mdn,flow]", "per_head.flow.bogus=1", f"out={tmp_path}"])
    assert "training rows" not in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_an_evaluation_without_seeded_head_samples_is_named():
    replay_note = load_experiment("retrain_head").replay_note
    assert "predates seeded head samples" in replay_note({"head": {"likelihood": {"nll_per_dim": 0.1}}})
    assert replay_note({"head": {"sample_seed": 10**9}}) is None and replay_note({}) is None  # {}: not evaluated


def test_training_rows_keep_each_condition_with_its_own_target():
    cond = torch.arange(100.0)[:, None].repeat(1, 3)
    rows = Rows(cond, 2 * cond[:, :2], torch.zeros(100, dtype=torch.long))
    _, c, y = load_experiment("retrain_head").RowSampler(rows).sample(64, torch.Generator().manual_seed(0))
    assert c.shape == (64, 3) and torch.equal(y, 2 * c[:, :2]) and len(c.unique(dim=0)) > 32


@pytest.mark.parametrize("override, message", [
    ("step=3", r"unknown key\(s\) step; valid: heads, train_images, steps"),
    ("heads=[mdnx]", "heads: mdnx; valid: autoregressive, deterministic, diffusion, flow, mdn"),
    ("per_head.mdnx.steps=5", "per_head: mdnx; valid:"),
    ("steps=0", "steps=0: a positive number of training steps"),
    ("per_head.flow.steps=1.5", r"per_head.flow.steps=1.5: a positive number of training steps"),
    ("batch_size=0", "batch_size=0: a positive integer"),
    ("train_images=-1", "train_images=-1: a positive integer"),
    ("lr=-1", "lr=-1: a finite learning rate > 0"),
    ("per_head.mdn.lr=abc", "per_head.mdn.lr='abc': a finite learning rate > 0"),
    ("seed=abc", "seed='abc': an integer"),
    ("per_head.flow=3", "per_head.flow=3: a head's settings are keys"),
    ("heads=mdn", "heads=mdn: a non-empty list"),
    ("heads=[]", r"heads=\[\]: a non-empty list"),
])
def test_a_wrong_key_or_value_is_refused_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        load_experiment("retrain_head").load_config([override])
