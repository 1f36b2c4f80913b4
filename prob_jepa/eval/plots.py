"""Figures (PNG, seaborn style). Every function takes ``{run name: data}``, so one run's
``plots/`` and ``experiments/compare.py``'s cross-run figures are drawn by the same code from
the same ``plots/plot_data.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from .metrics import pearson_r  # noqa: E402
from .uncertainty import attainable_correlation  # noqa: E402
from .what_could_be_here import CLASSES  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")

Runs = Mapping[str, Mapping[str, Any]]


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend beside the panels stays in the picture
    plt.close(fig)
    return path


def _grid(n: int, width: float = 4.0, height: float = 3.3, cols: int = 4):
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


MODALITY_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))  # one line style per modality, in logged order


def training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Loss, learning rate and collapse diagnostics against the step, and the probe curve's linear probe and k-NN
    accuracy where a run logged them (``eval.probe_curve``): one colour per run; the diagnostics one line
    style per modality where a run logs them by modality (``feature_std/<modality>``: modality dropout changes which
    modalities a step has, so their mean jumps from step to step). One legend beside the panels names the runs
    (colours) and the modalities (line styles)."""
    curve = tuple(k for k in ("linear_probe", "knn") if any(k in r for records in runs.values() for r in records))
    keys = ("loss", "lr", "feature_std", "effective_rank", *curve)
    fig, axes = _grid(len(keys))
    colours = dict(zip(runs, sns.color_palette("tab10" if len(runs) <= 10 else "husl", n_colors=max(len(runs), 1))))
    modalities: list[str] = []  # in the order first logged; each keeps its line style in every panel

    def style(modality: str):
        return MODALITY_STYLES[modalities.index(modality) % len(MODALITY_STYLES)]

    for ax, key in zip(axes, keys):
        for name, records in runs.items():
            parts = sorted({k.partition("/")[2] for r in records for k in r if k.startswith(f"{key}/")})
            modalities += [p for p in parts if p not in modalities]
            for part in parts or [None]:
                field = f"{key}/{part}" if part else key
                series = [(r["step"], r[field]) for r in records if field in r]
                if series:
                    ax.plot(*zip(*series), lw=1.3, color=colours[name], linestyle=style(part) if part else "-",
                            marker="o" if key in curve else None, ms=3)
        ax.set(xlabel="step", title=key)
    handles = [plt.Line2D([], [], color=c, lw=2, label=name) for name, c in colours.items()] if len(runs) > 1 else []
    handles += [plt.Line2D([], [], color="0.35", lw=1.3, linestyle=style(m), label=m) for m in modalities]
    if handles:  # beside the panels: save keeps it in the picture
        fig.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.98), frameon=False)
    return save(fig, path)


def probe_bars(runs: Runs, path: Path) -> Path:
    """Linear-probe and k-NN accuracy of each pretrained encoder and of its random initialization."""
    rows = [
        (name, f"{enc} {metric}", rep[enc][metric])
        for name, rep in runs.items()
        for enc in ("pretrained", "random_init")
        for metric in ("linear_probe", "knn")
    ]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(runs) + 3), 3.4))
    sns.barplot(x=[r[0] for r in rows], y=[r[2] for r in rows], hue=[r[1] for r in rows], ax=ax)
    ax.set(ylim=(0, 1), ylabel="top-1 accuracy", title="frozen features")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    ax.tick_params(axis="x", labelrotation=20)
    return save(fig, path)


def scale_robustness(runs: Runs, path: Path) -> Path:
    """Linear-probe and k-NN accuracy against the scale of the validation images' content (JIN Table 4), with the
    probe and k-NN bank fitted at 1×: one line per run, pretrained solid, its random initialization dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    colours = sns.color_palette(n_colors=max(len(runs), 1))
    for colour, (name, rep) in zip(colours, runs.items()):
        for enc, style in (("pretrained", "-"), ("random_init", "--")):
            scores = {1.0: rep[enc], **{float(f): s for f, s in rep[enc]["scale"].items()}}
            factors = sorted(scores)
            for ax, metric in zip(axes, ("linear_probe", "knn")):
                ax.plot(factors, [scores[f][metric] for f in factors], style, marker="o", color=colour,
                        label=f"{name} {enc.replace('_', ' ')}" if len(runs) > 1 else enc.replace("_", " "))
    ticks = sorted({1.0, *(float(f) for rep in runs.values() for f in rep["pretrained"]["scale"])})
    for ax, title in zip(axes, ("linear probe (fitted at 1×)", "k-NN (bank at 1×)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{f:g}×" for f in ticks])
        ax.minorticks_off()
        ax.set(xlabel="scale of the image content", title=title, ylim=(0, 1))
    axes[0].set_ylabel("top-1 accuracy")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, path)


def reliability(runs: Runs, path: Path) -> Path:
    """Reliability diagrams of the probe: raw, temperature-scaled, energy-aware temperature."""
    fig, axes = _grid(len(runs), 3.6, 3.6)
    for ax, (name, d) in zip(axes, runs.items()):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        for key, curve in d["reliability"].items():
            ax.plot(curve["confidence"], curve["accuracy"], marker="o", ms=3, label=key)
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=name)
    axes[0].legend(fontsize=7)
    return save(fig, path)


def pit_histograms(runs: Runs, path: Path) -> Path:
    """PIT histograms of the head's samples before and after the sample temperature (flat = calibrated)."""
    fig, axes = _grid(len(runs), 3.8, 3.0)
    for ax, (name, d) in zip(axes, runs.items()):
        for key, color in (("before", "C0"), ("after", "C1")):
            hist = np.asarray(d["pit"][key])
            edges = np.linspace(0, 1, len(hist) + 1)
            ax.stairs(hist, edges, fill=key == "before", alpha=0.5 if key == "before" else 1.0, color=color, label=key)
        ax.axhline(1.0, c="grey", ls="--", lw=1)
        ax.set(title=name, xlabel="PIT", ylabel="density")
    axes[0].legend(fontsize=7)
    return save(fig, path)


