"""Evaluation of a trained run, written to ``eval.json`` and ``plots/``."""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, Subset

from ..config import ConfigError, is_count, is_finite_number
from ..data import display_images
from ..data.shapes import Marker
from ..masks import ImageMasks
from ..heads import Head
from ..jepa import JEPA, LevelJEPA
from ..recipes import recipe_of
from ..run_dir import RunDir
from . import plots
from .ambiguity import ambiguity_metrics
from .cost import first_batch, step_flops, training_cost
from .heads import EVAL_DRAWS, collect_rows, head_metrics, on_head
from .metrics import paired_difference
from .representation import ProbeResult, extract_features, knn_predict, linear_probe
from .scale import scale_scores
from .uncertainty import energy_calibration, image_energies
from .uncertainty_maps import region_means, unit_uncertainty
from .what_could_be_here import centre_retrieval, marker_retrieval, token_bank


def split(dataset: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Subset, Subset]:
    """Deterministic (train, held-out) split for users who give no validation set."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(perm) * fraction)
    return Subset(dataset, perm[cut:]), Subset(dataset, perm[:cut])


def first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def first_images(dataset: Dataset, n: int, device: torch.device) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` (fewer if it is shorter), stacked ``[n, C, H, W]`` on ``device``."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)


def with_validation(train_set: Dataset, val_set: Dataset | None) -> tuple[Dataset, Dataset]:
    """(train, validation): ``val_set``, or a held-out fifth of ``train_set`` when there is none."""
    return split(train_set) if val_set is None else (train_set, val_set)


def evaluation_sets(train_set: Dataset, val_set: Dataset | None, eval_cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """The probes' (train, validation) sets: :func:`with_validation`, each cut to ``eval.probe_train_size`` /
    ``eval.probe_val_size``.

    Raises:
        ConfigError: the probe's or k-NN's ``eval.*`` settings are out of range (:func:`probe_problems`, naming them).
    """
    if problems := probe_problems(eval_cfg):
        raise ConfigError("; ".join(problems))
    train_set, val_set = with_validation(train_set, val_set)
    return first(train_set, eval_cfg.probe_train_size), first(val_set, eval_cfg.probe_val_size)


def random_init_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The model at the weights its training started from (its recipe's ``build_model`` after
    ``torch.manual_seed(cfg.seed)``, as :class:`~prob_jepa.train.Trainer` builds it), in eval mode: the
    random-initialization reference of an image or a hypermodal run."""
    torch.manual_seed(cfg.seed)
    return recipe_of(cfg).build_model(cfg).to(device).eval()


def representation_metrics(
    model: JEPA, cfg: DictConfig, train_set: Dataset, val_set: Dataset, device: torch.device
) -> tuple[dict[str, dict[str, Any]], torch.Tensor, torch.Tensor]:
    """Linear probe and k-NN on the target encoder, and on the same encoder at its random initialization, each also
    on the validation images rescaled by every ``eval.scales`` factor (``scale``: :func:`scale_scores`); and
    ``margin``, pretrained minus random initialization on the same validation images with the paired standard error
    of each difference (:func:`~prob_jepa.eval.metrics.paired_difference`; ``images``: how many).

    Returns the metrics and the pretrained probe's validation logits and labels.
    """
    reference = random_init_model(cfg, device)
    frozen_features = recipe_of(cfg).frozen_features
    scored = {name: frozen_feature_scores(frozen_features(m), train_set, val_set, cfg.eval, device, name,
                                          scales=cfg.eval.scales)
              for name, m in (("pretrained", model), ("random_init", reference))}
    out: dict[str, dict[str, Any]] = {name: s.scores for name, s in scored.items()}
    out["margin"] = paired_margins(scored["pretrained"].right(), scored["random_init"].right())
    return out, scored["pretrained"].probe.logits, scored["pretrained"].val_y


def paired_margins(pretrained: dict[str, torch.Tensor], random_init: dict[str, torch.Tensor],
                   count: str = "images") -> dict[str, Any]:
    """Per score, the pretrained-minus-random-initialization accuracy on the same validation items and its paired
    standard error (``<score>_se``; :func:`~prob_jepa.eval.metrics.paired_difference`), from whether each encoder
    classifies each item right ``{score: bool [N]}``; under ``count`` (what the items are), N.

    Raises:
        ValueError: no scores, not the same scores on both sides, or vectors that are not of one length ≥ 1.
    """
    if not pretrained or set(pretrained) != set(random_init):
        raise ValueError(f"expected the same scores on both sides, got {sorted(pretrained)} and {sorted(random_init)}")
    out: dict[str, Any] = {count: len(next(iter(pretrained.values())))}
    for score in pretrained:
        out[score], out[f"{score}_se"] = paired_difference(pretrained[score], random_init[score])
    return out


