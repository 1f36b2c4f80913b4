"""Reusable layers: coordinates, spatial bias, stages."""
from .coords import grid_coords, sincos_embed, unit_layout
from .spatial_bias import SpatialBias
from .stage import AdaptiveStage, Stage, budget_loss

__all__ = ["AdaptiveStage", "SpatialBias", "Stage", "budget_loss", "grid_coords", "sincos_embed", "unit_layout"]
