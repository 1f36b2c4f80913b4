"""Training-step speed, memory, FLOPs and MFU of a configuration.

    python experiments/bench.py [Hydra overrides] [--heads all|mdn,flow] [--steps 10] [--out bench.json]
    python experiments/bench.py model=jin_b --report      # parameters and FLOPs per level of a preset

Each head is measured in its own process (peak memory is per process) on a
synthetic batch of ``trainer.batch_size`` images (paired scenes for ``experiment=hypermodal_*``)
through the real training step (masks, forward, backward, clip, AdamW, EMA). MFU = measured FLOPs per step /
step time / the device's measured matmul peak (fp32 on CPU, bf16 on CUDA).
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
from torch.utils.data import default_collate  # noqa: E402

from prob_jepa.config import compose_config  # noqa: E402
from prob_jepa.distributed import DistInfo, resolve_device  # noqa: E402
from prob_jepa.eval.cost import level_report, matmul_peak_flops, micro_batch_flops, time_steps  # noqa: E402
from prob_jepa.eval.summary import markdown_table  # noqa: E402
from prob_jepa.model import build_model  # noqa: E402
from prob_jepa.run_dir import RunDir  # noqa: E402
from prob_jepa.train import Trainer, peak_memory_mb  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"
HEADS = sorted(p.stem for p in (CONF / "predictor").glob("*.yaml"))


def synthetic_data(cfg) -> torch.utils.data.Dataset:
    """One global batch: random images, or (``experiment=hypermodal_*``) paired scenes in every modality."""
    n = cfg.trainer.batch_size
    if "hypermodal" in cfg:
        from prob_jepa.data.multimodal import MultimodalSpec, PairedShapes

        return PairedShapes(n, seed=0, spec=MultimodalSpec.from_config(cfg.data), modalities=cfg.data.modalities)
    size = cfg.data.image_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(images, torch.zeros(n, dtype=torch.long))


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    """One configuration's training step, in this process."""
    cfg = compose_config(CONF, overrides)
    device = resolve_device(cfg.trainer.device)
    info = DistInfo(0, 1, 0, device)
    n, hypermodal = cfg.trainer.batch_size, "hypermodal" in cfg
    data = synthetic_data(cfg)
    trainer_class = Trainer
    if hypermodal:
        from prob_jepa.hypermodal.train import HypermodalTrainer as trainer_class
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_class(cfg, info, RunDir(tmp), data)
        micro = trainer.micro
        batches = [default_collate([data[j] for j in range(i * micro, (i + 1) * micro)]) for i in range(trainer.accum)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(lambda: trainer.train_step(batches), steps, warmup, device)
        flops = micro_batch_flops(trainer, batches[0]) * trainer.accum
    step_s = statistics.median(times)
    peak = matmul_peak_flops(device)
    return {
        "head": cfg.predictor.name,
        "model": "hypermodal" if hypermodal else cfg.model.name,
        "moe_experts": (cfg.hypermodal if hypermodal else cfg.model).predictor.moe_experts,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu × {torch.get_num_threads()}",
        "batch": n,
        "image_size": cfg.data.image_size,
        "step_ms": 1e3 * step_s,
        "step_ms_iqr": 1e3 * (statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]),
        "images_per_s": n / step_s,
        "gflops_per_step": flops / 1e9,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": flops / step_s / peak,
        "peak_memory_mb": peak_memory_mb(device),
    }


def report(overrides: list[str]) -> list[dict]:
    """Parameters and FLOPs per level at the preset's native resolution, on the meta device (no memory).

    FLOPs are of a full computation (α = 1): adaptive computation's savings depend on the learned α.
    """
    cfg = compose_config(CONF, overrides)
    cfg.data.image_size = cfg.model.image_size
    with torch.device("meta"):
        model = build_model(cfg)
        cfg.model.adaptive = False
        full = build_model(cfg)
    params = {r["part"]: r["params"] for r in level_report(model, cfg.model.image_size, count_flops=False)}
    rows = level_report(full, cfg.model.image_size)
    for r in rows:
        r["params_M"] = params[r["part"]] / 1e6
        del r["params"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=jin_tiny trainer.batch_size=32")
    parser.add_argument("--heads", help="'all' or a comma list; default: the configured predictor")
    parser.add_argument("--report", action="store_true", help="parameters and FLOPs per level, then exit")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.report:
        rows = report(args.overrides)
        print(markdown_table(rows, {"params_M": ".2f", "gflops": ".2f"}))
        args.out.write_text(json.dumps(rows, indent=2))
        return
    if args.single:
        print(json.dumps(measure(args.overrides, args.steps, args.warmup)))
        return

    heads = HEADS if args.heads == "all" else args.heads.split(",") if args.heads else [None]
    rows = []
    for head in heads:
        overrides = args.overrides + ([f"predictor={head}"] if head else [])
        cmd = [sys.executable, __file__, "--single", f"--steps={args.steps}", f"--warmup={args.warmup}", *overrides]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"measured {rows[-1]['head']}: {rows[-1]['step_ms']:.0f} ms/step", file=sys.stderr)
    base = next((r for r in rows if r["head"] == "deterministic"), None)
    for r in rows:
        r["vs_deterministic"] = r["step_ms"] / base["step_ms"] if base else None
    columns = ["head", "model", "moe_experts", "batch", "step_ms", "step_ms_iqr", "images_per_s", "gflops_per_step",
               "achieved_tflops", "mfu", "peak_memory_mb", "vs_deterministic"]
    print(f"device: {rows[0]['device']}, measured matmul peak {rows[0]['peak_tflops']:.3f} TFLOP/s")
    print(markdown_table([{c: r[c] for c in columns} for r in rows],
                         {"step_ms": ".0f", "step_ms_iqr": ".0f", "images_per_s": ".1f", "gflops_per_step": ".1f",
                          "achieved_tflops": ".3f", "mfu": ".2f", "peak_memory_mb": ".0f", "vs_deterministic": ".2f"}))
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
