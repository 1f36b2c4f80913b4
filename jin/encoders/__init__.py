"""Modality encoders: each turns raw input into tokens with coordinates (audio, text, video, points, images)."""
from .audio import AudioEncoder
from .base import ModalityEncoder, Tokens, gather_tokens
from .hierarchical import HierarchicalImageEncoder
from .image import ImageEncoder
from .points import PointEncoder, farthest_point_order, farthest_point_sample
from .text import TextEncoder
from .video import VideoEncoder

__all__ = [
    "AudioEncoder", "HierarchicalImageEncoder", "ImageEncoder", "ModalityEncoder", "PointEncoder", "TextEncoder",
    "Tokens", "VideoEncoder",
    "farthest_point_order", "farthest_point_sample", "gather_tokens",
]
