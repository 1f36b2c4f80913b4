"""JIN: hierarchical, spatially-aware JEPA backbone — nn.Modules only (no training, data or files)."""
from .encoder import HierarchicalEncoder, Level
from .zoom import AdaptiveZoom

__all__ = ["AdaptiveZoom", "HierarchicalEncoder", "Level"]
