"""Training-step speed, memory, FLOPs and MFU of a configuration; compiled against eager; MoE against dense;
adaptive computation's measured FLOPs.

    python experiments/bench.py [Hydra overrides] [--heads all|mdn,flow] [--steps 10] [--out bench.json]
    python experiments/bench.py --no-compile            # eager only (compiling takes minutes on a CPU)
    python experiments/bench.py model=jin_b --report      # parameters and FLOPs per level of a preset
    python experiments/bench.py --presets                 # every model preset: measured and claimed parameters

Each head is measured in its own process (peak memory is per process), eager and then ``torch.compile``d
(``trainer.compile_backend``), on a synthetic batch of ``trainer.batch_size`` images (paired scenes for
``experiment=hypermodal_*``) through the real training step (masks, forward, backward, clip, AdamW, EMA):
median of ``--steps`` steps after ``--warmup``; the compiled row also gives the first step's time (compilation),
the graphs compiled and the graph breaks (``torch._dynamo``'s counters). MFU = measured FLOPs per step /
step time / the device's measured matmul peak (fp32 on CPU, bf16 on CUDA).

Then, for image models: the FLOPs of one training step measured with ``torch.utils.flop_counter`` for the
configuration and for ``model.adaptive=false`` (what adaptive computation saves), and one mixture-of-experts
MLP (``--experts``, top-2) against the dense MLP with as many active parameters, at the predictor trunk's width
and token count (:func:`prob_jepa.eval.cost.moe_vs_dense`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from jin.layers import MoEMLP  # noqa: E402
from prob_jepa.config import compose_config, group_options  # noqa: E402
from prob_jepa.distributed import DistInfo, resolve_device  # noqa: E402
from prob_jepa.eval.cost import (  # noqa: E402
    level_report, matmul_peak_flops, micro_batch_flops, moe_vs_dense, time_steps,
)
from prob_jepa.eval.summary import markdown_table, model_label  # noqa: E402
from prob_jepa.masks import build_mask_specs  # noqa: E402
from prob_jepa.model import build_model  # noqa: E402
from prob_jepa.run_dir import RunDir  # noqa: E402
from prob_jepa.train import Trainer, peak_memory_mb  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"
HEADS = group_options(CONF, "predictor")


def synthetic_data(cfg) -> torch.utils.data.Dataset:
    """One global batch of the configured data's kind: paired scenes in every modality (``data=paired_shapes``),
    else random images."""
    n = cfg.trainer.batch_size
    if cfg.data.name == "paired_shapes":
        from prob_jepa.data.multimodal import MultimodalSpec, PairedShapes
        from prob_jepa.data.shapes import Scene

        d = cfg.data
        return PairedShapes(n, 0, Scene.from_config(d.scene), MultimodalSpec.from_config(d), d.modalities)
    size = cfg.data.image_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(images, torch.zeros(n, dtype=torch.long))


def build_trainer(cfg, tmp: str):
    """The configuration's trainer on :func:`synthetic_data`, and its micro-batches of one step."""
    info = DistInfo(0, 1, 0, resolve_device(cfg.trainer.device))
    data = synthetic_data(cfg)
    trainer = Trainer(cfg, info, RunDir(tmp), data)
    micro = trainer.micro
    batches = [default_collate([data[j] for j in range(i * micro, (i + 1) * micro)]) for i in range(trainer.accum)]
    return trainer, batches


def measure(overrides: list[str], steps: int, warmup: int, compiled: bool) -> dict:
    """One configuration's training step, in this process (``compiled``: through ``torch.compile``)."""
    cfg = compose_config(CONF, overrides + [f"trainer.compile={str(compiled).lower()}"])
    device = resolve_device(cfg.trainer.device)
    torch._dynamo.reset()  # graphs and counters of this step only
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batches = build_trainer(cfg, tmp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counters.clear()
        first = time_steps(lambda: trainer.train_step(batches), 1, 0, device)[0]  # compiles when compiled
        times = time_steps(lambda: trainer.train_step(batches), steps, max(0, warmup - 1), device)
        graph_breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
        flops = micro_batch_flops(trainer, batches[0]) * trainer.accum
        experts = max((m.num_experts for m in trainer.model.modules() if isinstance(m, MoEMLP)), default=0)
    step_s = statistics.median(times)
    peak = matmul_peak_flops(device)
    n = cfg.trainer.batch_size
    return {
        "head": cfg.predictor.name,
        "model": model_label(cfg),
        "compiled": compiled,
        "moe_experts": experts,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu × {torch.get_num_threads()}",
        "batch": n,
        "image_size": cfg.data.image_size,
        "first_step_s": first,
        "step_ms": 1e3 * step_s,
        "step_ms_iqr": 1e3 * (statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]),
        "images_per_s": n / step_s,
        "gflops_per_step": flops / 1e9,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": flops / step_s / peak,
        "peak_memory_mb": peak_memory_mb(device),
        "graphs": graphs if compiled else None,
        "graph_breaks": graph_breaks if compiled else None,
    }


