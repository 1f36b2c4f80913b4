"""One table row per run, from its ``eval.json`` and ``config.yaml`` (used by ``experiments/compare.py``)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from ..config import group_options
from ..run_dir import RunDir

COLUMNS = {  # column: (path in eval.json, format)
    "linear_probe": (("representation", "pretrained", "linear_probe"), ".3f"),
    "knn": (("representation", "pretrained", "knn"), ".3f"),
    "probe_random_init": (("representation", "random_init", "linear_probe"), ".3f"),
    "knn_random_init": (("representation", "random_init", "knn"), ".3f"),
    "probe_margin": (("representation", "margin", "linear_probe"), "+.3f"),  # pretrained − random init, same images
    "probe_margin_se": (("representation", "margin", "linear_probe_se"), ".3f"),  # its paired standard error
    "probe_0.5x": (("representation", "pretrained", "scale", "0.5", "linear_probe"), ".3f"),  # JIN Table 4
    "probe_2x": (("representation", "pretrained", "scale", "2.0", "linear_probe"), ".3f"),
    "nll_per_dim": (("head", "likelihood", "nll_per_dim"), ".3f"),
    "energy_score": (("head", "samples", "energy_score"), ".3f"),
    "crps": (("head", "samples", "crps"), ".4f"),
    "cov50": (("head", "calibration", "before", "coverage", "0.5"), ".3f"),
    "cov80": (("head", "calibration", "before", "coverage", "0.8"), ".3f"),
    "cov95": (("head", "calibration", "before", "coverage", "0.95"), ".3f"),
    "cov50_calibrated": (("head", "calibration", "after", "coverage", "0.5"), ".3f"),  # after the sample temperature
    "cov80_calibrated": (("head", "calibration", "after", "coverage", "0.8"), ".3f"),
    "cov95_calibrated": (("head", "calibration", "after", "coverage", "0.95"), ".3f"),
    "pit_ks": (("head", "calibration", "before", "pit_ks"), ".3f"),
    "pit_ks_calibrated": (("head", "calibration", "after", "pit_ks"), ".3f"),
    "sample_temperature": (("head", "calibration", "temperature"), ".2f"),
    "mode_share_a": (("multimodality", "samples", "share_a"), ".3f"),  # the majority mode's (true weight 0.7)
    "minority_share": (("multimodality", "samples", "share_b"), ".3f"),  # the minority mode's (true weight 0.3)
    "on_mode_samples": (("multimodality", "samples", "on_mode"), ".3f"),
    "axis_position_mean": (("multimodality", "mean", "axis_position"), ".3f"),
    "sharpness_samples": (("multimodality", "samples", "sharpness"), ".3f"),
    "sharpness_mean": (("multimodality", "mean", "sharpness"), ".3f"),
    "map_nll_marker": (("uncertainty_maps", "marker", "nll", "inside"), ".3f"),  # nats/dim, each block from the rest
    "map_nll_mirrored": (("uncertainty_maps", "marker", "nll", "mirrored"), ".3f"),  # the marker's mirror images
    "map_spread_marker": (("uncertainty_maps", "marker", "spread", "inside"), ".3f"),
    "map_spread_mirrored": (("uncertainty_maps", "marker", "spread", "mirrored"), ".3f"),
    "here_colour_0": (("what_could_be_here", "samples", "colour_0"), ".3f"),  # share of sample patches
    "here_colour_1": (("what_could_be_here", "samples", "colour_1"), ".3f"),
    "retrieval_acc": (("head", "energy_retrieval", "after", "accuracy"), ".3f"),
    "energy_probe_r": (("uncertainty", "energy_correct_pearson_r"), ".3f"),
    # the most negative energy_probe_r these energies allow (every right image below every wrong one)
    "energy_probe_r_attainable": (("uncertainty", "energy_correct_pearson_r_attainable"), ".3f"),
    "ece_raw": (("uncertainty", "raw", "ece"), ".3f"),
    "ece_temperature": (("uncertainty", "temperature", "ece"), ".3f"),
    "ece_energy": (("uncertainty", "energy_temperature", "ece"), ".3f"),
    "retrieval_mean_R@1": (("representation", "mean_R@1"), ".3f"),  # hypermodal runs
    "retrieval_min_R@1": (("representation", "min_R@1"), ".3f"),
    "train_ms_per_step": (("cost", "train_ms_per_step"), ".0f"),
    "gflops_per_step": (("cost", "flops_per_step"), ".1f"),
    "sample_ms": (("cost", "sample_ms_per_sample"), ".4f"),
    "log_prob_ms": (("cost", "log_prob_ms_per_row"), ".4f"),
    "peak_memory_mb": (("cost", "peak_memory_mb"), ".0f"),
}

# where a hypermodal run records a column that an image run records elsewhere: its image modality's probe and k-NN
# (and the probe's margin over the random initialization with its error) of the shared space, or, in a model without
# one, of its encoder's coarsest level (the first path it has)
HYPERMODAL_COLUMNS = {
    column: [(*at, f"{score}/image{part}{suffix}") for part in ("", "/encoder")]
    for column, at, score, suffix in (("linear_probe", ("representation",), "linear_probe", ""),
                                      ("knn", ("representation",), "knn", ""),
                                      ("probe_random_init", ("representation", "random_init"), "linear_probe", ""),
                                      ("knn_random_init", ("representation", "random_init"), "knn", ""),
                                      ("probe_margin", ("representation", "margin"), "linear_probe", ""),
                                      ("probe_margin_se", ("representation", "margin"), "linear_probe", "_se"))
}


def _get(tree: dict, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def find_runs(paths: Sequence[str | Path]) -> list[RunDir]:
    """Run directories among ``paths``: each path is a run (has ``eval.json``) or holds runs (a multirun dir, or a
    folder of links to runs: links are followed)."""
    runs = []
    for p in map(Path, paths):
        if (p / "eval.json").exists():
            runs.append(RunDir(p))
        else:
            found = sorted(Path(root) for root, _, files in os.walk(p, followlinks=True) if "eval.json" in files)
            if not found:
                raise FileNotFoundError(f"{p} is not a run directory and holds none (no eval.json below it)")
            runs += [RunDir(q) for q in found]
    return runs


def model_label(cfg: DictConfig) -> str:
    """The model column of a table: the preset (``model.name``) of an image run, with its JIN Table 3 row when it is
    one (``jin_tiny/no_hierarchy``); ``hypermodal`` (with a flat image encoder) or ``hypermodal+<preset>`` (JIN's
    hierarchical image encoder, ``hypermodal.image.backbone``), with the other modalities that have the hierarchy
    too (``hypermodal+jin_tiny+audio,video,points``; ``hypermodal.hierarchy.modalities``; a hierarchy whose level 0
    has slices says how many: ``video[2 time steps]``, ``points[2 heights]``) and its JIN Table 3 row
    (``hypermodal+jin_tiny/no_ebm``; ``hypermodal.ablation``); `` [within: levels]`` when a hierarchical modality's
    within-modality JEPA predicts its levels (``hypermodal.within_targets=levels``)."""
    if cfg.recipe == "image":
        ablation = cfg.model.get("ablation")
        return cfg.model.name if ablation is None else f"{cfg.model.name}/{ablation}"
    backbone, ablation = cfg.hypermodal.image.backbone, cfg.hypermodal.ablation
    from ..hypermodal.build import SLICED_LEVELS, hierarchy_slices  # the model's own reading of the keys

    hierarchical = [m if hierarchy_slices(m, cfg) == 1 else f"{m}[{hierarchy_slices(m, cfg)} {SLICED_LEVELS[m][1]}]"
                    for m in cfg.hypermodal.hierarchy.modalities]
    label = cfg.recipe if backbone is None else f"{cfg.recipe}+{backbone}" + (
        f"+{','.join(hierarchical)}" if hierarchical else "")
    label = label if ablation is None else f"{label}/{ablation}"
    return f"{label} [within: levels]" if cfg.hypermodal.get("within_targets") == "levels" else label


def head_presets(config_dir: str | Path) -> dict[str, DictConfig]:
    """Every head's preset under ``config_dir`` (``experiments/conf``): ``{name: predictor/<name>.yaml}``."""
    return {name: OmegaConf.load(Path(config_dir) / "predictor" / f"{name}.yaml")
            for name in group_options(config_dir, "predictor")}


