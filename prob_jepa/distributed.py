"""Process-group set-up and tear-down, and model wrapping: DDP or FSDP only when ``WORLD_SIZE > 1`` (torchrun)."""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from jin.encoders import HierarchicalModalityEncoder
from jin.layers import Stage

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of ``trainer.device`` (``auto``: CUDA when there is one; ``cuda``: this rank's GPU).

    Raises:
        ConfigError: ``cuda`` without a CUDA device, or a name torch has no device for.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"trainer.device={name!r}; valid: auto, cpu, cuda") from e


def init_distributed(device: str) -> DistInfo:
    """Read torchrun's environment; initialize the process group only when there are several ranks.

    Each call starts a run that has not :func:`settled <settle>`. A group this function initializes is destroyed
    when the process exits if its last run settled; otherwise it is left to the interpreter's finalization.
    """
    global _settled
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_destroy_if_settled)
    _settled = False
    return DistInfo(rank, world, local_rank, dev)


# Whether every rank has finished every collective of this process's last run (see settle).
_settled = False


def settle(info: DistInfo) -> None:
    """The barrier that ends a run: past it no rank has a collective pending, so the process group
    :func:`init_distributed` made is destroyed when the process exits.

    Why both halves: a Gloo group left to the interpreter's finalization can abort a rank that has finished
    (SIGABRT, "terminate called without an active exception", pytorch/pytorch#190489: 3 of 60 two-rank exits
    measured) and torchrun then fails the run; but destroying a group waits for the rank's pending work, so a rank
    that leaves a run by an exception, its peers waiting in another collective, would hang instead of exiting.
    Re-initializing a destroyed group under torchrun failed 7 of 10 times, so the group lives as long as the
    process (a multirun's jobs share it).
    """
    global _settled
    barrier(info)
    _settled = True


def _destroy_if_settled() -> None:
    if _settled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if ``flag`` is true on any rank (e.g. a stop signal seen by one process)."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: Mapping[str, torch.Tensor | float], info: DistInfo) -> dict[str, float]:
    """Each name's mean over the ranks that report it, matched by name (ranks may report different names, e.g.
    a task that one rank's modality dropout left out): every rank gets every name. Collective: every rank calls
    it; one host sync.
    """
    names = list(values)
    if info.distributed:
        every: list[list[str] | None] = [None] * info.world_size
        dist.all_gather_object(every, names)
        names = list(dict.fromkeys(k for rank_names in every for k in rank_names))
    sums = torch.stack([torch.as_tensor(values.get(k, 0.0), dtype=torch.float32, device=info.device) for k in names])
    counts = torch.tensor([float(k in values) for k in names], device=info.device)
    both = torch.stack([sums, counts])
    if info.distributed:
        dist.all_reduce(both)
    return dict(zip(names, (both[0] / both[1]).tolist()))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


STRATEGIES = ("ddp", "fsdp")


def wrap_model(step: nn.Module, info: DistInfo, strategy: str, find_unused_parameters: bool = False) -> nn.Module:
    """The module to call for training: the training step (:class:`~prob_jepa.step.TrainingStep`, holding
    ``step.model``) itself on one process; DDP or FSDP2 of it under torchrun.

    ``find_unused_parameters`` lets DDP finish a step in which some parameters got no gradient.

    FSDP shards every transformer block (of every :class:`~jin.layers.Stage`: the encoders', the predictors'),
    then each modality's encoder (context and target; of a hierarchical one its backbone) and the whole step (heads
    and loss terms run inside its forward); the EMA update then runs shard by shard, so the target encoder stays
    consistent across ranks.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not info.distributed:
        return step
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids, find_unused_parameters=find_unused_parameters)
    from torch.distributed.fsdp import fully_shard

    model = step.model
    for stage in [m for m in model.modules() if isinstance(m, Stage)]:
        for block in stage.blocks:
            fully_shard(block)
    for encoder in (model.context_encoder, model.target_encoder):  # the step calls each modality's encoder
        for name in encoder.modalities:
            modality = encoder.encoder(name)
            # JIN's hierarchy: its HierarchicalEncoder (whose outputs are no views: FSDP hooks them for backward)
            fully_shard(modality.backbone if isinstance(modality, HierarchicalModalityEncoder) else modality)
    fully_shard(step)
    return step


@contextlib.contextmanager
def gradient_sync(net: nn.Module, info: DistInfo, enabled: bool):
    """All-reduce gradients only on the last micro-batch of a step (DDP ``no_sync`` / FSDP2 equivalent)."""
    if not info.distributed or enabled:
        if hasattr(net, "set_requires_gradient_sync"):
            net.set_requires_gradient_sync(True)
        yield
    elif isinstance(net, nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
    else:
        net.set_requires_gradient_sync(False)
        yield