def adaptive_flops(overrides: list[str]) -> dict | None:
    """Measured FLOPs of one training step with the configuration's adaptive computation and without it."""
    cfg = compose_config(CONF, overrides)
    if cfg.recipe != "image" or not cfg.model.adaptive:  # adaptive computation is the image encoder's (model.*)
        return None
    flops = {}
    for adaptive in (True, False):
        cfg.model.adaptive = adaptive
        with tempfile.TemporaryDirectory() as tmp:
            trainer, batches = build_trainer(cfg, tmp)
            flops[adaptive] = micro_batch_flops(trainer, batches[0]) * trainer.accum
    return {"capacity": list(cfg.model.capacity)[: cfg.model.levels], "gflops_adaptive": flops[True] / 1e9,
            "gflops_full": flops[False] / 1e9, "flops_saved": 1 - flops[True] / flops[False]}


def trunk_tokens(overrides: list[str]) -> tuple[int, int, int]:
    """(trunk width, MLP hidden width, tokens per step) of the predictor trunk: every image's context tokens and
    every target block's tokens at each predicted level, summed over the mask specs (one predictor pass each)."""
    cfg = compose_config(CONF, overrides)
    with torch.device("meta"):
        model = build_model(cfg).level_jepa("image")
    enc = model.context_encoder
    specs = build_mask_specs(cfg.mask.image, "mask.image", enc.num_units, enc.unit_grid)
    per_unit = sum((enc.unit // 2**l) ** 2 for l in model.predict_levels)
    units = sum(spec.num_context + spec.num_targets * spec.num_target_units for spec in specs)
    tokens = cfg.trainer.batch_size * per_unit * units
    p = cfg.model.predictor
    return p.dim, int(p.dim * p.mlp_ratio), tokens


def report(overrides: list[str]) -> list[dict]:
    """Parameters and FLOPs per level at the preset's native resolution, on the meta device (no memory).

    FLOPs are of a full computation (α = 1): adaptive computation's savings depend on the learned α.
    """
    cfg = compose_config(CONF, overrides)
    cfg.data.image_size = cfg.model.image_size
    with torch.device("meta"):
        model = build_model(cfg).level_jepa("image")
        cfg.model.adaptive = False
        full = build_model(cfg).level_jepa("image")
    params = {r["part"]: r["params"] for r in level_report(model, cfg.model.image_size, count_flops=False)}
    rows = level_report(full, cfg.model.image_size)
    for r in rows:
        r["params_M"] = params[r["part"]] / 1e6
        del r["params"]
    return rows


def presets() -> list[dict]:
    """One row per ``model/*.yaml`` (:func:`report` of each): encoder parameters (measured), the parameters its source
    paper claims (``model.paper_params``), the last level's share and the encoder's GFLOPs for one image at full
    computation (α = 1)."""
    rows = []
    for name in group_options(CONF, "model"):
        m = compose_config(CONF, [f"model={name}"]).model
        parts = {r["part"]: r for r in report([f"model={name}"])}
        rows.append({
            "preset": name, "input": f"{m.image_size} px, patch {m.patch_size}",
            "widths": ", ".join(map(str, m.dims)), "depths": ", ".join(map(str, m.depths)),
            "heads": ", ".join(map(str, m.num_heads)),
            "params_M": parts["encoder total"]["params_M"],
            "paper_M": m.paper_params / 1e6 if m.paper_params else None,
            "last_level_M": parts[f"level {m.levels - 1}"]["params_M"], "gflops": parts["encoder total"]["gflops"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=jin_tiny trainer.batch_size=32")
    parser.add_argument("--heads", help="'all' or a comma list; default: the configured predictor")
    parser.add_argument("--report", action="store_true", help="parameters and FLOPs per level, then exit")
    parser.add_argument("--presets", action="store_true",
                        help="every model preset's measured and claimed parameters and FLOPs, then exit")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--no-compile", action="store_true", help="eager steps only")
    parser.add_argument("--experts", type=int, default=8, help="experts of the MoE-vs-dense comparison (top-2)")
    parser.add_argument("--single", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.presets:
        rows = presets()
        print(markdown_table(rows, {"params_M": ".2f", "paper_M": ".0f", "last_level_M": ".2f", "gflops": ".2f"}))
        args.out.write_text(json.dumps(rows, indent=2))
        return
    if args.report:
        rows = report(args.overrides)
        print(markdown_table(rows, {"params_M": ".2f", "gflops": ".2f"}))
        args.out.write_text(json.dumps(rows, indent=2))
        return
    if args.single:
        print(json.dumps(measure(args.overrides, args.steps, args.warmup, args.single == "compiled")))
        return

    heads = HEADS if args.heads == "all" else args.heads.split(",") if args.heads else [None]
    modes = ["eager"] if args.no_compile else ["eager", "compiled"]
    rows = []
    for head in heads:
        overrides = args.overrides + ([f"predictor={head}"] if head else [])
        for mode in modes:
            cmd = [sys.executable, __file__, f"--single={mode}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                   *overrides]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"measured {rows[-1]['head']} ({mode}): {rows[-1]['step_ms']:.0f} ms/step", file=sys.stderr)
    base = next((r for r in rows if r["head"] == "deterministic" and not r["compiled"]), None)
    for r in rows:
        r["vs_deterministic"] = r["step_ms"] / base["step_ms"] if base else None
        eager = next(e for e in rows if e["head"] == r["head"] and not e["compiled"])
        r["vs_eager"] = eager["step_ms"] / r["step_ms"]
    columns = ["head", "model", "compiled", "moe_experts", "batch", "first_step_s", "step_ms", "step_ms_iqr",
               "images_per_s", "gflops_per_step", "achieved_tflops", "mfu", "peak_memory_mb", "graphs",
               "graph_breaks", "vs_eager", "vs_deterministic"]
    print(f"device: {rows[0]['device']}, measured matmul peak {rows[0]['peak_tflops']:.3f} TFLOP/s")
    print(markdown_table([{c: r[c] for c in columns} for r in rows],
                         {"first_step_s": ".1f", "step_ms": ".0f", "step_ms_iqr": ".0f", "images_per_s": ".1f",
                          "gflops_per_step": ".1f", "achieved_tflops": ".3f", "mfu": ".2f", "peak_memory_mb": ".0f",
                          "vs_eager": ".2f", "vs_deterministic": ".2f"}))
    result = {"steps": rows}

    if compose_config(CONF, args.overrides).recipe == "image":  # both analyses read the image model's model.*
        adaptive = adaptive_flops(args.overrides)
        if adaptive is not None:
            print(f"\nadaptive computation (capacity {adaptive['capacity']}): {adaptive['gflops_adaptive']:.1f} GFLOPs "
                  f"per step against {adaptive['gflops_full']:.1f} with model.adaptive=false "
                  f"({100 * adaptive['flops_saved']:.1f} % fewer, measured)")
        dim, hidden, tokens = trunk_tokens(args.overrides)
        moe = moe_vs_dense(dim, hidden, args.experts, 2, tokens, args.steps, args.warmup)
        moe.update(dim=dim, hidden=hidden, experts=args.experts, top_k=2, tokens=tokens)
        print(f"mixture of experts (E = {args.experts}, top-2, expert width {hidden // 2}) against the dense MLP "
              f"(width {hidden}) on the trunk's {tokens} tokens × {dim}: {moe['moe_ms']:.1f} vs {moe['dense_ms']:.1f} "
              f"ms forward + backward, {moe['moe_vs_dense_throughput']:.2f}× the dense throughput")
        result.update(adaptive=adaptive, moe_vs_dense=moe)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
