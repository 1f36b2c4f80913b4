"""Build the hypermodal JEPA from the config (``experiment=hypermodal_shapes``, JIN's hierarchical image encoder, and
audio, video and points through the hierarchy too when ``hypermodal.hierarchy.modalities`` lists them;
``experiment=hypermodal_flat``, a flat patch encoder for images)."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from jin import HierarchicalEncoder
from jin.cross_scale import CrossScalePredictors
from jin.encoders import (
    AudioEncoder, ClipStem, HierarchicalModalityEncoder, ImageEncoder, ModalityEncoder, PillarStem, PointEncoder,
    SpectrogramStem, TextEncoder, VideoEncoder, pillar_occupancy,
)
from jin.hypermodal import HypermodalEncoder

from ..config import ConfigError
from ..model import (
    build_configured_head, build_encoder, build_level_heads, build_predictor, check_experts, check_heads,
    check_predicted_weights, encoder_kwargs, has_cross_scale, level_config, level_tokens, predicted_levels, read_levels,
)
from ..predictor import SHARED, ModalityTokens, Predictor, TaskTokens
from ..regularizers import SIGReg
from ..jepa import JEPA


def _image(cfg: DictConfig, **block) -> ModalityEncoder:
    h = cfg.hypermodal
    if h.image.backbone is None:
        return ImageEncoder(cfg.data.image_size, h.image.patch_size, **block)
    encoder = build_encoder(cfg)  # model.* of the composed preset
    return HierarchicalModalityEncoder(encoder, block["dim"], levels=h.image.levels, read_levels=_read_levels(cfg))


def _read_levels(cfg: DictConfig) -> set[int]:
    """:func:`~prob_jepa.model.read_levels` of a hypermodal run's hierarchies (the predicted levels with
    ``hypermodal.within_targets=levels``)."""
    return read_levels(cfg.model, predicted=cfg.hypermodal.within_targets == "levels")


STEMS: dict[str, Callable[[DictConfig, int, int], nn.Module]] = {
    "audio": lambda cfg, grid, dim: SpectrogramStem(cfg.data.n_mels, cfg.data.audio_frames, grid, dim),
    "video": lambda cfg, grid, dim: ClipStem(cfg.data.video_frames, cfg.data.video_size,
                                             cfg.hypermodal.video.tubelet[0], grid, dim,
                                             slices=hierarchy_slices("video", cfg)),
    "points": lambda cfg, grid, dim: PillarStem(grid, dim, slices=hierarchy_slices("points", cfg)),
}
# per modality, the key hypermodal.<modality>.<key> of how many levels of its hierarchy differ in slices of a third axis
# (HierarchicalEncoder's slices), and what a slice is
SLICED_LEVELS = {"video": ("temporal_levels", "time steps"), "points": ("voxel_levels", "heights")}


def hierarchy_slices(name: str, cfg: DictConfig) -> int:
    """Level-0 slices of modality ``name``'s hierarchy: ``2^(n − 1)`` for ``n`` = its ``SLICED_LEVELS`` key
    (video: ``hypermodal.video.temporal_levels``, the temporal z-JEPA levels: time steps; points:
    ``hypermodal.points.voxel_levels``: height slices) when ``hypermodal.hierarchy.modalities`` lists it, else 1."""
    if name not in SLICED_LEVELS or name not in cfg.hypermodal.hierarchy.modalities:
        return 1
    return 2 ** (cfg.hypermodal[name][SLICED_LEVELS[name][0]] - 1)


# what of a stem's level-0 grid holds content, where not all of it does (a point cloud's empty pillars)
CELL_CONTENT: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"points": pillar_occupancy}


def _hierarchical(name: str, cfg: DictConfig, **block) -> ModalityEncoder:
    """Modality ``name`` through JIN's hierarchy (JIN §3.2.1: every encoder projects to the same dimensional
    hierarchy): ``model.*``'s widths, heads, attention, spatial bias and adaptive computation, its own stem over a
    ``hypermodal.hierarchy.grid``² level-0 grid and ``hypermodal.hierarchy.depths`` blocks per level; its coarsest
    level joins the shared space; target blocks hide the units with content (``CELL_CONTENT``)."""
    hierarchy = cfg.hypermodal.hierarchy
    kwargs = encoder_kwargs(cfg)
    grid = int(hierarchy.grid)
    kwargs.update(img_size=grid, patch_size=1, depths=[int(d) for d in hierarchy.depths], zoom_factors=[],
                  stem=STEMS[name](cfg, grid, kwargs["dims"][0]), slices=hierarchy_slices(name, cfg))
    content = functools.partial(CELL_CONTENT[name], grid=grid) if name in CELL_CONTENT else None
    return HierarchicalModalityEncoder(HierarchicalEncoder(**kwargs), block["dim"], read_levels=_read_levels(cfg),
                                       cell_content=content)


def _audio(cfg: DictConfig, **block) -> ModalityEncoder:
    return AudioEncoder(cfg.data.n_mels, cfg.data.audio_frames, tuple(cfg.hypermodal.audio.patch), **block)


def _text(cfg: DictConfig, **block) -> ModalityEncoder:
    from ..data.multimodal import load_tokenizer

    return TextEncoder(load_tokenizer().get_vocab_size(), cfg.data.text_length, causal=cfg.hypermodal.text.causal,
                       **block)


def _video(cfg: DictConfig, **block) -> ModalityEncoder:
    v = cfg.hypermodal.video
    return VideoEncoder(cfg.data.video_frames, cfg.data.video_size, tuple(v.tubelet), temporal_levels=v.temporal_levels,
                        **block)


def _points(cfg: DictConfig, **block) -> ModalityEncoder:
    p = cfg.hypermodal.points
    return PointEncoder(p.num_groups, p.group_size, **block)


ENCODERS: dict[str, Callable[..., ModalityEncoder]] = {
    "image": _image, "audio": _audio, "text": _text, "video": _video, "points": _points,
}


def build_modality_encoder(name: str, cfg: DictConfig) -> ModalityEncoder:
    """The encoder of modality ``name`` as ``cfg.hypermodal`` and ``cfg.data`` size it (the image's hierarchical
    encoder as ``cfg.model`` does, when ``hypermodal.image.backbone`` names it; audio's, video's or points' when
    ``hypermodal.hierarchy.modalities`` lists them)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown modality {name!r}; valid: {', '.join(ENCODERS)}")
    h = cfg.hypermodal
    build = functools.partial(_hierarchical, name) if name in h.hierarchy.modalities else ENCODERS[name]
    dim = h.dim if has_shared_space(cfg) else None
    return build(cfg, dim=dim, depth=h.encoder_depth, num_heads=h.num_heads, mlp_ratio=h.mlp_ratio)