def energy_distributions(runs: Runs, path: Path) -> Path:
    """Per run: energies of true vs. other candidate targets, and image energies where the probe is right vs. wrong
    (titled with their Pearson r and the most negative r they allow, :func:`~.uncertainty.attainable_correlation`)."""
    fig, axes = _grid(2 * len(runs), 3.8, 3.0, cols=4)
    for i, (name, d) in enumerate(runs.items()):
        e = d["energy"]
        a, b = axes[2 * i], axes[2 * i + 1]
        for key, label in (("true", "true target"), ("other", "other targets")):
            sns.kdeplot(np.asarray(e[key]), ax=a, label=label, fill=True, warn_singular=False)
        a.set(title=f"{name}: candidates", xlabel="energy (nats)")
        image, correct = np.asarray(e["image"]), np.asarray(e["image_correct"], dtype=bool)
        for mask, label in ((correct, "probe right"), (~correct, "probe wrong")):
            if mask.sum() > 1:
                sns.kdeplot(image[mask], ax=b, label=label, fill=True, warn_singular=False)
        title = f"{name}: images"
        if len(image) > 1:
            energy, right = torch.as_tensor(image), torch.as_tensor(correct, dtype=torch.float64)
            title += (f"\nr {pearson_r(energy, right):+.2f} (a perfect ranking: "
                      f"{attainable_correlation(energy, right):+.2f})")
        b.set(title=title, xlabel="mean energy (nats)")
        a.legend(fontsize=7)
        b.legend(fontsize=7)
    return save(fig, path)


def ambiguity_projection(runs: Runs, path: Path) -> Path:
    """Samples, both true modes and the point prediction of marker tokens: x along the mode axis,
    y along the samples' main orthogonal spread."""
    panels = [(name, r, row) for name, d in runs.items() for r, row in enumerate(d["ambiguity"]["rows"])]
    fig, axes = _grid(len(panels), 3.0, 3.0)
    for ax, (name, r, row) in zip(axes, panels):
        s, a, b, m = (np.asarray(row[k]) for k in ("samples", "mode_a", "mode_b", "mean"))
        w = runs[name]["ambiguity"]["weights"]
        ax.scatter(s[:, 0], s[:, 1], s=6, alpha=0.4, label="samples")
        ax.scatter(*a, marker="*", s=180, c="C3", label=f"mode a (p={w[0]:g})")
        ax.scatter(*b, marker="*", s=180, c="C2", label=f"mode b (p={w[1]:g})")
        ax.scatter(*m, marker="X", s=90, c="k", label="mean()")
        ax.axvline(0, c="grey", lw=0.8, ls=":")
        ax.set(title=f"{name} · token {r}", xlabel="mode axis", yticks=[])
    axes[0].legend(fontsize=6, loc="best")
    return save(fig, path)


