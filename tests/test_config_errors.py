"""A configuration no run can train with fails before step 1 with a ConfigError naming its key (found by a new
user trying values by hand), and a diverging run of the default backbone reaches the NaN guard."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import shrunk_model

from prob_jepa.config import ConfigError
from prob_jepa.train import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-0.001", "optim.lr=-0.001 must be a finite number > 0"),
    ("optim.lr=0", "optim.lr=0 must be a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.start_lr=nan", "optim.start_lr=nan must be a finite number >= 0"),
    ("optim.final_lr=-1", "optim.final_lr=-1"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1"),
    ("optim.final_weight_decay=inf", "optim.final_weight_decay=inf"),
    ("optim.ema=[1.5,1.5]", r"optim.ema=\[1.5, 1.5\] must be \[first, last\]"),
    ("optim.ema=[0.98]", r"optim.ema=\[0.98\] must be \[first, last\]"),
    ("trainer.precision=fp16", "trainer.precision='fp16'; valid: auto, fp32, bf16"),
    ("trainer.device=tpu", "trainer.device='tpu'; valid: auto, cpu, cuda"),
    ("trainer.precision=bf16", "trainer.precision=bf16 on cpu: bf16 autocast is for CUDA only"),
    ("trainer.clip_grad=-1", "trainer.clip_grad=-1 must be a finite gradient norm > 0"),
    ("mask.image.0.num_targets=0", r"mask\.image\.0\.num_targets=0 must be a positive number of target blocks"),
    ("mask.image.0.target_scale=[0.3,0.1]", r"mask\.image\.0\.target_scale=\[0.3, 0.1\] must be a range"),
    ("mask.image.0.target_aspect=[0,0]", r"mask\.image\.0\.target_aspect=\[0, 0\] must be a range"),
    ("mask.image=[]", r"mask\.image=.* must be a non-empty list of mask specs"),
    ("mask.image=[{kind:grid}]", r"mask\.image\.0\.kind='grid'; valid: multiblock, blocks"),
    ("mask.image=[{kind:blocks,num_targets:2,target_size:2,scale:1}]",
     r"mask\.image\.0: kind blocks takes no option\(s\) \['scale'\]; valid: num_targets, target_size"),
    ("mask.image=[{kind:multiblock},{kind:blocks,num_targets:8,target_size:8}]",
     r"mask\.image\.1: 8 target blocks .* of 8 mask units .* leave no context among the modality's 64 mask units"),
    ("mask.image=[{kind:blocks}]",
     r"mask\.image\.0: kind blocks needs option\(s\) \['num_targets', 'target_size'\]; valid: num_targets, "
     r"target_size"),
    ("mask.image.0.target_scale=0.2", r"mask\.image\.0\.target_scale=0\.2 must be a range \[low, high\]"),
    ("mask.image.0.target_scale=[0.1,0.2,0.3]", r"mask\.image\.0\.target_scale=\[0\.1, 0\.2, 0\.3\] must be a range"),
    ("mask.image.0.context_quantile=abc", r"mask\.image\.0\.context_quantile='abc' must lie in \(0, 1\]"),
    ("mask.image.0.kind=[a]", r"mask\.image\.0\.kind=\['a'\]; valid: multiblock, blocks"),
    ("mask.image.0.min_keep=0", r"mask\.image\.0\.min_keep=0 must be a positive number of context units"),
    ("+mask.audio=[{kind:blocks,num_targets:1,target_size:1}]", r"mask has entries for \['audio'\]: the image recipe "
     r"reads mask\.image only"),
    ("model.level_weights=[nan]", r"model.level_weights=\[nan\] must give a finite weight >= 0"),
    ("model.level_weights=[-1]", r"model.level_weights=\[-1\] must give a finite weight >= 0"),
    ("model.level_weights=[abc]", r"model.level_weights=\['abc'\] must give a finite weight >= 0"),
    ("model.sigreg_weight=-1", "model.sigreg_weight=-1 must be a finite number >= 0"),
    ("model.sigreg_weight=0.1 model.sigreg_slices=0", "model.sigreg_slices=0 must be a positive number"),
    ("model.level_weights=[0]", r"weighs the predicted levels \[0\] .* by 0"),
    ("model.predictor.levels=0", r"model\.predictor\.levels=0 must be null \(every level\) or a whole number between 1 "
     r"and model\.levels=\d"),
    ("model.predictor.levels=1.5", r"model\.predictor\.levels=1\.5 must be null"),
    ("model.predictor.levels=true", r"model\.predictor\.levels=True must be null"),
    ("predictor=mdn predictor.num_components=0", "predictor.num_components=0|num_components=0: a positive number"),
    ("predictor=mdn predictor.hidden=-5", "hidden=-5: positive layer widths"),
    ("predictor=autoregressive predictor.num_components=0", "num_components=0: a positive number"),
    ("predictor=autoregressive predictor.hidden=[-5]", r"hidden=\[-5\]: positive MADE layer widths"),
    ("predictor=flow predictor.num_components=0", "predictor=flow: .*num_components=0: a positive number of flows"),
    # found by a new user (2026-12-06): each trained, or crashed naming no key
    ("predictor=flow predictor.num_layers=-2", "num_layers=-2: a number of coupling layers >= 0"),
    ("predictor=flow predictor.num_bins=0", "num_bins=0: a positive integer"),
    ("predictor=flow predictor.tail_bound=0", r"tail_bound=0: a finite number > 0"),
    ("predictor=mdn predictor.min_scale=-1", r"min_scale=-1: a floor on the scales in \[0, 1\)"),
    ("predictor=mdn predictor.min_scale=1", r"min_scale=1: a floor on the scales in \[0, 1\)"),
    ("data.train_size=-5", r"data\.train_size=-5 must be a positive number of scenes"),
    ("data.val_size=0", r"data\.val_size=0 must be a positive number of scenes"),
    ("data.scene.distractors=-2", "data.scene.distractors must be a whole number >= 0"),
    ("data.scene.noise=-0.1", "data.scene.noise must be a finite pixel-noise std >= 0"),
    ("data.marker.size=0", r"data\.marker\.size=0 must be a positive number of pixels"),
    ("data.marker.size=-4", r"data\.marker\.size=-4 must be a positive number of pixels"),
    ("seed=-1", r"seed=-1 must be a whole number >= 0"),
    ("data.marker.size=null", r"data\.marker\.size=None must be a positive number of pixels"),
    ("data.marker.size=abc", r"data\.marker\.size='abc' must be a positive number of pixels"),
    ("data.marker.x=-1", r"data\.marker\.x=-1 must be a whole number of pixels >= 0"),
    ("model.predictor.moe_experts=-2", r"model\.predictor\.moe_experts=-2 must be a whole number >= 0"),
    ("predictor=diffusion predictor.timesteps=-5", "timesteps=-5: a positive number of diffusion steps"),
])
def test_a_value_no_run_can_train_with_is_named_before_anything_is_trained(compose, tiny_overrides, tmp_path,
                                                                          override, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(compose(*tiny_overrides, "eval.enabled=false", *override.split()), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("eval.batch_size=null", r"eval\.batch_size=None must be a positive number of images"),
    ("eval.batch_size=64.0", r"eval\.batch_size=64\.0 must be a positive number of images"),
    ("eval.head_images=null", r"eval\.head_images=None must be at least 2"),
    ("eval.probe_train_size=64.0", r"eval\.probe_train_size=64\.0 must be at least 10 \(or null: every image\), a"),
    ("eval.probe_val_size=abc", r"eval\.probe_val_size='abc' must be at least 2 \(or null: every image\), a whole"),
])
def test_an_evaluation_value_the_preflight_would_shrink_is_named_before_step_1(compose, tiny_overrides, tmp_path,
                                                                            override, message):
    """The preflight evaluates with its own smaller sizes; a run value no evaluation can use was replaced by them,
    passed, and failed after the last step."""
    with pytest.raises(ConfigError, match=message):
        pretrain(compose(*tiny_overrides, override), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_diverging_default_backbone_stops_at_the_nan_guard_instead_of_crashing(tmp_path):
    """jin_tiny's zoom samples crops with grid_sample, whose CPU backward crashes the process (segmentation fault)
    on a NaN grid; NaN weights reach it between the NaN guard's checks (logging steps), so the ROI centre is kept
    finite. Run in a child process: a crash must fail this test, not end the test session."""
    overrides = [*shrunk_model("jin_tiny"), "data.image_size=32", "data.train_size=64", "data.val_size=32",
                 "data.marker.size=8", "trainer.batch_size=16", "trainer.max_steps=6", "trainer.log_every=5",
                 "trainer.progress=false", "eval.enabled=false", "optim.lr=1e8", "optim.start_lr=1e8"]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from conftest import CONF
        from prob_jepa.config import compose_config
        from prob_jepa.train import NonFiniteLossError, pretrain
        try:
            pretrain(compose_config(CONF, {overrides!r}), run_dir={str(tmp_path / "run")!r})
        except NonFiniteLossError as e:
            print("NonFiniteLossError:", e)
    """)
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stderr[-2000:]}"
    assert "NonFiniteLossError: loss became non-finite at step" in child.stdout, child.stdout + child.stderr[-2000:]
