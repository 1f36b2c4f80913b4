"""Training: resume equality, NaN guard, signals, run directory, user datasets."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from PIL import Image

from prob_jepa.run_dir import RunDir
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


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=3")
    pretrain(cfg, ListDataset(64), run_dir=tmp_path)
    ckpt = RunDir(tmp_path).checkpoint
    good = ckpt.read_bytes()
    cfg = compose(*tiny_overrides, "eval.enabled=false", "trainer.max_steps=6")
    with pytest.raises(NonFiniteLossError, match="step 4") as err:
        pretrain(cfg, ListDataset(64, fill=float("nan")), run_dir=tmp_path)
    assert str(ckpt) in str(err.value)
    assert ckpt.read_bytes() == good
    assert torch.load(ckpt, weights_only=True)["step"] == 3


class SignalAt(ListDataset):
    """Delivers SIGTERM to this process when item ``at`` is loaded (a preemption)."""

    def __init__(self, n: int, at: int):
        super().__init__(n)
        self.loaded, self.at = 0, at

    def __getitem__(self, i):
        self.loaded += 1
        if self.loaded == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(i)


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(compose, tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, "trainer.checkpoint_every=100")
    result = pretrain(cfg, SignalAt(64, at=16 * 2 + 3), run_dir=tmp_path)  # during step 3
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
    for enc in ("pretrained", "random_init"):
        assert 0 <= metrics["representation"][enc]["linear_probe"] <= 1
    for png in ("training_curves.png", "probe.png"):
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
