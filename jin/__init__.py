"""JIN: hierarchical, spatially-aware JEPA backbone — nn.Modules (no training or data) and the loader of an exported encoder."""
from .encoder import HierarchicalEncoder, Level
from .export import load_encoder
from .zoom import AdaptiveZoom

__all__ = ["AdaptiveZoom", "HierarchicalEncoder", "Level", "load_encoder"]
