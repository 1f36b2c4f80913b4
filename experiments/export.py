"""Export a run's target encoder alone: ``python experiments/export.py RUN_DIR --out encoder.pt``.

Load it anywhere with ``jin.load_encoder("encoder.pt")`` (no Hydra, no training code).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from prob_jepa.config import ConfigError  # noqa: E402
from prob_jepa.run_io import encoder_export, load_run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (config.yaml + checkpoints/last.pt)")
    parser.add_argument("--out", required=True, help="where to write the encoder (.pt)")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_run(args.run_dir, device="cpu")
        torch.save(encoder_export(model, cfg), args.out)
    except (FileNotFoundError, ConfigError) as e:
        sys.exit(f"error: {e}")
    print(f"target encoder of {args.run_dir} written to {args.out}; load it with jin.load_encoder({args.out!r})")


if __name__ == "__main__":
    main()
