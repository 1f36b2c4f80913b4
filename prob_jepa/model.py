"""The JEPA model: context encoder, EMA target encoder, predictor, one head per level."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from jin import HierarchicalEncoder
from jin.cross_scale import CrossScalePredictors
from jin.layers import budget_loss

from .config import ConfigError, is_count, is_finite_number
from .ema import ContextTargetPair
from .heads import Head, build_head
from .masks import Masks
from .predictor import LevelTokens, Predictor
from .regularizers import SIGReg
from .step import Predicted, Predictions, Term, balance_term, jepa_term, mean_over


class Prediction(NamedTuple):
    """What :meth:`JEPA.predict` computes: ``context``, the context encoder's levels; ``cond``, per predicted level
    ``[B, M, N_l, C]`` for the target units; ``balance``, the predictor's mixture-of-experts load-balancing loss
    (scalar; ``None`` for dense blocks)."""

    context: list
    cond: list[torch.Tensor]
    balance: torch.Tensor | None


class JEPA(ContextTargetPair):
    """I-JEPA / z-JEPA with a probabilistic predictor head per level.

    ``forward`` returns the step's :class:`~prob_jepa.step.Predictions`; the loss (JIN eq. 9:
    ``Σ_l w_l · head_l.loss(cond_l, sg[target_l]) + λ1 · cross-scale (eq. 2-3) + λ_b · budget (eq. 10)``,
    + the Switch load-balancing loss when the predictor has experts, + SIGReg on the context tokens when set)
    is the term list of :func:`image_terms`, where targets are the layer-normed features of the EMA target
    encoder at the target units.

    Args:
        encoder: the context encoder; the target encoder is its copy.
        predictor: the :class:`Predictor` (over :class:`LevelTokens`) producing ``cond`` for every target token.
        heads: one head per predicted level (level l models ``D_l``-dimensional targets).
        predict_levels: the levels the predictor sees and predicts (default: all).
        cross_scale: eq. 2-3 predictors, or ``None``.
        sigreg: :class:`SIGReg` on the context encoder's last-level tokens (LeJEPA), or ``None``.
    """

    def __init__(
        self,
        encoder: HierarchicalEncoder,
        predictor: Predictor,
        heads: Sequence[Head],
        cross_scale: CrossScalePredictors | None = None,
        predict_levels: Sequence[int] | None = None,
        sigreg: SIGReg | None = None,
    ):
        super().__init__()
        self.predict_levels = list(range(encoder.levels)) if predict_levels is None else list(predict_levels)
        if len(heads) != len(self.predict_levels):
            raise ValueError(f"{len(heads)} heads for the predicted levels {self.predict_levels}")
        self.init_target(encoder)
        self.predictor = predictor
        self.heads = nn.ModuleList(heads)
        self.cross_scale = cross_scale
        self.sigreg = sigreg
        for level in range(self.levels):  # an output norm that no loss reads would get no gradient: freeze it
            if level not in self.read_levels:
                self.context_encoder.norms[level].requires_grad_(False)

    @property
    def read_levels(self) -> set[int]:
        """Levels whose context-encoder outputs some loss reads: the predicted ones, all for the
        cross-scale loss, the last for SIGReg."""
        read = set(self.predict_levels)
        if self.cross_scale is not None:
            read |= set(range(self.levels))
        if self.sigreg is not None:
            read.add(self.levels - 1)
        return read

    @property
    def levels(self) -> int:
        return self.context_encoder.levels

    def set_grad_checkpointing(self) -> None:
        """Recompute the context encoder's blocks in the backward pass instead of storing their activations."""
        self.context_encoder.set_grad_checkpointing()

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Layer-normed target-encoder features of all units, per level ``[B, U_all, T_l, D_l]``."""
        return [F.layer_norm(lv.features, lv.features.shape[-1:]) for lv in self.target_encoder(images)]

    def target_coords(self, targets: torch.Tensor) -> list[torch.Tensor]:
        """Target-unit indices ``[B, M, K]`` → per predicted level coords ``[B, M, K·T_l, 3]``."""
        return level_target_coords(self.context_encoder, self.predict_levels, targets)

    def gather_targets(self, target_all: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
        """Target features at the target units, per predicted level ``[B, M, N_l, D_l]`` (the order of ``cond``)."""
        return gather_level_targets(target_all, self.predict_levels, targets)

    def predict(self, images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor) -> Prediction:
        """The context levels and, per predicted level, ``cond [B, M, N_l, C]`` for the target units."""
        ctx = self.context_encoder(images, context)
        seen = [(ctx[l].features, ctx[l].coords) for l in self.predict_levels]
        cond, balance = self.predictor(seen, self.target_coords(targets))
        return Prediction(ctx, cond, balance)

    def forward(self, images: torch.Tensor, masks: Sequence[Masks]) -> Predictions:
        """One JEPA step's predictions: for each mask set and predicted level ``l``, ``cond [B, M·N_l, C]`` and the
        layer-normed target-encoder features at the target units ``[B, M·N_l, D_l]``; each set's context levels and
        their α (the target encoder runs once; each set encodes its own context, as V-JEPA's several masks).

        Args:
            images: ``[B, C, H, W]``.
            masks: one :class:`~prob_jepa.masks.Masks` per mask spec (``mask.image``): context unit indices
                ``[B, Kc]``, target unit indices ``[B, M, Kt]``.
        """
        target_all = self.target_features(images)
        predicted, hierarchies, balances = [], [], []
        for m in masks:
            ctx, cond, balance = self.predict(images, m.context, m.targets)
            ys = self.gather_targets(target_all, m.targets)
            predicted += [Predicted(f"jepa/level{l}", i, c.flatten(1, 2), y.flatten(1, 2))
                          for i, (l, c, y) in enumerate(zip(self.predict_levels, cond, ys))]
            hierarchies.append(ctx)
            balances.append(balance)
        balance = mean_over(balances) if balances[0] is not None else None
        return Predictions(predicted, {"level0": target_all[0]}, hierarchies=hierarchies, balance=balance)

    @torch.no_grad()
    def features(self, images: torch.Tensor, encoder: str = "target") -> torch.Tensor:
        """Frozen representation ``[B, D_L]``: average-pooled last-level tokens (I-JEPA probes the target encoder)."""
        enc = self.target_encoder if encoder == "target" else self.context_encoder
        return enc(images)[-1].features.mean(dim=(1, 2))


def level_target_coords(encoder: HierarchicalEncoder, levels: Sequence[int],
                        targets: torch.Tensor) -> list[torch.Tensor]:
    """Target-unit indices ``[B, M, K]`` → coords ``[B, M, K·T_l, 3]`` of their tokens at each of ``levels``
    (``encoder``'s grid: what the predictor's queries are placed at)."""
    B, M, _ = targets.shape
    return [encoder.coords(level, targets.flatten(1)).reshape(B, M, -1, 3) for level in levels]


def gather_level_targets(target_all: Sequence[torch.Tensor], levels: Sequence[int],
                         targets: torch.Tensor) -> list[torch.Tensor]:
    """Per level ``l`` of ``levels``, the features ``target_all[l] [B, U, T_l, D_l]`` of the target units
    ``targets [B, M, K]``: ``[B, M, K·T_l, D_l]`` (the order of the predictor's ``cond``)."""
    B, M, _ = targets.shape
    batch = torch.arange(B, device=targets.device)[:, None]
    return [target_all[level][batch, targets.flatten(1)].reshape(B, M, -1, target_all[level].shape[-1])
            for level in levels]


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
        ConfigError: ``{key}.moe_top_k`` is not between 1 and ``{key}.moe_experts`` (when experts are on).
    """
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


def build_level_predictor(cfg: DictConfig, encoder: HierarchicalEncoder) -> Predictor:
    """The predictor of ``cfg.model.predictor`` over the context levels of ``encoder`` that it predicts
    (:func:`level_config`'s ``predict_levels``), with ``model.*``'s spatial bias and dropout.

    Raises:
        ConfigError: ``model.predictor.moe_top_k`` out of range (:func:`check_experts`).
    """
    m, lv = cfg.model, level_config(cfg.model)
    p = m.predictor
    check_experts("model.predictor", p)
    return Predictor(
        LevelTokens([lv["dims"][l] for l in lv["predict_levels"]], p.dim, encoder.grid),
        depth=p.depth,
        num_heads=p.num_heads,
        mlp_ratio=p.mlp_ratio,
        spatial_bias=m.spatial_bias,
        bias_hidden=m.bias_hidden,
        bias_grid=encoder.grid,
        drop_path_rate=p.drop_path_rate,
        dropout=m.dropout,
        moe_experts=p.moe_experts,
        moe_top_k=p.moe_top_k,
    )


def build_level_heads(cfg: DictConfig) -> list[Head]:
    """One ``cfg.predictor`` head per predicted level (:func:`level_config`), for that level's width, under
    ``model.predictor.dim``-wide conditions."""
    lv = level_config(cfg.model)
    return [build_configured_head(cfg.predictor, dim=lv["dims"][l], cond_dim=cfg.model.predictor.dim)
            for l in lv["predict_levels"]]


def build_model(cfg: DictConfig) -> JEPA:
    """The JEPA of ``cfg.model`` (backbone, predictor) and ``cfg.predictor`` (head)."""
    m, lv = cfg.model, level_config(cfg.model)
    encoder = build_encoder(cfg)
    predictor = build_level_predictor(cfg, encoder)
    heads = build_level_heads(cfg)
    cross = CrossScalePredictors(lv["dims"]) if has_cross_scale(m) else None
    return JEPA(encoder, predictor, heads, cross_scale=cross, predict_levels=lv["predict_levels"],
                sigreg=SIGReg(m.sigreg_slices) if m.sigreg_weight > 0 else None)


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
    terms = [Term(f"jepa/level{l}", lv["level_weights"][l], jepa_term(f"jepa/level{l}")) for l in model.predict_levels]
    terms += hierarchy_terms(cfg, model)
    if m.predictor.moe_experts:
        terms.append(Term("moe_balance", m.predictor.moe_balance_weight, balance_term))
    return terms