def ambiguity_axis(runs: Runs, path: Path) -> Path:
    """Where the samples for the hidden marker tokens fall along the axis from the minority mode (0) to the
    majority mode (1), over every ambiguity-pair row: bars for the samples, a black line for the point
    predictions; shaded where a sample is nearer a mode than the midpoint."""
    fig, axes = _grid(len(runs), 4.0, 3.0)
    for ax, (name, d) in zip(axes, runs.items()):
        amb, (wa, wb) = d["ambiguity"], d["ambiguity"]["weights"]
        edges = np.asarray(amb["axis_histogram"]["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        fraction = {k: np.asarray(amb[k]["counts"], dtype=float) for k in ("axis_histogram", "mean_axis_histogram")}
        fraction = {k: v / max(v.sum(), 1) for k, v in fraction.items()}
        ax.bar(centres, fraction["axis_histogram"], width=width, color="C0", alpha=0.8, label="samples")
        ax.step(centres, fraction["mean_axis_histogram"], where="mid", c="k", lw=1.0, label="mean()")
        ax.axvspan(edges[0], 0.25, color="C1", alpha=0.08, lw=0, zorder=0)
        ax.axvspan(0.75, edges[-1], color="C1", alpha=0.08, lw=0, zorder=0, label="nearer a mode than the midpoint")
        ax.axvline(0, c="C2", lw=1.5, label=f"mode b (p={wb:g})")
        ax.axvline(1, c="C3", lw=1.5, label=f"mode a (p={wa:g})")
        ax.axvline(0.5, c="grey", lw=0.8, ls=":")
        ax.set(title=name, xlabel="mode axis (b = 0, a = 1; ends clipped)", ylabel="fraction",
               xlim=(edges[0], edges[-1]))
    axes[0].legend(fontsize=6, loc="upper left")
    return save(fig, path)


def tradeoffs(table: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Likelihood and probe accuracy against the measured cost of a training step."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "nll_per_dim", "NLL (nats / dim)"), (axes[1], "linear_probe", "linear probe")):
        for row in table:
            if row.get(key) is not None and row.get("train_ms_per_step") is not None:
                ax.scatter(row["train_ms_per_step"], row[key], s=40)
                ax.annotate(row["run"], (row["train_ms_per_step"], row[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel="ms per training step", ylabel=label)
    return save(fig, path)


def relative(m: np.ndarray) -> np.ndarray:
    return m / max(float(m.mean()), 1e-12)


MAP_PANELS = (  # key, title, colour-bar label, colour map, what is drawn, the least colour range shown
    # (the spread relative to its image's mean: heads' spreads differ by orders of magnitude before calibration,
    # eval.json keeps the absolute values; at least 0.5–1.5, so that sampling noise around one global σ stays flat)
    ("nll", "NLL of the true target", "nats / dim", "magma", np.asarray, None),
    ("spread", "sample spread ÷ its image mean", "× the image's mean spread", "viridis", relative, (0.5, 1.5)),
    ("modes", "modes among samples", "modes", "cividis", np.asarray, (1.0, 2.0)),
)


def uncertainty_maps(runs: Runs, path: Path) -> Path:
    """Per mask unit, predicted with its block hidden: NLL, relative sample spread and modes over the image.

    One row per (run, image) — three images for one run, two each for several — the image beside its maps;
    each map column shares one colour scale across rows, so heads are compared on the same scale.
    """
    images_per_run = 3 if len(runs) == 1 else 2
    rows = [(n, i) for n, d in runs.items() for i in range(min(images_per_run, len(d["uncertainty_maps"]["nll"])))]
    fig, axes = plt.subplots(len(rows), 1 + len(MAP_PANELS), figsize=(3.1 * (1 + len(MAP_PANELS)), 2.9 * len(rows)),
                             squeeze=False, layout="constrained")
    for c, (key, title, unit, cmap, draw, least) in enumerate(MAP_PANELS, start=1):
        shown = {(n, i): draw(np.asarray(runs[n]["uncertainty_maps"][key][i], dtype=float)) for n, i in rows}
        values = np.concatenate([m.ravel() for m in shown.values()])
        vmin, vmax = float(values.min()), float(values.max()) + 1e-9
        if least is not None:
            vmin, vmax = min(vmin, least[0]), max(vmax, least[1])
        for r, (name, i) in enumerate(rows):
            ax = axes[r, c]
            im = ax.imshow(shown[name, i], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set(xticks=[], yticks=[], title=title if r == 0 else "")
        fig.colorbar(im, ax=list(axes[:, c]), shrink=0.5, aspect=25, pad=0.02, label=unit)
    for r, (name, i) in enumerate(rows):
        axes[r, 0].imshow(np.asarray(runs[name]["uncertainty_maps"]["images"][i]))
        axes[r, 0].set(xticks=[], yticks=[], ylabel=f"{name} · image {i}", title="image" if r == 0 else "")
    blocks = sorted({d["uncertainty_maps"].get("block", 1) for d in runs.values()})
    sides = " or ".join(f"{b}×{b}" for b in blocks)
    fig.suptitle(f"each block of {sides} mask units hidden in turn and predicted from all the others", fontsize=10)
    return save(fig, path)


CLASS_COLOURS = dict(zip(CLASSES, ("tab:red", "tab:blue", "tab:grey")))  # marker colour 0, colour 1, elsewhere


def what_could_be_here(runs: Runs, path: Path) -> Path:
    """Head samples made visible: the training patch nearest to each sample of one masked token.

    One row per (run, shown image): the image with its masked units grey and the queried token outlined, the
    token's true pixels (on the ambiguity pairs: the marker in each colour, with its probability), the patch
    retrieved by the point prediction, then by the first samples — captioned with the patch's class when known.
    With classes, a last column compares the share of every class among all samples' patches with the truth.
    """
    rows = [(n, r) for n, d in runs.items() for r in d["what_could_be_here"]["rows"]]
    truths = max(len(r["truths"]) for _, r in rows)
    patches = max(len(r["patches"]) for _, r in rows)
    with_shares = any("samples" in d["what_could_be_here"] for d in runs.values())
    cols = 1 + truths + patches + with_shares
    widths = [1.6] + [1.0] * (truths + patches) + [2.8] * with_shares
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.95 * sum(widths) + 0.6, 1.75 * len(rows) + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": widths}, layout="constrained")
    for i, (name, row) in enumerate(rows):
        ax = axes[i, 0]
        ax.imshow(np.asarray(row["image"]), interpolation="nearest")
        x0, y0, x1, y1 = row["query_box"]
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))
        ax.set(xticks=[], yticks=[])
        ax.set_ylabel(name, fontsize=8)
        if i == 0:
            ax.set_title("masked image", fontsize=8)
        classes = row.get("classes", [None] * len(row["patches"]))
        cells = [(1 + k, px, label, None) for k, (px, label) in enumerate(zip(row["truths"], row["truth_labels"]))]
        cells += [(1 + truths + k, px, f"sample {k}" if k else "point pred.", cls)
                  for k, (px, cls) in enumerate(zip(row["patches"], classes))]
        for ax in axes[i, 1 : 1 + truths + patches]:
            ax.set_visible(False)
        for c, pixels, title, cls in cells:
            ax = axes[i, c]
            ax.set_visible(True)
            ax.imshow(np.asarray(pixels), interpolation="nearest", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
            if i == 0:
                ax.set_title(title.replace(" (", "\n("), fontsize=7)
            if cls is not None:
                ax.set_xlabel(cls.replace("_", " "), fontsize=7, color=CLASS_COLOURS[cls])
    if with_shares:
        runs_with = [n for n in runs if "samples" in runs[n]["what_could_be_here"]]
        gs = axes[0, -1].get_gridspec()
        for ax in axes[:, -1]:
            ax.remove()
        ax = fig.add_subplot(gs[:, -1])
        weights = runs[runs_with[0]]["what_could_be_here"]["weights"]
        names = ["truth", *runs_with]
        shares = [dict(zip(CLASS_COLOURS, [*weights, 0.0]))] + [runs[n]["what_could_be_here"]["samples"] for n in runs_with]
        left = np.zeros(len(names))
        for label, colour in CLASS_COLOURS.items():
            values = np.array([s[label] for s in shares])
            ax.barh(names, values, left=left, color=colour, label=label.replace("_", " "))
            left += values
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="share of sample patches")
        ax.set_title("what the samples retrieve", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    return save(fig, path)


def all_figures(runs: Runs, records: Mapping[str, Sequence], table: Sequence, folder: Path) -> list[Path]:
    """Every figure for ``runs`` (``{name: plot_data}``) into ``folder``."""
    paths = [
        training_curves(records, folder / "training_curves.png"),
        probe_bars({n: d["representation"] for n, d in runs.items()}, folder / "probe.png"),
    ]
    scaled = {n: d["representation"] for n, d in runs.items() if d["representation"].get("pretrained", {}).get("scale")}
    if scaled:
        paths.append(scale_robustness(scaled, folder / "scale_robustness.png"))
    with_heads = {n: d for n, d in runs.items() if "pit" in d}
    if with_heads:
        paths += [
            reliability(with_heads, folder / "reliability.png"),
            pit_histograms(with_heads, folder / "pit.png"),
            energy_distributions(with_heads, folder / "energy.png"),
        ]
    ambiguous = {n: d for n, d in runs.items() if d.get("ambiguity")}
    if ambiguous:
        paths.append(ambiguity_projection(ambiguous, folder / "ambiguity_pca.png"))
        with_axis = {n: d for n, d in ambiguous.items() if "axis_histogram" in d["ambiguity"]}
        if with_axis:
            paths.append(ambiguity_axis(with_axis, folder / "ambiguity_axis.png"))
    with_maps = {n: d for n, d in runs.items() if d.get("uncertainty_maps")}
    if with_maps:
        paths.append(uncertainty_maps(with_maps, folder / "uncertainty_maps.png"))
    with_panels = {n: d for n, d in runs.items() if d.get("what_could_be_here")}
    if with_panels:
        paths.append(what_could_be_here(with_panels, folder / "what_could_be_here.png"))
    if len(table) > 1:
        paths.append(tradeoffs(table, folder / "tradeoffs.png"))
    return paths
