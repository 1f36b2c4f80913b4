"""Modality encoders: each turns raw input into tokens with coordinates (audio, text, video, points, images), and the
stems that give audio, video and points JIN's hierarchy (:class:`HierarchicalModalityEncoder`)."""
from .audio import AudioEncoder, SpectrogramStem
from .base import ModalityEncoder, Tokens, gather_tokens
from .hierarchical import HierarchicalModalityEncoder
from .image import ImageEncoder
from .points import PillarStem, PointEncoder, farthest_point_order, farthest_point_sample, pillar_occupancy
from .text import TextEncoder
from .video import ClipStem, VideoEncoder

__all__ = [
    "AudioEncoder", "ClipStem", "HierarchicalModalityEncoder", "ImageEncoder", "ModalityEncoder", "PillarStem",
    "PointEncoder", "SpectrogramStem", "TextEncoder", "Tokens", "VideoEncoder",
    "farthest_point_order", "farthest_point_sample", "gather_tokens", "pillar_occupancy",
]
