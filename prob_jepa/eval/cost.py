"""Compute cost of a training step, measured (never derived from the config)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from jin.zoom import AdaptiveZoom

from ..distributed import DistInfo
from ..jepa import LevelJEPA
from ..preflight import state_kept
from ..recipes import recipe_of
from ..step import TrainingStep


def backward_flops(loss: Callable[[], torch.Tensor], model: torch.nn.Module) -> int:
    """FLOPs of ``loss()`` and its backward (``torch.utils.flop_counter``; a multiply-add is 2); ``model``'s
    gradients are cleared afterwards."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def micro_batch_flops(trainer, batch) -> int:
    """FLOPs of one micro-batch's forward + backward through ``trainer.forward_micro`` (any recipe)."""
    return backward_flops(lambda: trainer.forward_micro(batch, 0).loss, trainer.model)


def step_flops(cfg: DictConfig, model: nn.Module, batch: Any, steps: Sequence[int] = (0,),
               total_steps: int = 1) -> float:
    """Mean FLOPs of one training forward + backward of ``model`` over the draws of optimizer steps ``steps``.

    Each draw is what the run's recipe (``cfg.recipe``: its planner and loss terms) trains at that step, on
    ``batch`` (one batch as the data loader gives it: the global batch as one micro-batch of one process) — the
    image recipe's masks have the same token counts at every step; a hypermodal step's modalities (modality
    dropout) and tasks vary. ``total_steps`` places the steps in the curriculum. Counted by
    ``torch.utils.flop_counter`` (a multiply-add is 2) in training mode, fp32; the model's gradients are cleared,
    and its buffers (batch-norm statistics), mode and the global RNG left as they were.
    """
    recipe = recipe_of(cfg)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=next(model.parameters()).device)
    planner = recipe.planner(cfg, model, info, micro=len(batch[1]), accum=1, total_steps=total_steps)
    step = TrainingStep(model, recipe.build_terms(cfg, model))
    was_training = model.training
    model.train()
    try:
        with state_kept(model):
            flops = [backward_flops(lambda: step(**planner(batch, s, 0)).loss, model) for s in steps]
    finally:
        model.train(was_training)
    return sum(flops) / len(flops)


def first_batch(dataset: Dataset, batch_size: int) -> Any:
    """The first ``batch_size`` items of ``dataset`` collated as the training loader does (``(inputs, labels)``)."""
    return next(iter(DataLoader(dataset, batch_size=batch_size)))


def training_cost(records: Sequence[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """Median step time and peak memory over the logged steps (the first log window includes warm-up)."""
    steady = [r for r in records[1:] if r.get("images_per_s")] or list(records)
    ips = statistics.median(r["images_per_s"] for r in steady)
    return {
        "train_ms_per_step": 1e3 * batch_size / ips,
        "train_images_per_s": ips,
        "peak_memory_mb": max(r["memory_mb"] for r in records),
    }


def matmul_peak_flops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """The device's measured dense-matmul throughput (FLOP/s): fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 * repeats / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        tic = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return times


def level_report(model: LevelJEPA, image_size: int, count_flops: bool = True) -> list[dict[str, Any]]:
    """Parameters and forward FLOPs (one full image) of every encoder level, the predictor and the heads."""
    enc = model.context_encoder
    counter = FlopCounterMode(display=False)
    if count_flops:
        with counter, torch.no_grad():
            enc(torch.zeros(1, 3, image_size, image_size, device=next(enc.parameters()).device))
    flops = counter.get_flop_counts()

    def module_flops(name: str) -> int:  # a module's count includes its children's
        return sum(flops.get(name, {}).values())

    def params(module: torch.nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    rows = []
    for l, stage in enumerate(enc.stages):
        side = enc.grid // 2**l
        merge = enc.merges[l - 1] if l > 0 else enc.patch_embed
        rows.append({
            "part": f"level {l}", "tokens": f"{side}×{side}", "dim": enc.dims[l], "depth": len(stage.blocks),
            "params": params(stage) + params(merge) + params(enc.norms[l]),
            "gflops": (module_flops(f"HierarchicalEncoder.stages.{l}") + module_flops(
                f"HierarchicalEncoder.merges.{l - 1}" if l else "HierarchicalEncoder.patch_embed")) / 1e9
            if count_flops else None,
        })
    if isinstance(enc.zoom, AdaptiveZoom):
        rows.append({"part": "zoom", "tokens": "", "dim": enc.dims[0], "depth": "", "params": params(enc.zoom),
                     "gflops": module_flops("HierarchicalEncoder.zoom") / 1e9 if count_flops else None})
    rows.append({"part": "encoder total", "tokens": "", "dim": "", "depth": "", "params": params(enc),
                 "gflops": counter.get_total_flops() / 1e9 if count_flops else None})
    rows.append({"part": "predictor trunk", "tokens": "", "dim": model.predictor.dim,
                 "depth": len(model.predictor.stage.blocks), "params": params(model.predictor), "gflops": None})
    rows.append({"part": "heads", "tokens": "", "dim": "", "depth": "", "params": params(model.heads), "gflops": None})
    rows.append({"part": "cross-scale", "tokens": "", "dim": "", "depth": "", "params": params(model.cross_scale),
                 "gflops": None})
    return rows


def moe_vs_dense(dim: int, hidden: int, num_experts: int, top_k: int, tokens: int, steps: int = 10,
                 warmup: int = 3) -> dict[str, Any]:
    """Forward + backward time of a top-k mixture of experts against the dense MLP with as many active parameters.

    The mixture is ``MoEMLP(dim, hidden // top_k, num_experts, top_k)``: each token
    runs ``top_k`` experts of width ``hidden // top_k``, as many matmul FLOPs as the
    dense ``timm.layers.Mlp(dim, hidden)`` (two layers, GELU), plus routing. Both
    run on the same ``x [tokens, dim]`` fp32 CPU input (requiring grad, as inside a
    network) at the current ``torch.get_num_threads()``; weights are seeded, the
    global RNG is left as it was.

    Returns:
        ``moe_ms``, ``dense_ms``: median milliseconds of one forward + backward over
        ``steps`` calls after ``warmup``; ``moe_vs_dense_throughput``: ``dense_ms /
        moe_ms`` (tokens/s of the mixture relative to dense, > 1 when faster);
        ``moe_active_params`` and ``dense_params``: parameters a token uses (router
        included); ``moe_load_max``: the busiest expert's share of the ``tokens ·
        top_k`` assignments (``1 / num_experts`` when balanced).
    """
    from timm.layers import Mlp

    from jin.layers import MoEMLP

    device = torch.device("cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        moe = MoEMLP(dim, hidden // top_k, num_experts, top_k)
        dense = Mlp(dim, hidden)
        x = torch.randn(tokens, dim, requires_grad=True)

    def step(layer: torch.nn.Module, out: torch.Tensor) -> None:
        out.sum().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    moe_s = statistics.median(time_steps(lambda: step(moe, moe(x)[0]), steps, warmup, device))
    dense_s = statistics.median(time_steps(lambda: step(dense, dense(x)), steps, warmup, device))
    expert = moe.w1[0].numel() + moe.b1[0].numel() + moe.w2[0].numel() + moe.b2[0].numel()
    with torch.no_grad():
        load = moe(x)[1].load
    return {
        "moe_ms": 1e3 * moe_s,
        "dense_ms": 1e3 * dense_s,
        "moe_vs_dense_throughput": dense_s / moe_s,
        "moe_active_params": top_k * expert + sum(p.numel() for p in moe.gates.parameters()),
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "moe_load_max": load.max().item(),
    }