def has_shared_space(cfg: DictConfig) -> bool:
    """Whether some loss of the run reads the shared space. Not when the run's one modality is hierarchical and its
    within-modality JEPA predicts its levels (``hypermodal.within_targets=levels``): nothing is predicted across
    modalities or aligned, so the model has no modality table, shared blocks, shared predictor and head, or alignment
    projection — its modules are the image JEPA's (:func:`~prob_jepa.model.build_model`), built in the same order."""
    h = cfg.hypermodal
    names = list(h.modalities)
    hierarchical = set(h.hierarchy.modalities) | ({"image"} if h.image.backbone is not None else set())
    return not (h.within_targets == "levels" and len(names) == 1 and names[0] in hierarchical)


def check_modalities(cfg: DictConfig) -> None:
    """``data.modalities`` (which ``hypermodal.modalities`` reads) is a non-empty list of distinct known modalities,
    and a single modality has a loss: it trains the within-modality JEPA only (nothing to align, predict across or
    route through M3's directional gates).

    Raises:
        ConfigError: naming ``data.modalities`` and, for one modality, ``hypermodal.objectives.within`` /
            ``hypermodal.m3.enabled``.
    """
    names = list(cfg.hypermodal.modalities)
    unknown = [n for n in names if n not in ENCODERS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"data.modalities={names} must list distinct modalities, at least one, of: "
                          f"{', '.join(ENCODERS)}")
    if len(names) == 1:
        h = cfg.hypermodal
        if h.m3.enabled:
            raise ConfigError(f"hypermodal.m3.enabled=true with data.modalities={names}: M3's tasks predict one "
                              f"modality from another; give two modalities or more")
        if not h.objectives.within > 0:
            raise ConfigError(f"hypermodal.objectives.within={h.objectives.within} with data.modalities={names}: one "
                              f"modality trains the within-modality JEPA only, so it needs a positive weight")