def classified_right(probe: ProbeResult, knn_predictions: torch.Tensor, val_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Whether the linear probe and k-NN classify each validation item right: ``{"linear_probe", "knn"}``, each
    bool ``[N]``."""
    return {"linear_probe": probe.logits.argmax(1) == val_y, "knn": knn_predictions == val_y}


def feature_scores(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, eval_cfg: DictConfig
) -> tuple[dict[str, Any], ProbeResult, torch.Tensor]:
    """Linear probe (``eval.probe_max_iter``) and k-NN (``eval.knn_k``, ``eval.knn_temperature``) of frozen features
    ``[N, D]`` with labels ``[N]``: ``{"linear_probe", "probe_weight_decay", "knn"}``, the probe, and the k-NN
    class of each validation row ``[N]``."""
    e = eval_cfg
    probe = linear_probe(train_x, train_y, val_x, val_y, max_iter=e.probe_max_iter)
    knn = knn_predict(train_x, train_y, val_x, k=e.knn_k, temperature=e.knn_temperature)
    scores = {"linear_probe": probe.accuracy, "probe_weight_decay": probe.weight_decay,
              "knn": (knn == val_y).sum().item() / len(val_y)}
    return scores, probe, knn


class FrozenScores(NamedTuple):
    """:func:`frozen_feature_scores`' answer: the scores, the probe, the k-NN class of each validation image ``[N]``,
    and the validation features ``[N, D]`` and labels ``[N]``."""

    scores: dict[str, Any]
    probe: ProbeResult
    knn_predictions: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    def right(self) -> dict[str, torch.Tensor]:
        """Whether the linear probe and k-NN classify each validation image right: :func:`classified_right`."""
        return classified_right(self.probe, self.knn_predictions, self.val_y)


def frozen_feature_scores(
    encode: Callable[[torch.Tensor], torch.Tensor], train_set: Dataset, val_set: Dataset, eval_cfg: DictConfig,
    device: torch.device, name: str = "", scales: Sequence[float] = (),
) -> FrozenScores:
    """Linear probe (``eval.probe_max_iter``) and k-NN (``eval.knn_k``, ``eval.knn_temperature``) of the frozen
    features ``encode(images) → [B, D]``: the scores (``linear_probe``, ``probe_weight_decay``, ``knn``, and with
    ``scales`` the same probe and k-NN bank on rescaled validation images, ``scale``: :func:`scale_scores`), the
    probe, the k-NN classes, and the validation features ``[N, D]`` and labels ``[N]``."""
    e = eval_cfg
    tx, ty = extract_features(encode, train_set, e.batch_size, device, f"{name} train features")
    vx, vy = extract_features(encode, val_set, e.batch_size, device, f"{name} val features")
    scores, probe, knn = feature_scores(tx, ty, vx, vy, e)
    if scales:
        scores["scale"] = scale_scores(encode, probe, tx, ty, val_set, scales, e.batch_size, device, e.knn_k,
                                       e.knn_temperature, name)
    return FrozenScores(scores, probe, knn, vx, vy)


def uncertainty_map_metrics(
    model: LevelJEPA, head: Head, cfg: DictConfig, val_set: Dataset, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-unit uncertainty of the first ``eval.map_images`` validation images, blocks of ``eval.map_block``² units
    hidden in turn (:func:`unit_uncertainty`): map means, inside vs outside the ambiguity marker on ``shapes``;
    and the maps with their images for the figure."""
    images = first_images(val_set, cfg.eval.map_images, device)
    torch.manual_seed(cfg.seed + EVAL_DRAWS)  # the samples behind spread and modes
    maps = unit_uncertainty(model, head, images, cfg.eval.num_samples, cfg.eval.map_block)
    out: dict[str, Any] = {"images": len(images), "block": cfg.eval.map_block,
                           **{k: getattr(maps, k).mean().item() for k in ("nll", "spread", "modes")}}
    if "marker" in cfg.data:
        G, size = model.context_encoder.unit_grid, cfg.data.image_size
        region = torch.zeros(G * G, dtype=torch.bool)
        region[Marker.from_config(cfg.data.marker).units(size // G, size)] = True
        out["marker"] = region_means(maps, region.view(G, G))
    plot = {"block": cfg.eval.map_block, "images": display_images(images, cfg.data.name).numpy().round(3).tolist(),
            **{k: getattr(maps, k).numpy().round(4).tolist() for k in ("nll", "spread", "modes")}}
    return out, plot


def retrieval_panel(
    model: LevelJEPA, head: Head, cfg: DictConfig, train_set: Dataset, val_set: Dataset, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """"What could be here": head samples retrieved from a bank of the first ``eval.bank_images`` training
    images' target tokens — behind the marker of the ambiguity pairs on ``shapes`` (:func:`marker_retrieval`),
    else behind the centre of the first ``eval.map_images`` validation images (:func:`centre_retrieval`)."""
    e = cfg.eval
    bank = token_bank(model, first_images(train_set, e.bank_images, torch.device("cpu")), e.batch_size, device)
    torch.manual_seed(cfg.seed + EVAL_DRAWS)  # the head samples
    if "marker" in cfg.data:
        return marker_retrieval(model, head, cfg.data, bank, e.ambiguity_pairs, e.num_samples, device,
                                seed=cfg.data.seed + EVAL_DRAWS)
    images = first_images(val_set, e.map_images, device)
    return centre_retrieval(model, head, images, bank, e.num_samples, cfg.data.name)


def probe_problems(e: DictConfig) -> list[str]:
    """What is wrong with the linear probe's and k-NN's settings in ``eval`` (``batch_size`` of the feature passes,
    ``probe_train_size``, ``probe_val_size``, ``probe_max_iter``, ``knn_k``, ``knn_temperature``): one message per
    key, naming it and its valid range (empty: nothing)."""
    problems = []
    if not is_count(e.batch_size):
        problems.append(f"eval.batch_size={e.batch_size!r} must be a positive number of images")
    if not is_count(e.probe_max_iter):
        problems.append(f"eval.probe_max_iter={e.probe_max_iter!r} must be a positive number of L-BFGS iterations")
    if not (is_finite_number(e.knn_temperature) and e.knn_temperature > 0):
        problems.append(f"eval.knn_temperature={e.knn_temperature!r} must be a finite number > 0 (the votes are "
                        f"exp(similarity / T))")
    # 10: the probe's penalty is chosen on held-out rows; 2: the energy's temperatures are fit on some validation
    # images and scored on others (one image failed inside the evaluation)
    for key, low in (("probe_train_size", 10), ("probe_val_size", 2)):
        if e[key] is not None and not is_count(e[key], low=low):
            problems.append(f"eval.{key}={e[key]!r} must be at least {low} (or null: every image), a whole number")
    bank = e.probe_train_size
    if not is_count(e.knn_k):
        problems.append(f"eval.knn_k={e.knn_k!r} must be a positive number of neighbours")
    elif bank is not None and is_count(bank) and e.knn_k > bank:
        problems.append(f"eval.knn_k={e.knn_k} must be at most eval.probe_train_size={bank} (the images k-NN searches)")
    return problems


def check_knn_bank(e: DictConfig, probe_train: Dataset) -> None:
    """k-NN searches the probes' training images (``probe_train``, :func:`evaluation_sets`): ``eval.knn_k`` must not
    exceed them (``eval.probe_train_size`` may be null or larger than the data).

    Raises:
        ConfigError: naming ``eval.knn_k`` and the number of images.
    """
    if is_count(e.knn_k) and e.knn_k > len(probe_train):
        raise ConfigError(f"eval.knn_k={e.knn_k} must be at most the {len(probe_train)} images k-NN searches (the "
                          f"probes' training images: eval.probe_train_size={e.probe_train_size} of the training set)")


def check_evaluation(cfg: DictConfig, unit_grid: int) -> None:
    """Refuse evaluation settings that cannot run, before any of the evaluation does.

    Raises:
        ConfigError: naming every ``eval.*`` key out of range and its valid range.
    """
    e, problems = cfg.eval, []
    for key in ("map_images", "bank_images", "ambiguity_pairs"):
        if not is_count(e[key]):
            problems.append(f"eval.{key}={e[key]} must be at least 1")
    if not is_count(e.head_images, low=2):  # the temperatures are fit on some images and scored on others
        problems.append(f"eval.head_images={e.head_images} must be at least 2")
    problems += probe_problems(e)
    scales = e.scales
    if not (OmegaConf.is_list(scales) and all(isinstance(s, (int, float)) and s > 0 for s in scales)):
        shown = list(scales) if OmegaConf.is_list(scales) else scales
        problems.append(f"eval.scales={shown} must be a list of positive factors, e.g. [0.5, 2.0] (0.5: the "
                        f"content at half size; [] skips the evaluation)")
    levels = e.coverage_levels
    if not (OmegaConf.is_list(levels) and levels and all(is_finite_number(p) and 0 < p < 1 for p in levels)):
        shown = list(levels) if OmegaConf.is_list(levels) else levels
        problems.append(f"eval.coverage_levels={shown} must be a non-empty list of interval levels in (0, 1), e.g. "
                        f"[0.5, 0.8, 0.95]")
    if not is_count(e.num_samples, low=2):
        problems.append(f"eval.num_samples={e.num_samples} must be at least 2 (spreads and the sample temperature)")
    if not 1 <= e.map_block < unit_grid:
        problems.append(f"eval.map_block={e.map_block} must be between 1 and {unit_grid - 1} "
                        f"(the model has {unit_grid} mask units per side; a block must leave context)")
    if problems:
        raise ConfigError("; ".join(problems))


def evaluate(
    model: JEPA, cfg: DictConfig, train_set: Dataset, val_set: Dataset | None, run: RunDir, device: torch.device
) -> dict[str, Any]:
    """Every evaluation of the run; writes ``eval.json``, ``plots/plot_data.json`` and the figures. The head, its
    uncertainty and the pictures read the image at its levels (:meth:`~prob_jepa.jepa.JEPA.level_jepa`).

    ``train_set`` should yield un-augmented images (the ``train_eval`` split).
    """
    jepa = model.level_jepa("image")
    check_evaluation(cfg, jepa.context_encoder.unit_grid)
    model.eval()
    e = cfg.eval
    bank_set, val_set = with_validation(train_set, val_set)  # the bank: the training images before the probes' cut
    train_set, val_set = evaluation_sets(bank_set, val_set, e)
    check_knn_bank(e, train_set)
    tic = time.perf_counter()
    metrics: dict[str, Any] = {}
    metrics["representation"], logits, labels = representation_metrics(model, cfg, train_set, val_set, device)
    plot_data: dict[str, Any] = {"representation": metrics["representation"]}

    head = jepa.heads[-1]
    rows = collect_rows(jepa, val_set, ImageMasks(cfg, jepa.context_encoder), e.head_images, e.batch_size, device)
    torch.manual_seed(cfg.seed + EVAL_DRAWS)  # the head samples: not whatever the representation metrics drew
    metrics["head"], candidate_energy = head_metrics(head, rows, e)
    metrics["head"]["sample_seed"] = cfg.seed + EVAL_DRAWS  # also marks an evaluation whose samples can be replayed
    n = min(e.head_images, len(labels))
    per_image = rows.first_per_image(e.energy_tokens_per_image)
    with torch.no_grad():
        energy = image_energies(on_head(head, "energy", per_image.target, per_image.cond), per_image.image, n)
    metrics["uncertainty"], probe_plot = energy_calibration(logits[:n], labels[:n], energy)
    calib = metrics["head"]["calibration"]
    plot_data.update(
        reliability=probe_plot["reliability"],
        pit={k: calib[k]["pit_histogram"] for k in ("before", "after")},
        energy={**candidate_energy, "image": probe_plot["image"], "image_correct": probe_plot["image_correct"]},
    )
    if "marker" in cfg.data:
        torch.manual_seed(cfg.seed + EVAL_DRAWS)  # the head samples: not whatever the energies drew
        metrics["multimodality"], plot_data["ambiguity"] = ambiguity_metrics(
            jepa, head, cfg.data, e.ambiguity_pairs, e.num_samples, device, seed=cfg.data.seed + EVAL_DRAWS
        )

    metrics["uncertainty_maps"], plot_data["uncertainty_maps"] = uncertainty_map_metrics(
        jepa, head, cfg, val_set, device
    )
    metrics["what_could_be_here"], plot_data["what_could_be_here"] = retrieval_panel(
        jepa, head, cfg, bank_set, val_set, device
    )

    # every step's masks have the same token counts: one draw measures them all
    metrics["cost"] = {"flops_per_step": step_flops(cfg, model, first_batch(val_set, cfg.trainer.batch_size))}
    records = run.read_metrics()
    steps = [r for r in records if "loss" in r]  # without the probe curve's step 0
    if steps:
        metrics["cost"].update(training_cost(steps, cfg.trainer.batch_size))
        metrics["train"] = {"final_loss": steps[-1]["loss"], "steps": steps[-1]["step"]}
        curve = [r for r in records if "linear_probe" in r]
        if curve:
            metrics["train"]["probe_curve"] = {k: [r[k] for r in curve] for k in ("step", "linear_probe", "knn")}
    metrics["cost"].update(metrics["head"]["timings"])
    metrics["timings"] = {"eval_s": time.perf_counter() - tic}
    metrics["eval_config"] = OmegaConf.to_container(e, resolve=True)  # what this evaluation ran with

    run.write_eval(metrics)
    run.write_plot_data(plot_data)
    name = run.path.name
    plots.all_figures({name: plot_data}, {name: records} if records else {}, [], run.plots)
    return metrics
