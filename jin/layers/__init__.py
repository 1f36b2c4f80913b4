"""Reusable layers: coordinates, spatial bias, stages, mixture of experts."""
from .coords import grid_coords, sincos_embed, unit_layout
from .moe import MoEMLP
from .spatial_bias import SpatialBias
from .stage import AdaptiveStage, Stage, budget_loss

__all__ = ["AdaptiveStage", "MoEMLP", "SpatialBias", "Stage", "budget_loss", "grid_coords", "sincos_embed", "unit_layout"]
