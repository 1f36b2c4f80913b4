"""Figures written to ``<run>/plots`` (PNG, seaborn style)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_curves(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss, learning rate and collapse diagnostics against the step."""
    panels = [k for k in ("loss", "lr", "feature_std", "effective_rank") if records and k in records[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    steps = [r["step"] for r in records]
    for ax, key in zip(axes if len(panels) > 1 else [axes], panels):
        ax.plot(steps, [r[key] for r in records], lw=1.5)
        ax.set_xlabel("step")
        ax.set_title(key)
        if key == "loss":
            parts = [k for k in records[0] if k.startswith("jepa/level")]
            for k in parts if len(parts) > 1 else []:
                ax.plot(steps, [r[k] for r in records], lw=1, alpha=0.7, label=k.split("/")[1])
            if len(parts) > 1:
                ax.legend(fontsize=8)
    return save(fig, path)


def probe_bars(representation: dict[str, dict[str, float]], path: Path) -> Path:
    """Linear-probe and k-NN accuracy of the pretrained encoder against its random initialization."""
    rows = [
        {"encoder": enc, "metric": metric, "accuracy": representation[enc][metric]}
        for enc in ("pretrained", "random_init")
        for metric in ("linear_probe", "knn")
    ]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.barplot(
        x=[r["metric"] for r in rows], y=[r["accuracy"] for r in rows], hue=[r["encoder"] for r in rows], ax=ax
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("frozen features")
    return save(fig, path)
