"""Reusable layers: coordinates, spatial bias, attention, stages, mixture of experts."""
from .attention import AttentionSpec, FlexMask, SpatialAttention, dense_mask, flex_mask, prepare_mask
from .coords import grid_coords, sincos_embed, unit_layout
from .moe import Experts, MoEMLP, Routing
from .spatial_bias import SpatialBias
from .stage import AdaptiveStage, Stage, budget_loss, drop_path_rates

__all__ = [
    "AdaptiveStage", "AttentionSpec", "Experts", "FlexMask", "Routing", "SpatialAttention", "dense_mask", "flex_mask", "prepare_mask",
    "MoEMLP", "SpatialBias", "Stage", "budget_loss", "drop_path_rates", "grid_coords", "sincos_embed", "unit_layout",
]
