"""Pre-training: ``pretrain(cfg, train_set=None, val_set=None, run_dir=None)``."""
from __future__ import annotations

import resource
import signal
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, is_count, is_finite_number
from .data import GlobalBatchSampler, SeededDataset, build_datasets, seed_for
from .distributed import (
    STRATEGIES, DistInfo, any_rank, barrier, gradient_sync, init_distributed, mean_over_ranks, settle, wrap_model,
)
from .eval import check_knn_bank, evaluation_sets
from .eval.diagnostics import effective_rank, feature_std
from .eval.probe_curve import ProbeCurve, probe_curve
from .heads import Head
from .jepa import legacy_names
from .masks import complete_mask_specs
from .preflight import check_gradients, preflight_evaluation
from .recipes import recipe_of
from .run_dir import RunDir, with_added_keys
from .schedules import Schedules
from .step import StepOutput, TrainingStep


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept untouched."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    step: int
    status: str  # "completed" | "stopped" (trainer.max_steps) | "interrupted" (signal)


class StopSignal:
    """SIGINT / SIGTERM request a checkpoint and a clean stop; a second SIGINT aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def param_groups(model: nn.Module, head_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices only; biases, norms, embeddings and scalars are exempt (I-JEPA). With
    ``head_lr_scale ≠ 1`` the heads' parameters (every :class:`~prob_jepa.heads.Head` in ``model``) form groups of
    their own whose learning rate is ``head_lr_scale`` times the schedule's (their ``lr_scale``; at 1 the groups are
    the two of before, so optimizer states load as they did). A head's held parameters
    (:meth:`~prob_jepa.heads.Head.held_parameters`) form groups with its ``hold_steps``: learning rate 0 before that
    optimizer step (:meth:`Trainer.train_step`).

    Raises:
        ConfigError: ``head_lr_scale`` (``optim.head_lr_scale``) is not a finite positive number.
    """
    if not (is_finite_number(head_lr_scale) and head_lr_scale > 0):
        raise ConfigError(f"optim.head_lr_scale={head_lr_scale!r} must be a finite number > 0 (the heads' learning "
                          f"rate is this times the schedule's)")
    heads = [m for m in model.modules() if isinstance(m, Head)]
    scale = {id(p): head_lr_scale for h in heads for p in h.parameters()}
    hold = {id(p): h.hold_steps for h in heads for p in h.held_parameters()}
    kinds: dict[tuple[float, int], list[nn.Parameter]] = defaultdict(list)
    for p in model.parameters():
        if p.requires_grad:
            kinds[scale.get(id(p), 1.0), hold.get(id(p), 0)].append(p)
    groups = []
    for (lr_scale, hold_steps), params in sorted(kinds.items(), key=lambda kind: (kind[0][0] != 1.0, kind[0][1])):
        options = {"lr_scale": lr_scale, **({"hold_steps": hold_steps} if hold_steps else {})}
        groups += [{"params": [p for p in params if p.ndim >= 2], **options},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "exempt": True, **options}]
    return groups


