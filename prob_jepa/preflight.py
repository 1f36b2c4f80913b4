"""Before step 1: prove that a run can train and evaluate to the end, so no configuration wastes a run.

Two checks, both on the real code paths:

- :func:`check_gradients`: one forward / backward of the real training step; a trainable
  parameter that no loss reads is named (DDP would otherwise stop at step 2 waiting for it).
- :func:`preflight_evaluation`: the whole evaluation (probes, head metrics, ambiguity pairs,
  FLOPs, figures) on a freshly built model and a few images, into a temporary folder.
"""
from __future__ import annotations

import copy
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, is_count
from .distributed import DistInfo, any_rank
from .run_dir import RunDir

Evaluate = Callable[[nn.Module, DictConfig, Dataset, "Dataset | None", RunDir, torch.device], Any]


def forked_rng(device: torch.device):
    """The global CPU (and this CUDA device's) RNG state, restored on exit."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Run forward / backward passes of ``model`` inside; on exit its gradients are cleared and its buffers (e.g.
    batch-norm statistics) and the global RNG state are as they were on entry."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with forked_rng(next(model.parameters()).device):
        try:
            yield
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])


EVERY_IMAGE = ("probe_train_size", "probe_val_size")  # eval sizes whose null means every image


def preflight_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the evaluation's sizes cut to ``eval.preflight`` (each never above the run's own value; a value
    that is not a positive whole number, or null where null does not mean every image, is kept, so that the
    evaluation's own checks name it before step 1 instead of after the last), and
    ``eval.knn_k`` to the cut number of probe images; the FLOP count of the evaluation then runs on at most
    ``eval.preflight.probe_val_size`` images."""
    small = copy.deepcopy(cfg)
    for key, value in cfg.eval.preflight.items():
        mine = small.eval[key]
        if is_count(mine) or (mine is None and key in EVERY_IMAGE):
            small.eval[key] = value if mine is None else min(mine, value)
    small.trainer.batch_size = min(small.trainer.batch_size, cfg.eval.preflight.probe_val_size)
    if is_count(small.eval.knn_k):  # the run's k is checked against the run's own images (check_knn_bank)
        small.eval.knn_k = min(small.eval.knn_k, small.eval.probe_train_size)
    return small


def preflight_evaluation(
    evaluate: Evaluate, build: Callable[[], nn.Module], cfg: DictConfig, train_set: Dataset,
    val_set: Dataset | None, info: DistInfo,
) -> None:
    """Rank 0 runs ``evaluate`` end to end on a model from ``build`` with :func:`preflight_config`, in a
    temporary folder; every rank raises if it failed (collective under torchrun).

    The RNG state is restored afterwards, so training does not depend on whether this ran.

    Raises:
        ConfigError: the evaluation fails; the message carries the original error, raised
            before any training step instead of after the last one.
    """
    failure: Exception | None = None
    if info.is_main:
        device = info.device
        with forked_rng(device):
            try:
                with tempfile.TemporaryDirectory(prefix="preflight_") as tmp:
                    run = RunDir(tmp)
                    run.create()
                    evaluate(build().to(device), preflight_config(cfg), train_set, val_set, run, device)
            except Exception as e:  # noqa: BLE001 - any failure here would have ended the run after training
                failure = ConfigError(
                    f"this configuration would train and then fail in its evaluation; nothing was trained. "
                    f"{type(e).__name__}: {e}\nFix the keys it names (eval.*, predictor.*, data.*), or run with "
                    f"eval.enabled=false to train without evaluation."
                )
                failure.__cause__ = e
    if any_rank(failure is not None, info):
        raise failure or ConfigError("the evaluation preflight failed on rank 0; its error is in rank 0's log")


def params_without_gradient(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``model`` whose ``.grad`` is ``None`` after a backward pass."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def check_gradients(model: nn.Module, step: Callable[[], torch.Tensor], allow_unused: bool) -> None:
    """One forward / backward through ``step`` (which returns the loss); the model's state is left as it was.

    Gradients are cleared and buffers (e.g. batch-norm statistics) restored afterwards; the global
    RNG state too.

    Args:
        model: the unwrapped model (before DDP / FSDP).
        step: computes the training loss of one micro-batch.
        allow_unused: the model leaves parts out of some steps by design (modality dropout) and
            trains with DDP's ``find_unused_parameters``; only the forward / backward is checked.

    Raises:
        ConfigError: a trainable parameter receives no gradient; the message names it.
    """
    with state_kept(model):
        step().backward()
        unused = [] if allow_unused else params_without_gradient(model)
    if unused:
        shown = ", ".join(unused[:12]) + (f" and {len(unused) - 12} more" if len(unused) > 12 else "")
        raise ConfigError(
            f"{len(unused)} trainable parameter(s) receive no gradient from any loss of this configuration: "
            f"{shown}. Multi-process training (DDP) would stop at step 2 waiting for them; the model must not "
            f"build them, or freeze them, when no loss reads them."
        )