WITHIN_TARGETS = ("shared", "levels")


def check_within_targets(cfg: DictConfig) -> None:
    """``hypermodal.within_targets``: ``shared`` (a within-modality prediction targets the modality's shared-space
    tokens) or ``levels`` (a hierarchical modality's targets its encoder's levels, as the image JEPA's do), and
    ``levels`` only with a hierarchy to predict.

    Raises:
        ConfigError: naming the key, the valid choices and, for ``levels`` without a hierarchy, the preset that has one.
    """
    h = cfg.hypermodal
    if h.within_targets not in WITHIN_TARGETS:
        raise ConfigError(f"hypermodal.within_targets={h.within_targets!r}; valid: {', '.join(WITHIN_TARGETS)}")
    if h.within_targets == "levels" and h.image.backbone is None:
        raise ConfigError("hypermodal.within_targets=levels predicts a hierarchical encoder's levels, and this run has "
                          "none (hypermodal.image.backbone=null): use experiment=hypermodal_shapes")


def check_composition(cfg: DictConfig) -> None:
    """``model.*`` is composed exactly when ``hypermodal.image.backbone`` names it, so a run's ``config.yaml`` claims
    only what it trained.

    Raises:
        ConfigError: naming the keys.
    """
    backbone, model = cfg.hypermodal.image.backbone, cfg.get("model")
    if model is not None and backbone is None:
        raise ConfigError(
            "model.* is not read by the hypermodal model: its image encoder is the flat patch encoder "
            "(hypermodal.image.patch_size, hypermodal.dim, hypermodal.encoder_depth) while hypermodal.image.backbone "
            "is null; experiment=hypermodal_shapes sets it to JIN's hierarchical encoder (model=…). Leave it out. (A "
            "run saved before hypermodal configs dropped it holds it in its config.yaml and was trained without the "
            "spatial bias: this version cannot rebuild it.)"
        )
    hierarchical = list(cfg.hypermodal.hierarchy.modalities)
    if backbone is None:
        if cfg.hypermodal.image.levels is not None:
            raise ConfigError(f"hypermodal.image.levels={cfg.hypermodal.image.levels} needs JIN's image encoder "
                              f"(hypermodal.image.backbone; experiment=hypermodal_shapes): the flat encoder has one")
        if hierarchical:
            raise ConfigError(f"hypermodal.hierarchy.modalities={hierarchical} take JIN's hierarchy from model.*, "
                              f"which a run with hypermodal.image.backbone=null does not compose: "
                              f"use experiment=hypermodal_shapes")
        return
    if "image" not in cfg.hypermodal.modalities:
        raise ConfigError(f"hypermodal.image.backbone={backbone} (JIN's image encoder, experiment=hypermodal_shapes) "
                          f"but data.modalities={list(cfg.hypermodal.modalities)} has no image: add it, or use "
                          f"experiment=hypermodal_flat")
    if model is None or model.name != backbone:
        raise ConfigError(f"hypermodal.image.backbone={backbone} needs model={backbone} composed (it is "
                          f"{None if model is None else model.name}): "
                          f"experiment=hypermodal_shapes does both")
    if cfg.model.get("ablation") is not None:
        raise ConfigError(f"ablation={cfg.model.ablation} (model.ablation) rows are image runs: in a hypermodal run the "
                          f"experiment sets model.patch_size and hypermodal.spatial_bias; override those keys instead")
    if cfg.hypermodal.image.patch_size != cfg.model.patch_size:
        raise ConfigError(f"hypermodal.image.patch_size={cfg.hypermodal.image.patch_size} but the image encoder is "
                          f"model={backbone} with model.patch_size={cfg.model.patch_size}: set model.patch_size")
    lv = level_config(cfg.model)
    chosen, count = cfg.hypermodal.image.levels, len(lv["dims"])
    if chosen is not None and not (
        OmegaConf.is_list(chosen) and len(chosen) and all(type(level) is int and 0 <= level < count for level in chosen)
        and len(set(chosen)) == len(chosen)
    ):
        raise ConfigError(f"hypermodal.image.levels={chosen}: a list of distinct levels of model={backbone}'s "
                          f"{count} (0 … {count - 1}), e.g. [0, {count - 1}], or null for the coarsest")
    weights = lv["level_weights"]  # finite and >= 0 (level_config)
    if has_shared_space(cfg) and sum(weights[level] for level in chosen or [count - 1]) <= 0:
        levels = "null (the coarsest)" if chosen is None else list(chosen)
        raise ConfigError(f"model.level_weights={list(cfg.model.level_weights)}: finite numbers ≥ 0 whose sum over "
                          f"hypermodal.image.levels={levels} is positive (an image prediction's levels share its "
                          f"weight in proportion to them)")
    check_hierarchy(cfg, hierarchical, len(lv["dims"]))
    if cfg.hypermodal.within_targets == "levels":
        check_predicted_weights(cfg.model, " with hypermodal.within_targets=levels")
    if cfg.hypermodal.within_targets == "shared" and lv["predict_levels"] != [len(lv["dims"]) - 1]:
        raise ConfigError(
            f"model.predictor.levels={predicted_levels(cfg.model)}: with hypermodal.within_targets=shared the "
            f"levels the hypermodal model predicts are hypermodal.image.levels (model.predictor.levels is the image "
            f"JEPA's, and hypermodal.within_targets=levels reads it), so model.predictor.levels must be 1"
        )