def head_label(predictor: DictConfig, presets: dict[str, DictConfig] | None = None) -> str:
    """The head column of a table: the head's name (``predictor.name``), followed by the options in which the run
    differs from that head's preset (``presets[name]``, ``experiments/conf/predictor/<name>.yaml``), so two
    variants of one head do not share a label: ``flow(num_components=2)``, ``diffusion(prediction_type=epsilon)``
    (a run made before the preset moved to v). The name alone when it has no preset or matches it."""
    name = predictor.name
    preset = (presets or {}).get(name)
    if preset is None:
        return name
    run, default = OmegaConf.to_container(predictor, resolve=True), OmegaConf.to_container(preset, resolve=True)
    changed = [f"{key}={value}" for key, value in run.items() if key != "name" and default.get(key, object()) != value]
    return f"{name}({','.join(changed)})" if changed else name


def summary_row(run: RunDir, presets: dict[str, DictConfig] | None = None) -> dict[str, Any]:
    """One table row of ``run``: its name, head (:func:`head_label` against ``presets``), model, steps and the
    :data:`COLUMNS` of its ``eval.json`` (``None`` where it has none)."""
    metrics, cfg = run.read_eval(), run.load_config()
    row = {"run": run.path.name, "head": head_label(cfg.predictor, presets), "model": model_label(cfg),
           "steps": _get(metrics, ("train", "steps"))}
    for column, (path, _) in COLUMNS.items():
        found = (_get(metrics, at) for at in (path, *HYPERMODAL_COLUMNS.get(column, ())))
        row[column] = next((value for value in found if value is not None), None)
    if row["gflops_per_step"] is not None:
        row["gflops_per_step"] /= 1e9
    return row


def markdown_table(rows: Sequence[dict[str, Any]], formats: dict[str, str]) -> str:
    """A markdown table of ``rows`` (dicts with the same keys); ``formats`` maps a column to a format spec."""
    columns = list(rows[0])

    def cell(c: str, v: Any) -> str:
        return "–" if v is None or v == "" else format(v, formats[c]) if c in formats else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table in markdown, without the columns no run has (the CSV keeps every column)."""
    shown = [c for c in rows[0] if any(r[c] is not None for r in rows)]
    return markdown_table([{c: r[c] for c in shown} for r in rows], {c: f for c, (_, f) in COLUMNS.items()})


def write_results(rows: Sequence[dict[str, Any]], folder: Path, name: str, formats: dict[str, str]) -> str:
    """``rows`` (dicts with the same keys) as ``folder/<name>.json`` and ``folder/<name>.csv``; returns the markdown
    table (``formats``: column → format spec) followed by a line naming both files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(list(rows), indent=2))
    write_csv(rows, folder / f"{name}.csv")
    return f"{markdown_table(rows, formats)}\nwritten: {folder / f'{name}.json'}, {folder / f'{name}.csv'}"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header line."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_table(rows: Sequence[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, csv_path = folder / "comparison.md", folder / "comparison.csv"
    md.write_text(markdown(rows) + "\n")
    write_csv(rows, csv_path)
    return md, csv_path
