"""Re-evaluate a finished run without training: ``python experiments/evaluate.py RUN_DIR [key=value ...]``.

Overrides change existing keys of the run's saved config for this evaluation only (``eval.num_samples=128``,
``eval.probe_train_size=1000``, ``data.val_size=2000``, ``data.scene.noise=0.1`` for another image set);
``eval.json`` (which lists them under ``overrides``) and ``plots/`` of the run are rewritten, ``config.yaml`` (what
was trained) is not. Only ``eval.*`` and ``data.*`` keys may change: the model comes from the checkpoint, and any
other key would change the random-initialization reference it is compared with; nor may the ``data.*`` keys the
model's encoders were built for (:data:`MODEL_DATA_KEYS`: the world, the input sizes, the modalities). ``eval.*``
and ``data.*`` keys added to ``experiments/conf`` after the run trained take their current defaults.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from omegaconf import OmegaConf  # noqa: E402

from prob_jepa.config import ConfigError, compose_config  # noqa: E402
from prob_jepa.data import build_datasets  # noqa: E402
from prob_jepa.run_dir import RunDir  # noqa: E402
from prob_jepa.recipes import recipe_of  # noqa: E402
from prob_jepa.run_io import load_run, override  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"
EVALUATION_KEYS = ("eval.", "data.")  # what an evaluation may change
# ... except the data keys the model's encoders were built for (input sizes, the world, the modalities)
MODEL_DATA_KEYS = ("data.name", "data.image_size", "data.modalities", "data.n_mels", "data.audio_frames",
                   "data.text_length", "data.video_frames", "data.video_size")


# Data keys added after runs had been saved, at the values that reproduce those runs' images (the defaults of
# the day each key came; some defaults changed since): a run without the key gets this value, not today's default.
LEGACY_DATA = {
    "shapes": {"scene": {"hue": [0.0, 1.0], "value": [0.55, 1.0], "background": [0.15, 0.5], "layout": "single"}},
}


def with_current_defaults(cfg):
    """The run's config with the ``eval.*`` and ``data.*`` keys added to ``experiments/conf`` since it trained
    (the run's own values win): ``eval.*`` at their current defaults, ``data.*`` at the values that reproduce
    what the run trained on (:data:`LEGACY_DATA`, else the current default)."""
    known_data = (CONF / "data" / f"{cfg.data.name}.yaml").exists()
    current = compose_config(CONF, [f"data={cfg.data.name}"] if known_data else [])
    cfg.eval = OmegaConf.merge(current.eval, cfg.eval)
    if known_data:
        cfg.data = OmegaConf.merge(current.data, LEGACY_DATA.get(cfg.data.name, {}), cfg.data)
    return cfg


def main(argv: list[str]) -> dict:
    """Evaluate ``argv[0]`` with the overrides ``argv[1:]``; returns the metrics written to ``eval.json``."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    run = RunDir(argv[0])
    keys = [item.lstrip("+~").split("=", 1)[0] for item in argv[1:]]
    fixed = [item for item, key in zip(argv[1:], keys) if not key.startswith(EVALUATION_KEYS)]
    if fixed:
        sys.exit(f"error: {', '.join(fixed)}: an evaluation may change {' and '.join(k + '*' for k in EVALUATION_KEYS)} "
                 f"keys only (the model is the checkpoint's; other keys would change the random-initialization "
                 f"reference); train another run for the rest")
    sized = [item for item, key in zip(argv[1:], keys) if key.startswith(MODEL_DATA_KEYS)]
    if sized:
        sys.exit(f"error: {', '.join(sized)}: the checkpoint's encoders were built for the run's "
                 f"{', '.join(MODEL_DATA_KEYS)}; an evaluation keeps them (train another run for other inputs)")
    try:
        model, cfg = load_run(run.path)
        cfg = override(with_current_defaults(cfg), argv[1:])
    except (FileNotFoundError, ConfigError) as e:
        sys.exit(f"error: {e}")
    evaluate = recipe_of(cfg).evaluate()
    device = next(model.parameters()).device
    try:
        probe_set, val_set = build_datasets(cfg.data, ("train_eval", "val"))
        metrics = evaluate(model, cfg, probe_set, val_set, run, device)  # checks its eval.* keys before any work
    except ConfigError as e:
        sys.exit(f"error: {e}")
    metrics["overrides"] = list(argv[1:])
    run.write_eval(metrics)
    return metrics


if __name__ == "__main__":
    metrics = main(sys.argv[1:])
    print(json.dumps(metrics.get("representation", {}), indent=2))