def check_hierarchy(cfg: DictConfig, hierarchical: list, levels: int) -> None:
    """``hypermodal.hierarchy``: modalities that have a stem and take part, a depth per level, a level-0 grid that
    the levels merge and that divides each modality's input.

    Raises:
        ConfigError: naming the keys and the valid choices.
    """
    h = cfg.hypermodal
    bad = [m for m in hierarchical if m not in STEMS]
    if bad or len(set(hierarchical)) != len(hierarchical):
        raise ConfigError(f"hypermodal.hierarchy.modalities={hierarchical}: distinct modalities of {list(STEMS)} (the "
                          f"image's hierarchy is hypermodal.image.backbone; text has none: JIN §3.2.1 encodes it with a "
                          f"causal transformer)")
    absent = [m for m in hierarchical if m not in h.modalities]
    if absent:
        raise ConfigError(f"hypermodal.hierarchy.modalities lists {absent}, which hypermodal.modalities "
                          f"({list(h.modalities)}) does not")
    if not hierarchical:
        return
    depths = h.hierarchy.depths
    if not (OmegaConf.is_list(depths) and len(depths) == levels and all(type(d) is int and d >= 1 for d in depths)):
        raise ConfigError(f"hypermodal.hierarchy.depths={depths}: one block count ≥ 1 for each of model={h.image.backbone}"
                          f"'s {levels} levels")
    grid, unit, d = h.hierarchy.grid, 2 ** (levels - 1), cfg.data
    sides = {"audio": (d.n_mels, d.audio_frames), "video": (d.video_size,), "points": ()}
    if type(grid) is not int or grid < unit or grid % unit or any(side % grid for m in hierarchical for side in sides[m]):
        divides = [f"{m}'s {sides[m]}" for m in hierarchical if sides[m]]
        raise ConfigError(
            f"hypermodal.hierarchy.grid={grid}: a multiple of {unit} (the {levels} levels' mask unit)"
            + (f" that divides {', '.join(divides)} (data.n_mels, data.audio_frames, data.video_size)" if divides else "")
        )
    for name in hierarchical:
        if name in SLICED_LEVELS:
            key = SLICED_LEVELS[name][0]
            n = h[name][key]
            if type(n) is not int or not 1 <= n <= levels:
                raise ConfigError(f"hypermodal.{name}.{key}={n}: how many of model={h.image.backbone}'s {levels} "
                                  f"levels of the {name} hierarchy differ in slices (level 0 has 2^({key}-1), each "
                                  f"merge halves them), 1 … {levels}")
    if "video" not in hierarchical:
        return
    pt, temporal = h.video.tubelet[0], h.video.temporal_levels
    if type(pt) is not int or pt < 1:
        raise ConfigError(f"hypermodal.video.tubelet[0]={pt}: frames per tubelet, a positive integer")
    if d.video_frames % (pt * 2 ** (temporal - 1)):
        raise ConfigError(f"hypermodal.video.tubelet[0]={pt} frames × {2 ** (temporal - 1)} time step(s) "
                          f"(2^(hypermodal.video.temporal_levels-1)) must divide data.video_frames={d.video_frames}")


