"""The image JEPA from the config (``model.*``, ``predictor.*``): JIN's levels, the builders of its encoder,
predictor and heads (which the hypermodal builder uses too), and its loss terms (JIN eq. 9)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from jin import HierarchicalEncoder
from jin.cross_scale import CrossScalePredictors
from jin.encoders import HierarchicalModalityEncoder
from jin.hypermodal import HypermodalEncoder
from jin.layers import budget_loss

from .config import ConfigError, is_count, is_finite_number
from .heads import Head, build_head
from .jepa import JEPA
from .predictor import LevelTokens, ModalityTokens, Predictor, TaskTokens
from .regularizers import SIGReg
from .step import Predictions, Term, balance_term, jepa_term, mean_over


def level_config(model_cfg: DictConfig) -> dict:
    """Per-level lists truncated to ``model.levels``.

    ``levels < len(dims)`` keeps the *last* ``levels`` widths and folds the
    dropped levels' depth into the first kept level, so ``levels=1`` is a flat
    ViT of the top width and the same total depth — the no-hierarchy ablation.
    ``global_from`` counts the preset's levels, so it moves down with the dropped
    ones: the kept levels attend globally exactly when they did in the full model
    (without this, ``jin_tiny`` at ``levels=1`` attended within one-token units: not at all).
    """
    L = int(model_cfg.levels)
    dims, depths, heads = list(model_cfg.dims), list(model_cfg.depths), list(model_cfg.num_heads)
    if not len(dims) == len(depths) == len(heads):
        raise ConfigError(f"model.dims {dims}, model.depths {depths} and model.num_heads {heads} differ in length")
    if not 1 <= L <= len(dims):
        raise ConfigError(f"model.levels={L} must be between 1 and {len(dims)} (the length of model.dims)")
    k = L if model_cfg.predictor.levels is None else model_cfg.predictor.levels
    if not (is_count(k) and k <= L):
        raise ConfigError(f"model.predictor.levels={k!r} must be null (every level) or a whole number between 1 and "
                          f"model.levels={L}")
    drop = len(dims) - L
    for i in range(drop, len(dims)):
        check_heads(f"model.dims[{i}]", dims[i], f"model.num_heads[{i}]", heads[i])
    check_heads("model.predictor.dim", model_cfg.predictor.dim, "model.predictor.num_heads", model_cfg.predictor.num_heads)
    for key, width in ((f"model.dims[{drop}]", dims[drop]), ("model.predictor.dim", model_cfg.predictor.dim)):
        if width % 4:
            raise ConfigError(f"{key}={width} must be divisible by 4: the 2-D sin-cos position embedding")
    capacity = list(model_cfg.capacity)[:L]
    if len(capacity) < L or not all(0.0 < float(c) <= 1.0 for c in capacity):
        raise ConfigError(f"model.capacity={list(model_cfg.capacity)} must give a fraction in (0, 1] for each of the "
                          f"model.levels={L} levels")
    weights = model_cfg.level_weights
    if not OmegaConf.is_list(weights) or len(weights) < L or not all(
        is_finite_number(w) and w >= 0 for w in list(weights)[:L]
    ):
        raise ConfigError(f"model.level_weights={weights} must give a finite weight >= 0 for each of the "
                          f"model.levels={L} levels")
    if not (is_finite_number(model_cfg.sigreg_weight) and model_cfg.sigreg_weight >= 0):
        raise ConfigError(f"model.sigreg_weight={model_cfg.sigreg_weight!r} must be a finite number >= 0 (0: no SIGReg)")
    slices = model_cfg.sigreg_slices
    if model_cfg.sigreg_weight > 0 and not is_count(slices):
        raise ConfigError(f"model.sigreg_slices={slices!r} must be a positive number of projections")
    depths = [sum(depths[: drop + 1])] + depths[drop + 1 :]
    return {
        "dims": dims[drop:],
        "depths": depths,
        "num_heads": heads[drop:],
        "level_weights": list(model_cfg.level_weights)[:L],
        "alpha_targets": list(model_cfg.alpha_targets)[:L],
        "capacity": capacity,
        "predict_levels": list(range(max(0, L - k), L)),
        "global_from": max(0, int(model_cfg.global_from) - drop),
    }


def encoder_kwargs(cfg: DictConfig) -> dict:
    """The :class:`~jin.HierarchicalEncoder` arguments of ``cfg`` (plain values: saved with an exported encoder).

    Raises:
        ConfigError: ``data.image_size`` / ``model.patch_size`` is not a whole number of patches divisible by
            ``2^(levels-1)``, naming the keys.
    """
    m, lv = cfg.model, level_config(cfg.model)
    side, unit = cfg.data.image_size / m.patch_size, 2 ** (len(lv["dims"]) - 1)
    if side != int(side) or int(side) % unit:
        raise ConfigError(f"data.image_size={cfg.data.image_size} / model.patch_size={m.patch_size} = {side:g} patches "
                          f"a side must be a whole number divisible by {unit} (2^(levels-1), model.levels="
                          f"{m.levels}: each merge halves the grid)")
    return dict(
        img_size=int(cfg.data.image_size),
        patch_size=int(m.patch_size),
        dims=lv["dims"],
        depths=lv["depths"],
        num_heads=lv["num_heads"],
        mlp_ratio=float(m.mlp_ratio),
        drop_path_rate=float(m.drop_path_rate),
        dropout=float(m.dropout),
        spatial_bias=bool(m.spatial_bias),
        bias_hidden=int(m.bias_hidden),
        adaptive=bool(m.adaptive),
        capacity=[float(c) for c in lv["capacity"]],
        global_from=lv["global_from"],
        zoom_factors=[float(f) for f in m.zoom_factors] if m.zoom else [],
        zoom_tokens=int(m.zoom_tokens),
    )


def has_cross_scale(model_cfg: DictConfig) -> bool:
    """``model.cross_scale`` is on and the model has a coarser level to predict (JIN eq. 2-3)."""
    return bool(model_cfg.cross_scale) and len(level_config(model_cfg)["dims"]) > 1


def build_encoder(cfg: DictConfig) -> HierarchicalEncoder:
    return HierarchicalEncoder(**encoder_kwargs(cfg))


def check_heads(width_key: str, width: int, heads_key: str, heads: int) -> None:
    """Attention splits a width evenly over its heads.

    Raises:
        ConfigError: ``width`` is not a multiple of ``heads``, naming both keys.
    """
    if heads < 1 or width % heads:
        raise ConfigError(f"{width_key}={width} must be divisible by {heads_key}={heads} (attention heads)")


def check_experts(key: str, predictor: DictConfig) -> None:
    """A mixture of experts routes each token to ``moe_top_k`` of ``moe_experts`` experts.

    Raises:
        ConfigError: ``{key}.moe_experts`` is not a whole number >= 0 (or null), or ``{key}.moe_top_k`` is not
            between 1 and ``{key}.moe_experts`` (when experts are on).
    """
    if predictor.moe_experts is not None and not is_count(predictor.moe_experts, low=0):
        raise ConfigError(f"{key}.moe_experts={predictor.moe_experts!r} must be a whole number >= 0 (0 or null: "
                          f"a dense MLP)")
    if predictor.moe_experts and not 1 <= predictor.moe_top_k <= predictor.moe_experts:
        raise ConfigError(
            f"{key}.moe_top_k={predictor.moe_top_k} must be between 1 and {key}.moe_experts={predictor.moe_experts}"
        )


def build_configured_head(predictor: DictConfig, dim: int, cond_dim: int) -> Head:
    """The head of ``cfg.predictor`` for ``dim``-dimensional targets.

    Raises:
        ConfigError: the head rejects its options (e.g. more DDIM steps than training timesteps);
            the message names the ``predictor.*`` keys.
    """
    options = OmegaConf.to_container(predictor, resolve=True)
    name = options.pop("name")
    try:
        return build_head(name, dim=dim, cond_dim=cond_dim, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"predictor={name}: invalid predictor.* options: {e}") from e


def build_trial_head(
    trials: DictConfig, name: str, presets: dict[str, DictConfig], dim: int, cond_dim: int
) -> tuple[DictConfig, dict, Head]:
    """Head ``name`` of a head-trials config (:func:`~prob_jepa.config.load_head_trials`: ``heads_benchmark.yaml``,
    ``retrain_head.yaml``), built (seeded with ``trials.seed``) for ``dim``-dimensional targets under ``cond_dim``-wide
    conditions.

    Returns:
        its predictor config (``presets[name]``, the head's ``predictor/<name>.yaml``, with the options of
        ``per_head.<name>``), its training settings ``{"steps", "lr"}`` (``per_head.<name>``'s, else the top-level
        ones) and the head.
    Raises:
        ValueError: the head rejects its options, or ``per_head.<name>.name`` names another head; the message names
            the ``per_head.<name>.*`` keys.
    """
    settings = dict(OmegaConf.to_container(trials.per_head, resolve=True).get(name) or {})
    training = {"steps": settings.pop("steps", trials.steps), "lr": settings.pop("lr", trials.lr)}
    if settings.get("name", name) != name:
        raise ValueError(f"per_head.{name}.name={settings['name']}: a head's name is its per_head key")
    options = OmegaConf.merge(presets[name], settings)
    torch.manual_seed(trials.seed)
    try:
        head = build_configured_head(options, dim=dim, cond_dim=cond_dim)
    except ConfigError as e:
        raise ValueError(f"per_head.{name}.*: {e}") from e
    return options, training, head


def level_tokens(cfg: DictConfig, encoder: HierarchicalEncoder) -> LevelTokens:
    """The predictor's part that predicts ``encoder``'s levels (:func:`level_config`'s ``predict_levels``) at
    ``model.predictor.dim``: :class:`~prob_jepa.predictor.LevelTokens` over its grid."""
    lv = level_config(cfg.model)
    return LevelTokens([lv["dims"][l] for l in lv["predict_levels"]], cfg.model.predictor.dim, encoder.grid)


def build_predictor(cfg: DictConfig, parts: Mapping[str, LevelTokens | ModalityTokens], bias_grid: int,
                    num_gates: int = 1) -> Predictor:
    """The predictor of ``cfg.model.predictor`` (shape, mixture of experts) over ``parts``
    (:class:`~prob_jepa.predictor.TaskTokens`), with ``model.*``'s spatial bias and dropout; ``bias_grid``: tokens per
    side of the finest grid among the parts (the unit of Δpos).

    Raises:
        ConfigError: ``model.predictor.moe_top_k`` out of range (:func:`check_experts`).
    """
    m = cfg.model
    p = m.predictor
    check_experts("model.predictor", p)
    return Predictor(
        TaskTokens(parts),
        depth=p.depth,
        num_heads=p.num_heads,
        mlp_ratio=p.mlp_ratio,
        spatial_bias=m.spatial_bias,
        bias_hidden=m.bias_hidden,
        bias_grid=bias_grid,
        drop_path_rate=p.drop_path_rate,
        dropout=m.dropout,
        moe_experts=p.moe_experts,
        moe_top_k=p.moe_top_k,
        num_gates=num_gates,
    )


def build_level_heads(cfg: DictConfig) -> list[Head]:
    """One ``cfg.predictor`` head per predicted level (:func:`level_config`), for that level's width, under
    ``model.predictor.dim``-wide conditions."""
    lv = level_config(cfg.model)
    return [build_configured_head(cfg.predictor, dim=lv["dims"][l], cond_dim=cfg.model.predictor.dim)
            for l in lv["predict_levels"]]


def read_levels(model_cfg: DictConfig, predicted: bool) -> set[int]:
    """The levels of JIN's encoder that some loss reads, as ``model.*`` sets them: every level for the cross-scale
    loss, the coarsest for SIGReg, and with ``predicted`` the levels the predictor predicts (:func:`level_config`'s
    ``predict_levels``). The output norms of the other levels are frozen (no loss would train them)."""
    lv = level_config(model_cfg)
    count = len(lv["dims"])
    read = set(range(count)) if has_cross_scale(model_cfg) else {count - 1} if model_cfg.sigreg_weight > 0 else set()
    return read | set(lv["predict_levels"]) if predicted else read


def build_model(cfg: DictConfig) -> JEPA:
    """The image JEPA of ``cfg.model`` (backbone, predictor) and ``cfg.predictor`` (head): the
    :class:`~prob_jepa.jepa.JEPA` of one modality, the image, whose within-modality JEPA predicts its encoder's levels
    (no shared space), with JIN's cross-scale predictors and SIGReg as ``model.*`` sets them. Its initial weights are
    drawn in the order the image JEPA has always drawn them (encoder, predictor, heads, cross-scale), so a seed
    gives the same model.

    Raises:
        ConfigError: an invalid ``model.*`` value (:func:`level_config`), or ``model.level_weights`` zero on every
            predicted level (:func:`check_predicted_weights`).
    """
    m, lv = cfg.model, level_config(cfg.model)
    check_predicted_weights(m)
    image = HierarchicalModalityEncoder(build_encoder(cfg), None, read_levels=read_levels(m, predicted=True))
    encoder = HypermodalEncoder({"image": image}, None)
    predictor = build_predictor(cfg, {"image": level_tokens(cfg, image.backbone)}, bias_grid=image.backbone.grid)
    heads = build_level_heads(cfg)
    cross = CrossScalePredictors(lv["dims"]) if has_cross_scale(m) else None
    return JEPA(encoder, predictor, None, cross_scale=cross,
                sigreg=SIGReg(m.sigreg_slices) if m.sigreg_weight > 0 else None, level_heads={"image": heads},
                predict_levels=lv["predict_levels"], level_weights=lv["level_weights"])


def cross_scale_term(model: nn.Module, p: Predictions) -> torch.Tensor | None:
    """JIN eq. 2-3: every level predicts the next coarser one from the context levels, averaged over the step's
    hierarchies (``None``: none this step, e.g. a hypermodal step without a hierarchical modality)."""
    return mean_over([model.cross_scale([lv.features for lv in h]) for h in p.hierarchies])


def sigreg_term(model: nn.Module, p: Predictions) -> torch.Tensor | None:
    """SIGReg (LeJEPA) on the context encoder's last-level tokens, one test per hierarchy (a mixture of modalities
    can look Gaussian when none of them does), averaged (``None``: no hierarchy this step)."""
    return mean_over([model.sigreg(h[-1].features.flatten(0, 2)) for h in p.hierarchies])


def budget_term(alpha_targets: Sequence[float]):
    """JIN eq. 10: squared distance of each level's mean computed fraction α from its target, per hierarchy (so one
    modality's surplus cannot pay for another's deficit), averaged (``None``: no hierarchy this step)."""

    def measure(model: nn.Module, p: Predictions) -> torch.Tensor | None:
        return mean_over([budget_loss([lv.alpha for lv in h], alpha_targets) for h in p.hierarchies])

    return measure


def alpha_logs(p: Predictions) -> dict[str, torch.Tensor]:
    """The mean computed fraction of each level, ``alpha/level{l}`` (over the step's hierarchies: the same keys on
    every step and rank)."""
    levels = range(len(p.hierarchies[0])) if p.hierarchies else ()
    return {f"alpha/level{l}": mean_over([h[l].alpha.float().mean() for h in p.hierarchies]) for l in levels}


def hierarchy_terms(cfg: DictConfig, model: nn.Module) -> list[Term]:
    """The terms of JIN's hierarchy (``cfg.model``), for any model with ``cross_scale`` and ``sigreg`` modules:
    cross-scale (λ1 = ``model.cross_scale_weight``) when the model has it, the budget (λ_b = ``model.budget_weight``,
    eq. 10) when adaptive, SIGReg (``model.sigreg_weight``) when the model has it."""
    m = cfg.model
    terms = []
    if model.cross_scale is not None:
        terms.append(Term("cross_scale", m.cross_scale_weight, cross_scale_term))
    if m.adaptive:
        terms.append(Term("budget", m.budget_weight, budget_term(level_config(m)["alpha_targets"]), logs=alpha_logs))
    if model.sigreg is not None:
        terms.append(Term("sigreg", m.sigreg_weight, sigreg_term))
    return terms


def predicted_levels(model_cfg: DictConfig) -> str:
    """``model.predictor.levels`` as a config writes it (``null``: every level), for messages."""
    return "null" if model_cfg.predictor.levels is None else str(model_cfg.predictor.levels)


def check_predicted_weights(model_cfg: DictConfig, reader: str = "") -> None:
    """Some level the predictor predicts (:func:`level_config`'s ``predict_levels``) has a positive weight in
    ``model.level_weights``; ``reader``: what reads them, for the message (e.g. a hypermodal key).

    Raises:
        ConfigError: every predicted level is weighed by 0 (nothing would train the predictor), naming the keys.
    """
    lv = level_config(model_cfg)
    if sum(lv["level_weights"][l] for l in lv["predict_levels"]) <= 0:
        raise ConfigError(f"model.level_weights={list(model_cfg.level_weights)} weighs the predicted levels "
                          f"{lv['predict_levels']} (model.predictor.levels={predicted_levels(model_cfg)}) by 0"
                          f"{reader}: nothing trains the predictor; give one of them a positive weight")


def image_terms(cfg: DictConfig, model: JEPA) -> list[Term]:
    """The image JEPA's loss terms (JIN eq. 9), in the order they are summed: the JEPA term of every predicted
    level (weight ``model.level_weights[l]``), :func:`hierarchy_terms`, and the experts' balance
    (``model.predictor.moe_balance_weight``) when the predictor has experts (the keys are ``cfg``'s).

    Raises:
        ConfigError: ``model.level_weights`` is zero on every predicted level (nothing would train the predictor).
    """
    m, lv = cfg.model, level_config(cfg.model)
    check_predicted_weights(m)
    terms = [Term(f"jepa/level{l}", lv["level_weights"][l], jepa_term("jepa/within", level=l))
             for l in model.predict_levels]
    terms += hierarchy_terms(cfg, model)
    if m.predictor.moe_experts:
        terms.append(Term("moe_balance", m.predictor.moe_balance_weight, balance_term))
    return terms
