"""Run several configurations in one torchrun launch (one process group): ``torchrun ... torchrun_configs.py SPEC``.

SPEC is a JSON file ``{"out": dir, "runs": {name: [override, ...]}}``; run ``name`` writes ``<out>/<name>``.
One launch amortizes the process start-up that a launch per configuration would pay each time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import CONF
from prob_jepa.config import compose_config
from prob_jepa.train import pretrain

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    for name, overrides in spec["runs"].items():
        pretrain(compose_config(CONF, overrides), run_dir=Path(spec["out"]) / name)