def build_hypermodal(cfg: DictConfig) -> JEPA:
    """Encoders of ``cfg.hypermodal.modalities``, the shared blocks, predictor and ``cfg.predictor`` head.

    Raises:
        ConfigError: an invalid ``hypermodal.*`` value or modality list (:func:`check_modalities`), or a composition
            :func:`check_composition` rejects.
    """
    check_modalities(cfg)
    check_within_targets(cfg)
    check_composition(cfg)
    h = cfg.hypermodal
    check_heads("hypermodal.dim", h.dim, "hypermodal.num_heads", h.num_heads)
    predictor_key = "hypermodal.predictor" if h.image.backbone is None else "model.predictor"  # where it is set
    check_heads(f"{predictor_key}.dim", h.predictor.dim, f"{predictor_key}.num_heads", h.predictor.num_heads)
    if h.dim % 6:
        raise ConfigError(f"hypermodal.dim={h.dim} must be divisible by 6: sin-cos of three token coordinates")
    if not isinstance(h.shared_blocks, bool):
        raise ConfigError(f"hypermodal.shared_blocks={h.shared_blocks!r}: true (one set of blocks for every modality) or "
                          f"false (each modality its own: late fusion)")
    check_experts(predictor_key, h.predictor)
    if h.points.voxel_levels != 1 and "points" not in h.hierarchy.modalities:
        raise ConfigError(f"hypermodal.points.voxel_levels={h.points.voxel_levels} shapes JIN's point hierarchy, and "
                          f"hypermodal.hierarchy.modalities ({list(h.hierarchy.modalities)}) has no points: leave it 1 "
                          f"or list points (experiment=hypermodal_hierarchies)")
    if h.m3.enabled and not h.predictor.moe_experts:
        raise ConfigError(
            "hypermodal.m3.enabled=true routes each task through its own gate of a mixture of experts: "
            f"set {predictor_key}.moe_experts > 0"
        )
    shared = has_shared_space(cfg)
    alone = (f"this run has none (data.modalities={list(h.modalities)} alone with hypermodal.within_targets=levels "
             f"predicts its levels)")
    if not shared and h.image.levels is not None:
        raise ConfigError(f"hypermodal.image.levels={h.image.levels} puts image levels in the shared space, and "
                          f"{alone}: leave it null")
    if not shared and (h.ablation is not None or not h.shared_blocks):
        raise ConfigError(f"hypermodal.ablation={h.ablation}, hypermodal.shared_blocks={h.shared_blocks}: these rows "
                          f"change the shared space, and {alone}: leave them out")
    encoder = HypermodalEncoder(
        {m: build_modality_encoder(m, cfg) for m in h.modalities},
        h.dim if shared else None, h.depth, h.num_heads, h.mlp_ratio, h.drop_path_rate, h.spatial_bias,
        h.bias_hidden, h.bias_grid, shared_blocks=h.shared_blocks,
    )
    p = h.predictor
    gates = h.m3.gates if h.m3.enabled else 1
    parts = {SHARED: ModalityTokens(h.dim, p.dim)} if shared else {}
    hierarchies = level_hierarchies(cfg, encoder) if h.within_targets == "levels" else {}
    parts.update({m: level_tokens(cfg, backbone) for m, backbone in hierarchies.items()})
    if hierarchies:  # one pass over the shared space's tasks and the levels: model.predictor, as the image JEPA's
        if shared:
            check_one_pass(cfg)
        grid = max([b.grid for b in hierarchies.values()] + ([h.bias_grid] if shared else []))
        predictor = build_predictor(cfg, parts, bias_grid=grid, num_gates=gates)
    else:
        predictor = Predictor(
            TaskTokens(parts), p.depth, p.num_heads, p.mlp_ratio, spatial_bias=h.spatial_bias,
            bias_hidden=h.bias_hidden, bias_grid=h.bias_grid, drop_path_rate=p.drop_path_rate,
            moe_experts=p.moe_experts, moe_top_k=p.moe_top_k, num_gates=gates,
        )
    head = build_configured_head(cfg.predictor, dim=h.dim, cond_dim=p.dim) if shared else None
    # the image JEPA's order (build_model): predictor, heads, then the hierarchy's cross-scale predictors
    level_heads = {m: build_level_heads(cfg) for m in hierarchies}
    cross = sigreg = None
    if h.image.backbone is not None:  # JIN's hierarchy: its cross-scale predictors and SIGReg, as model.* sets them
        m = cfg.model
        slices = max(hierarchy_slices(name, cfg) for name in SLICED_LEVELS)
        cross = CrossScalePredictors(level_config(m)["dims"], slices=slices) if has_cross_scale(m) else None
        sigreg = SIGReg(m.sigreg_slices) if m.sigreg_weight > 0 else None
    return JEPA(encoder, predictor, head, h.embed_dim if shared else None, m3=h.m3.enabled, cross_scale=cross,
                sigreg=sigreg, level_heads=level_heads,
                predict_levels=level_config(cfg.model)["predict_levels"] if hierarchies else (),
                level_weights=level_config(cfg.model)["level_weights"] if hierarchies else ())


