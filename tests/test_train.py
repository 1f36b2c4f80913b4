"""Training: resume equality, NaN guard, signals, run directory, user datasets."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import OLD_IMAGE_LAYOUTS, SMALL_EVAL

from prob_jepa.config import ConfigError
from prob_jepa.data import build_datasets
from prob_jepa.eval import evaluation_sets, random_init_model
from prob_jepa.eval.metrics import paired_difference
from prob_jepa.eval.representation import extract_features, knn_predict, linear_probe
from prob_jepa.eval.scale import rescale
from prob_jepa.model import build_model
from prob_jepa.run_dir import ADDED_SCENE_OPTIONS, RunDir
from prob_jepa.run_io import load_run
from prob_jepa.train import NonFiniteLossError, pretrain


class ListDataset(torch.utils.data.Dataset):
    """A user's own dataset: (image [3, H, W], int label) pairs."""

    def __init__(self, n: int, size: int = 32, fill: float | None = None, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g) if fill is None else torch.full((n, 3, size, size), fill)
        self.y = torch.arange(n) % 4

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics()}


@pytest.mark.slow
def test_resume_continues_exactly(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, "eval.enabled=false", "trainer.checkpoint_every=100")
    cfg_stop = compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=5")
    first = pretrain(cfg_stop, run_dir=tmp_path / "resumed")
    assert first.status == "stopped" and first.step == 5
    resumed = pretrain(cfg, run_dir=tmp_path / "resumed")
    straight = pretrain(cfg, run_dir=tmp_path / "straight")
    assert resumed.step == straight.step == 16 and resumed.status == "completed"
    a, b = losses(RunDir(resumed.run_dir)), losses(RunDir(straight.run_dir))
    assert sorted(a) == sorted(b) == list(range(1, 17)), "metrics.jsonl must hold each step once"
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@pytest.mark.parametrize("log_every", [1, 5])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(compose, tiny_overrides, tmp_path, log_every):
    """The guard reads a device flag only at logging / checkpoint steps (no host sync per step): a loss that turns
    NaN at step 4 is found at step 5 with ``log_every=5`` — and still named, with the step-3 checkpoint kept."""
    cfg = compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=3")
    pretrain(cfg, ListDataset(64), run_dir=tmp_path)
    ckpt = RunDir(tmp_path).checkpoint
    good = ckpt.read_bytes()
    cfg = compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=8", f"trainer.log_every={log_every}",
                  "trainer.checkpoint_every=3")
    with pytest.raises(NonFiniteLossError, match="step 4 ") as err:
        pretrain(cfg, ListDataset(64, fill=float("nan")), run_dir=tmp_path)
    assert str(ckpt) in str(err.value) and "'loss': nan" in str(err.value)
    assert ckpt.read_bytes() == good
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    assert max(losses(RunDir(tmp_path))) == 3  # nothing of steps 4-5 was logged


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(compose, tiny_overrides, tmp_path, monkeypatch):
    import prob_jepa.train as train

    step = train.Trainer.train_step

    def preempted_during_step_3(self, micro_batches):  # a preemption arrives while step 3 computes
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, micro_batches)

    monkeypatch.setattr(train.Trainer, "train_step", preempted_during_step_3)
    cfg = compose(*tiny_overrides, "trainer.checkpoint_every=100")
    result = pretrain(cfg, ListDataset(64), run_dir=tmp_path)
    assert result.status == "interrupted" and result.step == 3 and result.metrics == {}
    assert torch.load(RunDir(tmp_path).checkpoint, weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.slow
def test_run_directory_holds_everything_a_user_needs(compose, tiny_overrides, tmp_path):
    result = pretrain(compose(*tiny_overrides), run_dir=tmp_path)
    run = RunDir(tmp_path)
    assert run.load_config().model.dims == [32]
    rec = run.read_metrics()[-1]
    for key in ("step", "epoch", "loss", "jepa", "lr", "weight_decay", "ema", "grad_norm", "images_per_s",
                "memory_mb", "feature_std", "effective_rank"):
        assert key in rec, key
    state = torch.load(run.checkpoint, weights_only=True)
    assert state["step"] == 16 and not any(k.startswith("module.") for k in state["model"])
    metrics = json.loads(run.eval.read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    # the stored probe is the saved model's: re-extracting the features from the run directory alone and
    # refitting gives the same accuracy (fails if the evaluation probed other weights or other images)
    trained, cfg = load_run(tmp_path)
    model = trained.level_jepa("image")
    train_set, val_set = evaluation_sets(*build_datasets(cfg.data, ("train_eval", "val")), cfg.eval)
    tx, ty = extract_features(model.features, train_set, 64, torch.device("cpu"))
    vx, vy = extract_features(model.features, val_set, 64, torch.device("cpu"))
    refit = linear_probe(tx, ty, vx, vy, max_iter=cfg.eval.probe_max_iter)
    assert refit.accuracy == metrics["representation"]["pretrained"]["linear_probe"]
    # so is the scale robustness: the 1x probe on the validation images at half size (JIN Table 4)
    sx, sy = extract_features(lambda x: model.features(rescale(x, 0.5)), val_set, 64, torch.device("cpu"))
    half = (refit.predict(sx).argmax(1) == sy).float().mean().item()
    assert half == metrics["representation"]["pretrained"]["scale"]["0.5"]["linear_probe"]
    assert set(metrics["representation"]["random_init"]["scale"]) == {"0.5", "2.0"}
    # the margin pairs the two encoders' probes image by image (fails if it paired other images or other probes)
    random_features = random_init_model(cfg, torch.device("cpu")).level_jepa("image").features
    rtx, rx = (extract_features(random_features, s, 64, torch.device("cpu"))[0] for s in (train_set, val_set))
    reference = linear_probe(rtx, ty, rx, vy, max_iter=cfg.eval.probe_max_iter)
    assert reference.accuracy == metrics["representation"]["random_init"]["linear_probe"]
    right = [(p.predict(x).argmax(1) == vy) for p, x in ((refit, vx), (reference, rx))]
    margin = metrics["representation"]["margin"]
    assert (margin["linear_probe"], margin["linear_probe_se"]) == paired_difference(*right)
    knn = [knn_predict(t, ty, x, cfg.eval.knn_k, cfg.eval.knn_temperature) == vy
           for t, x in ((tx, vx), (rtx, rx))]
    assert (margin["knn"], margin["knn_se"]) == paired_difference(*knn) and margin["images"] == len(vy)
    for png in ("training_curves.png", "probe.png", "scale_robustness.png", "uncertainty_maps.png",
                "what_could_be_here.png"):
        assert Image.open(run.plots / png).size[0] > 100


def test_user_dataset_without_validation_set(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, "trainer.max_steps=2", "eval.knn_k=5")
    result = pretrain(cfg, train_set=ListDataset(80), run_dir=tmp_path)
    assert result.status == "stopped" and "random_init" in result.metrics["representation"]


def test_existing_checkpoint_is_never_overwritten_without_resume(compose, tiny_overrides, tmp_path):
    pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=1"), run_dir=tmp_path)
    with pytest.raises(FileExistsError, match="trainer.resume=true"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.resume=false"), run_dir=tmp_path)


def test_damaged_checkpoint_says_what_to_do(compose, tiny_overrides, tmp_path):
    run = RunDir(tmp_path)
    run.create()
    run.checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="damaged"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false"), run_dir=tmp_path)


def test_fractional_epochs_train_that_many_steps(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, "eval.enabled=false", "trainer.epochs=1.5")  # 8 steps per epoch
    result = pretrain(cfg, run_dir=tmp_path / "run")
    assert result.status == "completed" and result.step == 12


def test_epochs_giving_no_step_fail_before_training(compose, tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="trainer.epochs=0.01"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.epochs=0.01"), run_dir=tmp_path / "run")
    assert not RunDir(tmp_path / "run").metrics.exists()


def test_head_options_that_evaluation_would_reject_fail_when_the_model_is_built(compose, tiny_overrides, tmp_path):
    """50 DDIM steps cannot sample a 20-step schedule: that used to surface after training, in evaluation."""
    cfg = compose(*tiny_overrides, "predictor=diffusion", "predictor.timesteps=20")
    with pytest.raises(ConfigError, match="sampling_steps=50 must be between 1 and timesteps=20"):
        pretrain(cfg, run_dir=tmp_path / "run")
    assert not RunDir(tmp_path / "run").metrics.exists()


def test_an_evaluation_that_would_fail_stops_the_run_before_step_1(compose, tiny_overrides, tmp_path, monkeypatch):
    """Any evaluation fault (here a planted one in the figures) is met by the preflight, not after training."""
    from prob_jepa.eval import plots

    def broken(*args, **kwargs):
        raise RuntimeError("planted figure fault")

    monkeypatch.setattr(plots, "all_figures", broken)
    with pytest.raises(ConfigError, match="planted figure fault"):
        pretrain(compose(*tiny_overrides), run_dir=tmp_path / "run")
    assert not RunDir(tmp_path / "run").metrics.exists() and not RunDir(tmp_path / "run").checkpoint.exists()


def test_a_parameter_no_loss_reads_fails_before_step_1(compose, tiny_overrides, tmp_path, monkeypatch):
    """DDP would stop at step 2 waiting for its gradient; the preflight step names it instead."""
    from dataclasses import replace

    from prob_jepa.recipes import RECIPES

    def with_orphan(cfg):
        model = build_model(cfg)
        model.orphan = torch.nn.Linear(2, 2)
        return model

    monkeypatch.setitem(RECIPES, "image", replace(RECIPES["image"], build_model=with_orphan))
    with pytest.raises(ConfigError, match=r"orphan\.weight, orphan\.bias"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false"), run_dir=tmp_path / "run")


def test_preflight_leaves_training_unchanged(compose, tiny_overrides, tmp_path, monkeypatch):
    """The preflight step and evaluation touch no weight, buffer or random stream that training reads."""
    import prob_jepa.train as train

    cfg = compose(*tiny_overrides, *SMALL_EVAL, "trainer.max_steps=3")
    with_preflight = pretrain(cfg, run_dir=tmp_path / "a")
    monkeypatch.setattr(train, "check_gradients", lambda *args: None)
    monkeypatch.setattr(train, "preflight_evaluation", lambda *args: None)
    without = pretrain(cfg, run_dir=tmp_path / "b")
    assert losses(RunDir(with_preflight.run_dir)) == losses(RunDir(without.run_dir))
    assert with_preflight.metrics["representation"] == without.metrics["representation"]


@pytest.mark.parametrize("overrides, named", [
    (["trainer.log_every=0"], "trainer.log_every=0"),
    (["trainer.checkpoint_every=null"], "trainer.checkpoint_every=None"),
    # 4 target blocks of 12 of 64 units leave at most 52
    (["mask.image.0.min_keep=56", "trainer.max_steps=10"], "mask.image"),
    (["data.marker.x=30"], "data.marker"),  # 8 px marker at x=30 in a 32 px image
    # these trained nothing and reported "stopped", crashed unnamed in the loop, or failed only after the model was
    # built (a traceback, not the error line)
    (["trainer.max_steps=-1"], "trainer.max_steps=-1 must be a positive number of optimizer steps"),
    (["trainer.max_steps=2.5"], "trainer.max_steps=2.5"),
    (["trainer.strategy=ddpp"], "trainer.strategy='ddpp'; valid: ddp, fsdp"),
    (["trainer.micro_batch_size=3"], "trainer.micro_batch_size 3"),
    (["data.image_size=34"], "data.image_size=34 / model.patch_size=4 = 8.5 patches a side"),
])
def test_settings_found_by_a_new_user_fail_before_step_1(overrides, named, compose, tiny_overrides, tmp_path):
    """Each of these used to train at least one step, then crash or (the marker) score nonsense."""
    with pytest.raises(ConfigError) as error:
        pretrain(compose(*tiny_overrides, "eval.enabled=false", *overrides), run_dir=tmp_path / "run")
    assert named in str(error.value)
    assert not RunDir(tmp_path / "run").metrics.exists()


def test_a_refused_resume_leaves_the_run_directory_as_it_was(compose, tiny_overrides, tmp_path):
    run = RunDir(tmp_path / "run")
    pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=2"), run_dir=run.path)
    saved = run.config.read_text()
    with pytest.raises(ConfigError, match="optim.lr: 0.002 -> 0.5"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=4", "optim.lr=0.5"), run_dir=run.path)
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.resume=false", "predictor=mdn"),
                 run_dir=run.path)
    assert run.config.read_text() == saved
    old = OmegaConf.load(run.config)  # as saved before the scene options that draw nothing by default existed
    for key in ADDED_SCENE_OPTIONS:
        del old.data.scene[key]
    OmegaConf.save(old, run.config)
    resumed = pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=4"), run_dir=run.path)
    assert resumed.step == 4  # a run-control key (trainer.max_steps) may change
    run.config.unlink()  # the checkpoint still knows what it was trained with
    with pytest.raises(ConfigError, match="optim.lr: 0.002 -> 0.5"):
        pretrain(compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=6", "optim.lr=0.5"), run_dir=run.path)


def test_a_checkpoint_with_optimizer_state_for_parameters_the_model_lacks_is_refused_not_half_loaded(
        compose, tiny_overrides, tmp_path):
    """A non-strict optimizer load would drop such state silently (a one-modality hypermodal run at its levels written
    before that model dropped its shared space held its level head's moments under another name): resume names
    them and changes nothing."""
    run = RunDir(tmp_path / "run")
    overrides = (*tiny_overrides, "eval.enabled=false")
    pretrain(compose(*overrides, "trainer.max_steps=1"), run_dir=run.path)
    state = torch.load(run.checkpoint, weights_only=True)
    moments = state["optimizer"]["state"]
    moments["heads.7.proj.weight"] = moments.pop("heads.0.proj.weight")
    torch.save(state, run.checkpoint)
    with pytest.raises(RuntimeError, match=r"optimizer state for 1 parameter\(s\) this model does not have "
                                           r"\(heads\.7\.proj\.weight\)"):
        pretrain(compose(*overrides, "trainer.max_steps=2"), run_dir=run.path)
    assert torch.load(run.checkpoint, weights_only=True)["step"] == 1


@pytest.mark.parametrize("layout", OLD_IMAGE_LAYOUTS)
def test_an_image_run_of_an_earlier_layout_resumes_exactly(compose, tiny_overrides, tmp_path, layout):
    """A checkpoint whose model and optimizer state carry the names of an earlier layout (the image JEPA's class:
    its encoder at context_encoder.*; the one model's level predictor of its own: level_predictors.image.*) resumes
    as the same checkpoint under today's names: every AdamW moment found, the same next steps to the last bit."""
    old_name = OLD_IMAGE_LAYOUTS[layout]
    overrides = (*tiny_overrides, "eval.enabled=false", "model.predictor.moe_experts=0")
    runs = {kind: RunDir(tmp_path / kind) for kind in ("today", "old")}
    for run in runs.values():
        pretrain(compose(*overrides, "trainer.max_steps=2"), run_dir=run.path)
    state = torch.load(runs["old"].checkpoint, weights_only=True)
    state["model"] = {old_name(k): v for k, v in state["model"].items()}
    optimizer = state["optimizer"]
    optimizer["state"] = {old_name(k): v for k, v in optimizer["state"].items()}
    for group in optimizer["param_groups"]:
        group["params"] = [old_name(k) for k in group["params"]]
    assert not any(".tokens.image." in k for k in optimizer["state"])
    assert {"image_class": "predictor.", "level_predictor": "level_predictors.image."}[layout] + \
        "stage.blocks.0.attn.qkv.weight" in optimizer["state"]
    torch.save(state, runs["old"].checkpoint)
    for run in runs.values():
        assert pretrain(compose(*overrides, "trainer.max_steps=4"), run_dir=run.path).step == 4
    today, old = (torch.load(run.checkpoint, weights_only=True) for run in runs.values())
    assert today["model"].keys() == old["model"].keys()
    assert all(torch.equal(today["model"][k], old["model"][k]) for k in today["model"])
    assert losses(runs["today"]) == losses(runs["old"])


def test_head_lr_scale_gives_the_heads_and_only_them_a_multiple_of_the_schedules_lr(compose, tiny_overrides, tmp_path):
    from prob_jepa.train import param_groups

    cfg = compose(*tiny_overrides, "eval.enabled=false", "predictor=mdn", "trainer.max_steps=2",
                  "optim.head_lr_scale=5")
    model = build_model(cfg)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    heads = {id(p) for p in model.heads.parameters()}
    assert [len(g["params"]) > 0 for g in param_groups(model)] == [True, True]  # the two groups of before
    groups = param_groups(model, 5.0)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)
    assert {id(p) for g in groups if g["lr_scale"] == 5.0 for p in g["params"]} == heads
    for bad in (0.0, -1, float("inf"), "5", None, True):
        with pytest.raises(ConfigError, match="optim.head_lr_scale="):
            param_groups(model, bad)

    pretrain(cfg, run_dir=tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    lrs = {g["lr_scale"]: g["lr"] for g in saved}
    assert lrs[5.0] == pytest.approx(5 * lrs[1.0]) and lrs[1.0] > 0
