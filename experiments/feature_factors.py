"""What a run's frozen features encode: the scene factors of the ``shapes`` world, read linearly.

    python experiments/feature_factors.py RUN_DIR [--out factors.json]

For the pretrained target encoder and the same encoder at its random initialization (the probe's features:
average-pooled last-level tokens), prints the held-out R² of a ridge read-out of every scene factor (class
excluded: that is the probe's job) — shape radius, centre, tilt, hue (as sine and cosine), brightness, background
colour, texture strength, occluder side and number of decoys (those the world varies) — the share of the features'
variance along their five largest principal components, and the k-NN accuracy of the class. Factors that the
features read with R² near 1 and that fill the top components decide which images are nearest neighbours (README,
"What the default run shows").

Then, from the run's evaluation (``plots/plot_data.json``), the Pearson r of every scene factor with an image's
mean predictor energy and with the probe being right on it: a factor that moves both is what could make energy
predict the probe's errors (README, "The head comparison").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from prob_jepa.data import build_datasets  # noqa: E402
from prob_jepa.data.shapes import ShapesDataset  # noqa: E402
from prob_jepa.eval import random_init_model  # noqa: E402
from prob_jepa.eval.diagnostics import variance_share  # noqa: E402
from prob_jepa.eval.metrics import pearson_r  # noqa: E402
from prob_jepa.eval.representation import extract_features, factor_r2, knn_accuracy  # noqa: E402
from prob_jepa.eval.summary import markdown_table  # noqa: E402
from prob_jepa.recipes import recipe_of  # noqa: E402
from prob_jepa.run_dir import RunDir  # noqa: E402
from prob_jepa.run_io import load_run  # noqa: E402

from evaluate import with_current_defaults  # noqa: E402  (experiments/, the script's folder)

TOP_COMPONENTS = 5


def scalar_factors(ds: ShapesDataset) -> dict[str, torch.Tensor]:
    """The dataset's scene factors as scalars per image: hue as sine and cosine, background per channel, the
    occluder's side and the number of decoys. A factor the world holds constant (an option it does not use,
    e.g. ``data.scene.texture=[0.375,0.375]``) is left out: there is nothing to read or correlate."""
    f = ds.factors
    angle = 2 * math.pi * f["hue"]
    out = {k: f[k] for k in ("radius", "cx", "cy", "theta")}
    out.update({"hue_sin": torch.sin(angle), "hue_cos": torch.cos(angle), "value": f["value"]})
    out.update({f"background_{c}": f["background"][:, i] for i, c in enumerate("rgb")})
    out.update({k: f[k] for k in ("texture", "occluder", "decoy")})
    return {k: v for k, v in out.items() if v.max() > v.min()}


def energy_and_error_drivers(factors: dict[str, torch.Tensor], energy: torch.Tensor, correct: torch.Tensor) -> dict:
    """Pearson r of each factor (``[N]`` per image, of the first ``len(energy)`` images) with the image energy
    ``[n]`` (nats) and with the probe's correctness ``[n]`` (0 / 1): ``{factor: {"energy": r, "correct": r}}``,
    plus ``"energy_vs_correct"``, the evaluation's own r (``eval.json``, uncertainty)."""
    n = len(energy)
    out = {k: {"energy": pearson_r(f[:n], energy), "correct": pearson_r(f[:n], correct)} for k, f in factors.items()}
    return {"factors": out, "energy_vs_correct": pearson_r(energy, correct)}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a trained run directory of data=shapes")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_run(args.run)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    cfg = with_current_defaults(cfg)
    if cfg.data.name != "shapes":
        sys.exit(f"error: {args.run} trained on data={cfg.data.name}; scene factors exist for data=shapes only")
    device = next(model.parameters()).device
    train_set, val_set = build_datasets(cfg.data, ("train_eval", "val"))
    reference = random_init_model(cfg, device)
    train_f, val_f = scalar_factors(train_set), scalar_factors(val_set)
    result = {}
    frozen_features = recipe_of(cfg).frozen_features
    for name, m in (("pretrained", model), ("random_init", reference)):
        encode = frozen_features(m)
        tx, ty = extract_features(encode, train_set, cfg.eval.batch_size, device, f"{name} train features")
        vx, vy = extract_features(encode, val_set, cfg.eval.batch_size, device, f"{name} val features")
        result[name] = {
            "r2": factor_r2(tx, train_f, vx, val_f),
            f"top{TOP_COMPONENTS}_variance_share": variance_share(tx, TOP_COMPONENTS),
            "knn": knn_accuracy(tx, ty, vx, vy, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature),
        }
    rows = [{"factor": k, **{name: result[name]["r2"][k] for name in result}} for k in train_f]
    rows += [{"factor": key, **{name: result[name][key] for name in result}}
             for key in (f"top{TOP_COMPONENTS}_variance_share", "knn")]
    print(f"{args.run}: held-out R² of a ridge read-out per scene factor; then the variance share of the top "
          f"{TOP_COMPONENTS} principal components and the class k-NN accuracy")
    print(markdown_table(rows, {"pretrained": ".3f", "random_init": ".3f"}))
    run = RunDir(args.run)
    if run.plot_data.exists():
        per_image = run.read_plot_data()["energy"]
        energy = torch.tensor(per_image["image"], dtype=torch.float64)
        correct = torch.tensor(per_image["image_correct"], dtype=torch.float64)
        drivers = energy_and_error_drivers({k: f.double() for k, f in val_f.items()}, energy, correct)
        result["energy_and_errors"] = drivers
        print(f"\nPearson r of each scene factor with the image energy and with the probe being right "
              f"({len(energy)} validation images; energy vs right: {drivers['energy_vs_correct']:+.3f})")
        print(markdown_table([{"factor": k, **v} for k, v in drivers["factors"].items()],
                             {"energy": "+.3f", "correct": "+.3f"}))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