def check_one_pass(cfg: DictConfig) -> None:
    """One predictor makes the shared space's predictions and the levels' in one pass, so with both its spatial bias
    is one: ``model.spatial_bias`` / ``model.bias_hidden`` (the levels') and ``hypermodal.spatial_bias`` /
    ``hypermodal.bias_hidden`` (the shared space's) must agree.

    Raises:
        ConfigError: naming the keys that disagree.
    """
    h, m = cfg.hypermodal, cfg.model
    differ = [k for k in ("spatial_bias", "bias_hidden") if h[k] != m[k]]
    if differ:
        raise ConfigError(
            "hypermodal.within_targets=levels: one predictor pass predicts the levels and the shared space, so "
            + ", ".join(f"model.{k}={m[k]} and hypermodal.{k}={h[k]}" for k in differ) + " must agree"
        )


def level_hierarchies(cfg: DictConfig, encoder: HypermodalEncoder) -> dict[str, HierarchicalEncoder]:
    """Per hierarchical modality of ``encoder`` (``hypermodal.within_targets=levels``), its hierarchy, whose levels
    ``model.predictor.levels`` the model predicts (the predictor's part :func:`~prob_jepa.model.level_tokens`, one
    ``cfg.predictor`` head per predicted level).

    Raises:
        ConfigError: a predicted level has several slices (a clip's time steps, a cloud's heights), naming
            ``model.predictor.levels`` and the modality's key.
    """
    out = {}
    for name in encoder.modalities:
        modality = encoder.encoder(name)
        if not isinstance(modality, HierarchicalModalityEncoder):
            continue
        backbone = modality.backbone
        sliced = [level for level in level_config(cfg.model)["predict_levels"] if backbone.slices[level] > 1]
        if sliced:
            key, what = SLICED_LEVELS[name]
            raise ConfigError(f"model.predictor.levels={predicted_levels(cfg.model)} predicts level(s) "
                              f"{sliced} of the {name} hierarchy, which have several {what} "
                              f"(hypermodal.{name}.{key}): their tokens share (x, y, scale); predict fewer levels or "
                              f"lower hypermodal.{name}.{key}")
        out[name] = backbone
    return out