def accumulation(global_batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch, accumulation steps) with ``global = world × micro × accum``.

    Raises:
        ConfigError: ``trainer.batch_size`` is not ``world size × trainer.micro_batch_size × a whole number``.
    """
    micro = micro_batch or global_batch // world_size
    accum = global_batch // (world_size * micro) if micro else 0
    if accum < 1 or world_size * micro * accum != global_batch:
        raise ConfigError(
            f"trainer.batch_size={global_batch} must be world size {world_size} × trainer.micro_batch_size "
            f"{micro_batch} × a whole number of accumulation steps"
        )
    return micro, accum


PRECISIONS = ("auto", "fp32", "bf16")


def check_trainer(tc: DictConfig) -> None:
    """Raise :class:`ConfigError` for a batch size, logging / checkpoint interval or ``max_steps`` that the loop
    cannot use, a precision or distributed strategy it does not know, a clipping norm that is not a finite positive
    number, or a ``trainer.compile_backend`` that ``torch.compile`` does not have."""
    for key, what in (("batch_size", "images"), ("log_every", "steps"), ("checkpoint_every", "steps")):
        if not is_count(tc.get(key)):
            raise ConfigError(f"trainer.{key}={tc.get(key)!r} must be a positive number of {what}")
    for key, what in (("max_steps", "optimizer steps to stop at"), ("micro_batch_size", "images per forward")):
        if tc[key] is not None and not is_count(tc[key]):
            raise ConfigError(f"trainer.{key}={tc[key]!r} must be a positive number of {what}, or null")
    if tc.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={tc.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if tc.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={tc.precision!r}; valid: {', '.join(PRECISIONS)}")
    if not (is_finite_number(tc.clip_grad) and tc.clip_grad > 0):
        raise ConfigError(f"trainer.clip_grad={tc.clip_grad!r} must be a finite gradient norm > 0")
    if tc.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if tc.compile_backend not in backends:
            raise ConfigError(f"trainer.compile_backend={tc.compile_backend!r}; valid: {', '.join(backends)}")


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a run of ``epochs`` (fractional epochs allowed: 1.5 → one and a half epochs, rounded).

    Raises:
        ConfigError: ``trainer.epochs`` gives no step.
    """
    steps = int(round(float(epochs) * steps_per_epoch))
    if steps < 1:
        raise ConfigError(
            f"trainer.epochs={epochs} gives {steps} optimizer steps at {steps_per_epoch} steps per epoch; "
            f"it must give at least one"
        )
    return steps


