"""Time the official I-JEPA training step beside ours, alternately, in one process (CPU, fp32).

    python experiments/bench_ijepa.py --ijepa /tmp/ijepa [--rounds 3 --steps 12 --warmup 3 --batch 64 --threads 2]
    python experiments/bench_ijepa.py --ijepa /tmp/ijepa --compile   # ours also with trainer.compile=true
    python experiments/bench_ijepa.py --ijepa /tmp/ijepa --check   # both steps train: loss over 20 steps, no timing
    python experiments/bench_ijepa.py --ijepa /tmp/ijepa mask.image.0.context_quantile=0.0154   # overrides for ours

``--ijepa`` is a checkout of facebookresearch/ijepa; its modules are imported from there at run time, never copied.

Official (``src/train.py``, ``main()``'s ``train_step``, use_bfloat16 off, one rank, no DDP): ``vit_tiny`` and
``vit_predictor`` built by ``src.helper.init_model`` (patch 8, 64 px, predictor width 96, depth 4, 3 heads = our
``model=vit_tiny`` preset), AdamW with their four parameter groups and schedules (``src.helper.init_opt``). The timed
step is their closure (local to ``main()``, so its dozen lines of glue are restated; every module and helper it
calls is imported): lr / wd schedule steps; target encoder forward under ``no_grad`` + ``F.layer_norm`` +
``apply_masks`` + ``repeat_interleave_batch``; context encoder on the context masks; predictor; smooth-L1 (through
``AllReduce``); backward; ``optimizer.step()``; ``grad_logger``; ``zero_grad``; the per-parameter EMA loop with their
momentum schedule (``optimization.ema`` of their ``configs/in1k_vith14_ep300.yaml``: 0.996 → 1.0); ``float(loss)``.
Their ``MaskCollator`` (enc scale, pred scale, aspect, 4 pred masks, 1 enc mask, min_keep from our ``mask.image.0``
config) runs in their DataLoader workers, outside their timer, so it is called before the timer here too; its time is
reported apart (``official_masks_ms``).

Ours: ``prob_jepa.train.Trainer.train_step`` on ``experiments/bench.py``'s synthetic batch (random images), as
``bench.py::measure`` calls it (``model=vit_tiny``, fp32 on the CPU; ``trainer.epochs`` = the steps run, one step
per epoch, so both sides' schedules span the run), with ``trainer.step`` advanced after each step: mask drawing (our
collator runs inside the step), target and context encoders, predictor trunk, head loss, backward, gradient
clipping, AdamW, EMA.

With ``--compile`` a second trainer of ours (same seed, ``trainer.compile=true``) is timed after the eager one in
every round; its compilation falls in the first round's warm-up. The official step cannot be compiled to one graph:
its token counts change with every mask draw.

Each round times the official step (``--warmup`` untimed, then ``--steps`` timed one by one), then ours; a block's
time is its median step. ratio = official ms / ours ms: our throughput relative to the official code (> 1: faster).
cpu_ratio is the same ratio in process CPU time (all threads): less sensitive to other jobs taking the cores, though
OpenMP threads spinning at a barrier count too.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from bench import CONF, build_trainer
from prob_jepa.config import compose_config
from prob_jepa.eval.summary import markdown_table
from prob_jepa.masks import complete_mask_specs

CHECK_STEPS = 20


def our_config(batch: int, steps: int, compiled: bool = False, overrides: Sequence[str] = ()):
    """The ``model=vit_tiny`` config on the CPU (+ ``overrides``); the schedules span ``steps`` (1 step per epoch
    on one batch)."""
    return compose_config(CONF, ["model=vit_tiny", f"trainer.batch_size={batch}", "trainer.device=cpu",
                                 "eval.enabled=false", f"trainer.compile={str(compiled).lower()}",
                                 f"trainer.epochs={steps}", *overrides])


class OfficialStep:
    """The official I-JEPA model, collator, optimizer and training step, imported from ``checkout``.

    Args:
        checkout: the facebookresearch/ijepa work tree (its ``src`` package is imported).
        cfg: our composed config: model, mask and optim numbers are read from it.
        steps_per_epoch, epochs: the schedules' length (their ``ipe``, ``num_epochs``).
    """

    def __init__(self, checkout: Path, cfg, steps_per_epoch: int, epochs: int):
        sys.path.insert(0, str(checkout))
        from src.helper import init_model, init_opt
        from src.masks.multiblock import MaskCollator
        from src.masks.utils import apply_masks
        from src.utils.distributed import AllReduce
        from src.utils.logging import grad_logger
        from src.utils.tensors import repeat_interleave_batch

        logging.getLogger().setLevel(logging.WARNING)  # src.helper configures INFO logging and prints the model
        self.apply_masks, self.repeat_interleave_batch = apply_masks, repeat_interleave_batch
        self.all_reduce, self.grad_logger = AllReduce, grad_logger
        official = yaml.safe_load((checkout / "configs" / "in1k_vith14_ep300.yaml").read_text())["optimization"]
        ema, ipe_scale = official["ema"], official["ipe_scale"]

        m, p, optim = cfg.model, cfg.model.predictor, cfg.optim
        if len(cfg.mask.image) != 1 or cfg.mask.image[0].kind != "multiblock":
            raise ValueError(f"mask.image={OmegaConf.to_container(cfg.mask.image)}: their collator draws one "
                             f"multi-block spec; give one (kind: multiblock)")
        mask = complete_mask_specs(cfg).mask.image[0]  # every option, defaults included
        torch.manual_seed(cfg.seed)
        self.encoder, self.predictor = init_model(
            device=torch.device("cpu"), patch_size=m.patch_size, crop_size=cfg.data.image_size,
            pred_depth=p.depth, pred_emb_dim=p.dim, model_name=m.name)
        if self.encoder.num_heads != p.num_heads:
            raise ValueError(f"their predictor takes the encoder's {self.encoder.num_heads} heads; "
                             f"model.predictor.num_heads={p.num_heads}")
        self.target_encoder = copy.deepcopy(self.encoder)
        for q in self.target_encoder.parameters():
            q.requires_grad = False
        self.collator = MaskCollator(
            input_size=cfg.data.image_size, patch_size=m.patch_size, pred_mask_scale=tuple(mask.target_scale),
            enc_mask_scale=tuple(mask.context_scale), aspect_ratio=tuple(mask.target_aspect), nenc=1,
            npred=mask.num_targets, allow_overlap=False, min_keep=mask.min_keep)
        self.optimizer, _, self.scheduler, self.wd_scheduler = init_opt(
            encoder=self.encoder, predictor=self.predictor, wd=optim.weight_decay,
            final_wd=optim.final_weight_decay, start_lr=optim.start_lr, ref_lr=optim.lr, final_lr=optim.final_lr,
            iterations_per_epoch=steps_per_epoch, warmup=optim.warmup_epochs, num_epochs=epochs,
            ipe_scale=ipe_scale, use_bfloat16=False)
        total = steps_per_epoch * epochs * ipe_scale
        self.momentum = (ema[0] + i * (ema[1] - ema[0]) / total for i in range(int(total) + 1))

    def masks(self, samples: list) -> tuple[torch.Tensor, list, list]:
        """Their collator on a list of ``(image, label)``: images, context masks, target masks."""
        udata, masks_enc, masks_pred = self.collator(samples)
        return udata[0], masks_enc, masks_pred

    def step(self, imgs: torch.Tensor, masks_enc: list, masks_pred: list) -> float:
        """``train_step`` of their ``src/train.py`` (fp32, one rank); returns the loss."""
        self.scheduler.step()
        self.wd_scheduler.step()

        # Step 1. Forward
        with torch.no_grad():
            h = self.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            B = len(h)
            h = self.apply_masks(h, masks_pred)
            h = self.repeat_interleave_batch(h, B, repeat=len(masks_enc))
        z = self.encoder(imgs, masks_enc)
        z = self.predictor(z, masks_enc, masks_pred)
        loss = self.all_reduce.apply(F.smooth_l1_loss(z, h))

        # Step 2. Backward & step
        loss.backward()
        self.optimizer.step()
        self.grad_logger(self.encoder.named_parameters())
        self.optimizer.zero_grad()

        # Step 3. momentum update of target encoder
        with torch.no_grad():
            m = next(self.momentum)
            for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return float(loss)


class Bench:
    """Both sides on the same synthetic batch; :meth:`official` and :meth:`ours` run one block of steps each
    (``compiled``: also a compiled trainer of ours; ``overrides``: config overrides for ours)."""

    def __init__(self, checkout: Path, batch: int, total_steps: int, tmp: str, compiled: bool,
                 overrides: Sequence[str] = ()):
        cfg = our_config(batch, total_steps, overrides=overrides)
        trainer, self.batches = build_trainer(cfg, f"{tmp}/eager")
        self.trainers = {"ours": trainer}
        if compiled:
            compiled_cfg = our_config(batch, total_steps, compiled=True, overrides=overrides)
            self.trainers["ours_compiled"] = build_trainer(compiled_cfg, f"{tmp}/compiled")[0]
        images, labels = (torch.cat(parts) for parts in zip(*self.batches))
        self.samples = list(zip(images, labels))  # their collator takes a list of (image, label)
        self.official_step = OfficialStep(checkout, cfg, trainer.steps_per_epoch, cfg.trainer.epochs)

    def official(self, steps: int, warmup: int) -> tuple[list[float], list[float], list[float], list[float]]:
        """Wall seconds of ``steps`` official steps after ``warmup``, their CPU seconds (all threads), their
        collator's wall seconds, and the losses of every step."""
        times, cpu_times, mask_times, losses = [], [], [], []
        for i in range(warmup + steps):
            tic = time.perf_counter()
            batch = self.official_step.masks(self.samples)
            toc, cpu = time.perf_counter(), time.process_time()
            losses.append(self.official_step.step(*batch))
            if i >= warmup:
                mask_times.append(toc - tic)
                cpu_times.append(time.process_time() - cpu)
                times.append(time.perf_counter() - toc)
        return times, cpu_times, mask_times, losses

    def ours(self, steps: int, warmup: int, side: str = "ours") -> tuple[list[float], list[float], list[float]]:
        """Wall seconds of ``steps`` of our steps after ``warmup``, their CPU seconds (all threads), and the losses
        of every step; ``side``: ``"ours"`` (eager) or ``"ours_compiled"``."""
        trainer = self.trainers[side]
        times, cpu_times, losses = [], [], []
        for i in range(warmup + steps):
            tic, cpu = time.perf_counter(), time.process_time()
            terms = trainer.train_step(self.batches)
            trainer.step += 1
            if i >= warmup:
                cpu_times.append(time.process_time() - cpu)
                times.append(time.perf_counter() - tic)
            losses.append(float(terms["loss"]))
        return times, cpu_times, losses


