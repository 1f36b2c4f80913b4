"""The supervised reference: how far the run's own probe can read the class from this encoder at this budget.

    python experiments/supervised_reference.py [Hydra overrides] [--out supervised.json]

Trains the configuration's context encoder (``model=``, at ``seed``) and a linear classifier on its
average-pooled last-level tokens with cross-entropy on the labels — no masks, no predictor, no EMA target — for
the run's own steps (``trainer.epochs`` × steps per epoch, ``trainer.batch_size``; ``trainer.max_steps`` stops it
early, as it stops a run, without changing the schedules) and schedules (``optim.*``: warm-up + cosine lr, cosine
weight decay, ``trainer.clip_grad``), then scores the frozen encoder exactly as a run
scores its target encoder (:func:`prob_jepa.eval.frozen_feature_scores`: the same linear probe and k-NN on the
same images). It prints and writes the probe, the k-NN accuracy, the trained classifier's own validation accuracy and
the random-initialization reference: what a self-supervised run's probe can be compared with on this data.
It writes no run directory (``--out`` names the JSON file), so ``hydra.*`` overrides are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from prob_jepa.config import compose_config  # noqa: E402
from prob_jepa.data import build_datasets  # noqa: E402
from prob_jepa.eval import evaluation_sets, frozen_feature_scores, random_init_model  # noqa: E402
from prob_jepa.eval.summary import markdown_table  # noqa: E402
from prob_jepa.model import build_model  # noqa: E402
from prob_jepa.schedules import Schedules  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"


class PooledClassifier(nn.Module):
    """``encoder`` → average-pooled last-level tokens ``[B, D]`` → linear logits ``[B, C]``."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.dims[-1], num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[-1].features.mean(dim=(1, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def train_supervised(
    cfg: DictConfig, train_set, num_classes: int, progress: bool = True
) -> tuple[PooledClassifier, int]:
    """The context encoder of ``build_model(cfg)`` (seeded as the trainer seeds it) and a linear classifier,
    trained with cross-entropy for the run's steps and schedules (up to ``trainer.max_steps``); returns it in eval
    mode and the steps taken."""
    torch.manual_seed(cfg.seed)
    model = PooledClassifier(build_model(cfg).level_jepa("image").context_encoder, num_classes)
    loader = DataLoader(train_set, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    total = int(cfg.trainer.epochs * len(loader))
    schedules = Schedules.from_config(cfg.optim, total, len(loader))
    if cfg.trainer.max_steps is not None:
        total = min(total, int(cfg.trainer.max_steps))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    model.train()
    bar = tqdm(total=total, desc="supervised", disable=not progress)
    step = 0
    while step < total:
        for images, labels in loader:
            if step == total:
                break
            lr, weight_decay, _ = schedules(step)
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = lr, weight_decay
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.clip_grad)
            opt.step()
            step += 1
            bar.update()
    bar.close()
    return model.eval(), total


def supervised_reference(cfg: DictConfig, progress: bool = True) -> dict[str, float]:
    """Probe, k-NN and classifier accuracy of the supervised encoder, and the probe and k-NN of the same encoder
    at its random initialization, on the probe sets a run of ``cfg`` uses (fractions of the validation images)."""
    train_set, val_set, probe_set = build_datasets(cfg.data, ("train", "val", "train_eval"))
    if not isinstance(train_set[0][0], torch.Tensor):
        raise ValueError(f"data={cfg.data.name} yields {type(train_set[0][0]).__name__} items, not labelled images")
    probe_train, probe_val = evaluation_sets(probe_set, val_set, cfg.eval)
    cpu = torch.device("cpu")
    model, steps = train_supervised(cfg, train_set, int(cfg.data.num_classes), progress)
    out: dict[str, float] = {"steps": steps}
    reference = random_init_model(cfg, cpu).level_jepa("image")
    for name, encode in (("supervised", model.features), ("random_init", reference.features)):
        scored = frozen_feature_scores(encode, probe_train, probe_val, cfg.eval, cpu, name)
        out.update({f"{name}_{key}": value for key, value in scored.scores.items()})
        if name == "supervised":
            with torch.no_grad():
                out["classifier"] = (model.classifier(scored.val_x).argmax(1) == scored.val_y).float().mean().item()
    return out


def main(argv: list[str]) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of experiments/conf/config.yaml")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    run_dir_keys = [o for o in args.overrides if o.lstrip("+~").startswith("hydra.")]
    if run_dir_keys:
        sys.exit(f"error: {', '.join(run_dir_keys)}: supervised_reference.py writes no run directory; "
                 f"--out FILE writes its numbers as JSON")
    cfg = compose_config(CONF, args.overrides)
    try:
        result = supervised_reference(cfg, progress=cfg.trainer.progress)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(markdown_table([result], {k: ".3f" for k in result if k != "steps" and "weight_decay" not in k}))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