def collapse_diagnostics(targets: dict[str, torch.Tensor], rows: int = 2048) -> dict[str, float]:
    """``feature_std`` and ``effective_rank`` of the first ``rows`` target features ``[..., D]`` of each name in
    ``targets`` (a collapsed representation has both near 0 / 1): by name (``feature_std/<name>``) when there are
    several (modalities), and their mean without a name."""
    values = {name: t.flatten(0, -2)[:rows] for name, t in targets.items()}
    per_name = {name: {"feature_std": feature_std(v), "effective_rank": effective_rank(v)}
                for name, v in values.items()}
    out = {key: sum(d[key] for d in per_name.values()) / len(per_name) for key in ("feature_std", "effective_rank")}
    if len(per_name) > 1:
        out.update({f"{key}/{name}": d[key] for name, d in per_name.items() for key in d})
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """Owns the model, optimizer, data order and schedules of one run; :meth:`fit` trains.

    What the model family brings is its :class:`~prob_jepa.recipes.Recipe` (``cfg.recipe``): the model, the
    planner that draws each micro-batch's inputs (masks, tasks), and the loss terms. A step
    (:meth:`train_step`) runs :class:`~prob_jepa.step.TrainingStep` — the model's predictions, then
    ``Σ weight · term`` over the recipe's terms (:func:`~prob_jepa.step.total_loss`) — on each micro-batch,
    clips, steps AdamW and moves the EMA target encoder.

    Before step 1 the constructor draws ahead what the planner must (a mask configuration that some step cannot
    satisfy fails there) and runs one forward / backward of the real step
    (:func:`~prob_jepa.preflight.check_gradients`): a configuration whose losses leave a trainable parameter
    without gradient fails there, naming it.
    """

    def __init__(self, cfg: DictConfig, info: DistInfo, run: RunDir, train_set: Dataset):
        self.cfg, self.info, self.run = cfg, info, run
        tc = cfg.trainer
        check_trainer(tc)
        self.recipe = recipe_of(cfg)
        if info.distributed and tc.strategy not in self.recipe.strategies:
            raise ConfigError(f"trainer.strategy={tc.strategy!r}: recipe={cfg.recipe} trains with "
                              f"{' | '.join(self.recipe.strategies)}")
        self.micro, self.accum = accumulation(tc.batch_size, tc.micro_batch_size, info.world_size)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(info.device)
        if tc.grad_checkpointing:
            self.model.set_grad_checkpointing()

        self.sampler = GlobalBatchSampler(len(train_set), tc.batch_size, info.rank, info.world_size, self.accum, cfg.seed)
        self.loader = DataLoader(
            SeededDataset(train_set),
            batch_sampler=self.sampler,
            num_workers=tc.num_workers,
            pin_memory=info.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # never draws from the training RNG
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = total_steps(tc.epochs, self.steps_per_epoch)
        self.schedules = Schedules.from_config(cfg.optim, self.total_steps, self.steps_per_epoch)
        self.step = 0
        self.nonfinite_step = torch.zeros((), dtype=torch.long, device=info.device)  # first bad step; 0: none
        self.nonfinite_terms: dict[str, torch.Tensor] = {}  # the loss terms of that step
        self.last_targets: dict[str, torch.Tensor] = {}
        if tc.precision == "bf16" and info.device.type != "cuda":
            raise ConfigError(f"trainer.precision=bf16 on {info.device.type}: bf16 autocast is for CUDA only (CPU bf16 "
                              f"matmuls run hundreds of times slower than fp32); use auto or fp32")
        bf16 = tc.precision == "bf16" or (tc.precision == "auto" and info.device.type == "cuda")
        self.autocast = lambda: torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16)

        self.planner = self.recipe.planner(cfg, self.model, info, micro=self.micro, accum=self.accum,
                                           total_steps=self.total_steps)
        self.planner.check()
        self.training_step = TrainingStep(self.model, self.recipe.build_terms(cfg, self.model))
        partial = not self.recipe.every_step_trains_every_parameter
        self.net: nn.Module = self.training_step  # the preflight step runs the bare model, before DDP / FSDP hooks
        check_gradients(self.model, lambda: self.forward_micro(next(iter(self.loader)), 0).loss, partial)
        # DDP / FSDP (or the step itself); FSDP replaces the parameters with sharded ones
        self.wrapped = wrap_model(self.training_step, info, tc.strategy, find_unused_parameters=partial)
        # fused: one kernel for every parameter's update (CPU and CUDA); same state dict as the for-each AdamW
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.head_lr_scale), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            fused=True,
        )
        held = max((g["hold_steps"] for g in self.optimizer.param_groups if "hold_steps" in g), default=0)
        if held >= self.total_steps:
            warnings.warn(f"predictor.hold_steps={held} >= the schedule's {self.total_steps} optimizer steps: the "
                          f"head's held parameters (a flow's coupling layers) stay at their initial values for the "
                          f"whole run", stacklevel=2)
        # A parameter that has had no gradient yet (a modality left out of every step so far) has no AdamW state.
        self.optimizer_load_options = StateDictOptions(full_state_dict=True, strict=not partial)
        # The image recipe's token counts are static per run (MaskCollator), so one graph serves every step.
        self.net = torch.compile(self.wrapped, backend=tc.compile_backend) if tc.compile else self.wrapped

    def build_model(self) -> nn.Module:
        return self.recipe.build_model(self.cfg)

    def forward_micro(self, batch, m: int) -> StepOutput:
        """Loss of micro-batch ``m`` of the current step: the planner's inputs, then the training step under
        autocast."""
        inputs = self.planner(batch, self.step, m)
        with self.autocast():
            return self.net(**inputs)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded, CPU) state; collective under FSDP, so every rank calls it."""
        return {
            "model": get_model_state_dict(self.model, options=FULL_STATE),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE),
            "step": self.step,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self) -> None:
        state = self.state_dict()
        if self.info.is_main:
            save_checkpoint(self.run.checkpoint, state)
        barrier(self.info)

    def full_model(self) -> nn.Module | None:
        """The trained model, whole, for evaluation on rank 0 (gathered from FSDP shards when sharded).

        Collective under FSDP (every rank calls it); ranks other than 0 get ``None`` — with
        ``cpu_offload`` only rank 0 receives the full state.
        """
        if self.cfg.trainer.strategy != "fsdp" or not self.info.distributed:
            return self.model
        state = get_model_state_dict(self.model, options=FULL_STATE)
        if not self.info.is_main:
            return None
        model = self.build_model()
        model.load_state_dict(state)
        return model.to(self.info.device)

    def resume(self) -> None:
        """Continue from ``checkpoints/last.pt`` when it exists (``trainer.resume=true``); without one, start afresh
        (the records of an attempt that stopped before its first checkpoint are dropped)."""
        if not self.run.checkpoint.exists():
            if self.info.is_main and self.run.metrics.exists():
                self.run.truncate_metrics(-1)
            return
        state = load_checkpoint(self.run.checkpoint)
        # a checkpoint of an earlier layout (an image run of before the one model, a level predictor of its own): its
        # names are renamed here, before the state is sharded by name (FSDP)
        renamed = legacy_names(self.model, state["model"])
        if renamed:
            state["model"] = {renamed.get(k, k): v for k, v in state["model"].items()}
            optimizer = state["optimizer"]
            optimizer["state"] = {renamed.get(k, k): v for k, v in optimizer["state"].items()}
            for group in optimizer["param_groups"]:
                group["params"] = [renamed.get(k, k) for k in group["params"]]
        load = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.model, state["model"], options=load)
        except RuntimeError as e:
            raise RuntimeError(
                f"{self.run.checkpoint} was written by a different model configuration; resume it with the "
                f"config saved in {self.run.config}, or choose another run directory.\n{e}"
            ) from e
        unknown = sorted(set(state["optimizer"]["state"]) - {name for name, _ in self.model.named_parameters()})
        if unknown:  # a non-strict load would drop their moments without a word
            raise RuntimeError(
                f"{self.run.checkpoint} holds optimizer state for {len(unknown)} parameter(s) this model does not have "
                f"({', '.join(unknown[:4])}{', …' if len(unknown) > 4 else ''}): it was written by another version "
                f"of the model (e.g. a one-modality hypermodal run at its levels before it dropped its shared space). "
                f"Evaluate it with experiments/evaluate.py, or choose another run directory to train afresh."
            )
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=self.optimizer_load_options)
        self.step = int(state["step"])
        if self.info.is_main:
            self.run.truncate_metrics(self.step)

    # ----------------------------------------------------------------- step
    def batches(self, stop_at: int) -> Iterator[list]:
        """Micro-batch groups (one per optimizer step) from ``self.step`` to ``stop_at``."""
        while self.step < stop_at:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.sampler.start_at(offset)
            it = iter(self.loader)
            for _ in range(offset, min(self.steps_per_epoch, offset + stop_at - self.step)):
                yield [next(it) for _ in range(self.accum)]

    def train_step(self, micro_batches: list) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accum`` micro-batches; returns the averaged loss terms."""
        lr, wd, momentum = self.schedules(self.step)
        for group in self.optimizer.param_groups:
            # optimizer states saved before head_lr_scale lack it; a held group learns from its hold_steps-th step
            group["lr"] = lr * group.get("lr_scale", 1.0) if self.step >= group.get("hold_steps", 0) else 0.0
            if not group.get("exempt"):
                group["weight_decay"] = wd
        torch.manual_seed(seed_for(self.cfg.seed, self.info.rank, self.step))  # dropout / drop-path
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = defaultdict(float)
        for m, batch in enumerate(micro_batches):
            # Step 1. masks, forward target and context, loss
            with gradient_sync(self.wrapped, self.info, enabled=m == self.accum - 1):
                out = self.forward_micro(batch, m)
                self.watch_loss(out)
                (out.loss / self.accum).backward()
            for k, v in out.terms.items():
                terms[k] = terms[k] + v.detach() / self.accum
        # Step 2. clip and optimizer step
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.clip_grad)
        terms["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        self.optimizer.step()
        # Step 3. momentum update of the target encoder
        self.model.update_target(momentum)
        self.last_targets = out.targets
        terms.update(lr=torch.tensor(lr), weight_decay=torch.tensor(wd), ema=torch.tensor(momentum))
        return terms

    def watch_loss(self, out: StepOutput) -> None:
        """Remember, on the device, the first step whose loss is not finite and its loss terms (no host sync:
        :meth:`check_finite` reads them at logging and checkpoint steps)."""
        first = ~torch.isfinite(out.loss.detach()) & (self.nonfinite_step == 0)
        self.nonfinite_step = torch.where(first, self.step + 1, self.nonfinite_step)
        for name, value in out.terms.items():  # terms may come and go (a curriculum): kept by name
            value = value.detach().float()
            previous = self.nonfinite_terms.get(name, torch.full_like(value, float("nan")))
            self.nonfinite_terms[name] = torch.where(first, value, previous)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if some step since the start had a non-finite loss on any rank
        (one host sync; called before anything is logged or saved, so the last good checkpoint stays)."""
        step = self.nonfinite_step.clone()
        if self.info.distributed:
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
        if int(step):
            terms = {name: float(value) for name, value in self.nonfinite_terms.items()}
            raise NonFiniteLossError(
                f"loss became non-finite at step {int(step)} (terms: {terms}); the last good checkpoint "
                f"{self.run.checkpoint} is kept. Lower optim.lr or raise trainer.clip_grad."
            )

    def probe(self, curve: ProbeCurve) -> dict[str, float]:
        """``curve``'s point for the current weights (``linear_probe``, ``knn``) on rank 0; ``{}`` on the others.
        Collective under FSDP (every rank calls it)."""
        model = self.full_model()
        return curve(self.recipe.frozen_features(model)) if model is not None and self.info.is_main else {}

    def record(self, terms: dict[str, torch.Tensor], images_per_s: float) -> dict[str, Any]:
        """A ``metrics.jsonl`` line: loss terms averaged over the ranks that have them (matched by name), throughput,
        memory, collapse diagnostics."""
        rec = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        rec.update(mean_over_ranks(terms, self.info))
        rec.update(images_per_s=images_per_s, memory_mb=peak_memory_mb(self.info.device))
        rec.update(collapse_diagnostics(self.last_targets))
        return rec

    # ------------------------------------------------------------------ fit
    def fit(self, curve: ProbeCurve | None = None) -> str:
        """Train until the schedule ends or ``trainer.max_steps``; returns the status. With ``curve``, its points at
        step 0 (a run that starts afresh), every ``curve.every`` steps and the schedule's last step join
        ``metrics.jsonl`` (a run stopped early by ``trainer.max_steps`` or a signal and resumed draws the curve of a
        run that was not)."""
        tc = self.cfg.trainer
        stop_at = min(self.total_steps, tc.max_steps if tc.max_steps is not None else self.total_steps)
        if curve is not None and self.step == 0:
            point = self.probe(curve)
            if self.info.is_main:
                self.run.log({"step": 0, "epoch": 0.0, **point})
        self.net.train()
        bar = tqdm(total=stop_at, initial=self.step, desc="pretrain", disable=not (self.info.is_main and tc.progress))
        tic, seen, status = time.perf_counter(), 0, "completed" if stop_at == self.total_steps else "stopped"
        with StopSignal() as stop:
            for micro_batches in self.batches(stop_at):
                terms = self.train_step(micro_batches)
                self.step += 1
                seen += tc.batch_size
                bar.update(1)
                probe = curve is not None and (curve.due(self.step) or self.step == self.total_steps)
                log = self.step % tc.log_every == 0 or self.step == stop_at or probe
                save = self.step % tc.checkpoint_every == 0
                # ranks agree on a stop at logging / checkpoint steps only: the collective is a host sync
                interrupted = any_rank(stop.requested, self.info) if log or save or not self.info.distributed else False
                if log or save or interrupted:  # before anything is logged or saved
                    self.check_finite()
                if log:
                    rec = self.record(terms, seen / (time.perf_counter() - tic))
                    if probe:
                        rec.update(self.probe(curve))
                    if self.info.is_main:
                        self.run.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                    tic, seen = time.perf_counter(), 0
                if interrupted:
                    status = "interrupted"
                    break
                if save:
                    self.save()
        bar.close()
        self.check_finite()
        self.save()
        return status


RUN_CONTROL = ("trainer.max_steps", "trainer.progress", "trainer.log_every", "trainer.checkpoint_every",
               "trainer.resume", "trainer.num_workers", "trainer.device", "eval.")  # may change when a run resumes


def check_resumable(run: RunDir, cfg: DictConfig) -> None:
    """A run directory holding a checkpoint continues only with ``trainer.resume=true`` and the config it was trained
    with (up to :data:`RUN_CONTROL` keys), so ``config.yaml`` stays exactly what was trained. Without a
    ``config.yaml`` (removed, or the directory deleted while its run was saving on SIGTERM), the checkpoint's own
    config is the one it was trained with.

    Raises:
        FileExistsError: a checkpoint exists and ``trainer.resume=false``.
        ConfigError: the config differs from the saved one in keys that change training; the message lists them.
    """
    if not run.checkpoint.exists():
        return
    if not cfg.trainer.resume:
        raise FileExistsError(
            f"{run.checkpoint} exists and trainer.resume=false: nothing is overwritten. "
            f"Pass trainer.resume=true to continue it, or choose another run directory."
        )
    if run.config.exists():
        trained = run.load_config()
    else:
        stored = load_checkpoint(run.checkpoint).get("config")
        if stored is None:  # nothing says what it was trained with
            return
        trained = with_added_keys(OmegaConf.create(stored))
    saved = flat_keys(OmegaConf.to_container(trained, resolve=True))
    now = flat_keys(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k) and not k.startswith(RUN_CONTROL))
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:10])
        raise ConfigError(
            f"{run.path} was trained with another configuration ({len(changed)} key(s) differ: {shown}). "
            f"Resume it with the config in {run.config}, or choose another run directory (hydra.run.dir=)."
        )


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` → ``{"a.b": 1, "c.0.d": 2}``; other lists and scalars are values."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, child in tree.items() for k, v in flat_keys(child, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):  # a list of mask specs
        return {k: v for i, child in enumerate(tree) for k, v in flat_keys(child, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def pretrain(
    cfg: DictConfig, train_set: Dataset | None = None, val_set: Dataset | None = None, run_dir: str | Path | None = None
) -> TrainResult:
    """Pre-train the JEPA of ``cfg.recipe`` as configured, then evaluate it.

    Args:
        cfg: the composed config (``experiments/conf``).
        train_set, val_set: map-style datasets of ``(image [3, H, W], int label)``
            replacing ``cfg.data``; without ``val_set`` the probes split ``train_set`` and the head's held-out
            metrics read its held-out fifth — images the JEPA itself trained on (pass a ``val_set`` of other images
            for numbers on unseen ones).
        run_dir: where to write; default ``runs/<date>_<time>``.
    Returns:
        :class:`TrainResult` with the run directory and the evaluation metrics.
    """
    recipe = recipe_of(cfg)  # a recipe without the nodes it reads fails before anything is written
    complete_mask_specs(cfg)  # config.yaml holds every option of every mask spec it trains with
    info = init_distributed(cfg.trainer.device)
    check_trainer(cfg.trainer)  # before anything is written (the trainer checks again, for its other callers)
    if not is_count(cfg.seed, low=0):
        raise ConfigError(f"seed={cfg.seed!r} must be a whole number >= 0 (it seeds the weights and every mask draw)")
    accumulation(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, info.world_size)
    run = RunDir(run_dir if run_dir is not None else Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    probe_set = train_set
    if train_set is None:
        train_set, default_val, probe_set = build_datasets(cfg.data, ("train", "val", "train_eval"))
        val_set = default_val if val_set is None else val_set
    if cfg.eval.enabled:  # the preflight evaluates on fewer images: the run's own sizes and k-NN bank are checked here
        check_knn_bank(cfg.eval, evaluation_sets(probe_set, val_set, cfg.eval)[0])
    curve = probe_curve(cfg, recipe.frozen_features, probe_set, val_set, info.device)
    check_resumable(run, cfg)  # before config.yaml is written: a refused resume leaves the run as it was
    if info.is_main:
        run.create()
        run.save_config(cfg)
    barrier(info)

    trainer = Trainer(cfg, info, run, train_set)  # builds the model and checks its gradients
    evaluate = trainer.recipe.evaluate()
    if cfg.eval.enabled:
        preflight_evaluation(evaluate, trainer.build_model, cfg, probe_set, val_set, info)
    trainer.resume()
    status = trainer.fit(curve)

    metrics: dict[str, Any] = {}
    if status != "interrupted" and cfg.eval.enabled:
        model = trainer.full_model()
        if info.is_main:
            metrics = evaluate(model, cfg, probe_set, val_set, run, info.device)
    settle(info)
    return TrainResult(run.path, metrics, trainer.step, status)