def repo_state() -> dict:
    """The commit of this checkout and a hash of its uncommitted changes, untracked files included (the code timed)."""
    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True).stdout  # noqa: E731
    changes = hashlib.sha1(git("diff", "HEAD"))
    for name in sorted(git("ls-files", "--others", "--exclude-standard").decode().split()):
        changes.update(name.encode() + (root / name).read_bytes())
    return {"commit": git("rev-parse", "HEAD").decode().strip(), "changes_sha1": changes.hexdigest()}


def row(name: str, side: str, official: dict, ours: dict, batch: int) -> dict:
    """A table row from the step times of one block (or all blocks) of the official step and one ``side`` of ours."""
    o, u = statistics.median(official["wall"]), statistics.median(ours["wall"])
    return {"round": name, "ours": side, "official_ms": 1e3 * o, "ours_ms": 1e3 * u, "ratio": o / u,
            "official_img_s": batch / o, "ours_img_s": batch / u,
            "cpu_ratio": statistics.median(official["cpu"]) / statistics.median(ours["cpu"]),
            "official_masks_ms": 1e3 * statistics.median(official["masks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ijepa", type=Path, required=True, help="checkout of facebookresearch/ijepa")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time ours with trainer.compile=true")
    parser.add_argument("--check", action="store_true", help=f"print both losses over {CHECK_STEPS} steps, no timing")
    parser.add_argument("--out", type=Path, default=Path("bench_ijepa.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for our side (the official collator reads "
                        "mask.image.0.* from the same config), e.g. mask.image.0.context_quantile=0.0154")
    args = parser.parse_args()
    if not (args.ijepa / "src" / "train.py").exists():
        parser.error(f"--ijepa {args.ijepa}: no src/train.py (expected a facebookresearch/ijepa checkout)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True")  # their float(loss)

    total = CHECK_STEPS if args.check else args.rounds * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.ijepa.resolve(), args.batch, total, tmp, args.compile, args.overrides)
        if args.check:
            losses = {"official": bench.official(0, CHECK_STEPS)[-1]}
            losses.update({side: bench.ours(0, CHECK_STEPS, side)[-1] for side in bench.trainers})
            for name, values in losses.items():
                print(f"{name:13s} loss over {CHECK_STEPS} steps on one batch: " + " ".join(f"{v:.4f}" for v in values))
            return
        rows, every = [], {"official": {"wall": [], "cpu": [], "masks": []}}
        every.update({side: {"wall": [], "cpu": []} for side in bench.trainers})
        for r in range(args.rounds):
            blocks = {"official": dict(zip(("wall", "cpu", "masks"), bench.official(args.steps, args.warmup)))}
            for side in bench.trainers:
                blocks[side] = dict(zip(("wall", "cpu"), bench.ours(args.steps, args.warmup, side)))
                rows.append(row(str(r + 1), side, blocks["official"], blocks[side], args.batch))
            for side, block in blocks.items():
                for k, v in every[side].items():
                    v += block[k]
            print(f"round {r + 1}: " + ", ".join(f"{k} {1e3 * statistics.median(b['wall']):.0f} ms"
                                                 for k, b in blocks.items()), file=sys.stderr)
    rows += [row("all", side, every["official"], every[side], args.batch) for side in bench.trainers]
    print(f"cpu × {torch.get_num_threads()} threads, batch {args.batch}, median of {args.steps} steps per block "
          f"after {args.warmup} warm-up steps; ratio = official ms / ours ms (wall); cpu_ratio: the same in process "
          f"CPU time; official_masks_ms: their collator, outside their step")
    print(markdown_table(rows, {"official_ms": ".0f", "ours_ms": ".0f", "ratio": ".3f", "official_img_s": ".1f",
                                "ours_img_s": ".1f", "cpu_ratio": ".3f", "official_masks_ms": ".1f"}))
    args.out.write_text(json.dumps({
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "repo": repo_state(),
        "rounds": rows,
        "step_s": every,
    }, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
