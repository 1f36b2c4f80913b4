"""Build the hypermodal JEPA from the config (``experiment=hypermodal_shapes``)."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from jin.encoders import AudioEncoder, ImageEncoder, ModalityEncoder, PointEncoder, TextEncoder, VideoEncoder
from jin.hypermodal import HypermodalEncoder

from ..config import ConfigError
from ..model import build_configured_head, check_experts, check_heads
from ..predictor import ModalityTokens, Predictor
from .model import HypermodalJEPA


def _image(h: DictConfig, data: DictConfig, **block) -> ModalityEncoder:
    return ImageEncoder(data.image_size, h.image.patch_size, **block)


def _audio(h: DictConfig, data: DictConfig, **block) -> ModalityEncoder:
    return AudioEncoder(data.n_mels, data.audio_frames, tuple(h.audio.patch), **block)


def _text(h: DictConfig, data: DictConfig, **block) -> ModalityEncoder:
    from ..data.multimodal import load_tokenizer

    return TextEncoder(load_tokenizer().get_vocab_size(), data.text_length, causal=h.text.causal, **block)


def _video(h: DictConfig, data: DictConfig, **block) -> ModalityEncoder:
    return VideoEncoder(data.video_frames, data.video_size, tuple(h.video.tubelet),
                        temporal_levels=h.video.temporal_levels, **block)


def _points(h: DictConfig, data: DictConfig, **block) -> ModalityEncoder:
    return PointEncoder(h.points.num_groups, h.points.group_size, **block)


ENCODERS: dict[str, Callable[..., ModalityEncoder]] = {
    "image": _image, "audio": _audio, "text": _text, "video": _video, "points": _points,
}


def build_modality_encoder(name: str, cfg: DictConfig) -> ModalityEncoder:
    """The encoder of modality ``name`` as ``cfg.hypermodal`` and ``cfg.data`` size it."""
    if name not in ENCODERS:
        raise ValueError(f"unknown modality {name!r}; valid: {', '.join(ENCODERS)}")
    h = cfg.hypermodal
    return ENCODERS[name](h, cfg.data, dim=h.dim, depth=h.encoder_depth, num_heads=h.num_heads, mlp_ratio=h.mlp_ratio)


def build_hypermodal(cfg: DictConfig) -> HypermodalJEPA:
    """Encoders of ``cfg.hypermodal.modalities``, the shared blocks, predictor and ``cfg.predictor`` head.

    Raises:
        ConfigError: an invalid ``hypermodal.*`` value, or ``model.*`` / ``mask.*`` in the config (the hypermodal
            model does not read them, so a run's ``config.yaml`` must not claim them).
    """
    unread = [f"{key}.*" for key in ("model", "mask") if key in cfg]
    if unread:
        raise ConfigError(
            f"{' and '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read by the hypermodal model: its "
            f"encoders are sized by hypermodal.* (the image's by hypermodal.image.patch_size, hypermodal.dim, "
            f"hypermodal.encoder_depth) and its masks by hypermodal.mask.<modality>; leave model= and mask= out "
            f"(a hypermodal run saved before they were dropped holds them in its config.yaml, and was trained without "
            f"the spatial bias: this version cannot rebuild it)"
        )
    h = cfg.hypermodal
    check_heads("hypermodal.dim", h.dim, "hypermodal.num_heads", h.num_heads)
    check_heads("hypermodal.predictor.dim", h.predictor.dim, "hypermodal.predictor.num_heads", h.predictor.num_heads)
    if h.dim % 6:
        raise ConfigError(f"hypermodal.dim={h.dim} must be divisible by 6: sin-cos of three token coordinates")
    check_experts("hypermodal.predictor", h.predictor)
    if h.m3.enabled and not h.predictor.moe_experts:
        raise ConfigError(
            "hypermodal.m3.enabled=true routes each task through its own gate of a mixture of experts: "
            "set hypermodal.predictor.moe_experts > 0"
        )
    encoder = HypermodalEncoder(
        {m: build_modality_encoder(m, cfg) for m in h.modalities},
        h.dim, h.depth, h.num_heads, h.mlp_ratio, h.drop_path_rate, h.spatial_bias, h.bias_hidden, h.bias_grid,
    )
    p = h.predictor
    predictor = Predictor(
        ModalityTokens(h.dim, p.dim), p.depth, p.num_heads, p.mlp_ratio,
        spatial_bias=h.spatial_bias, bias_hidden=h.bias_hidden, bias_grid=h.bias_grid,
        moe_experts=p.moe_experts, moe_top_k=p.moe_top_k, num_gates=h.m3.gates if h.m3.enabled else 1,
    )
    head = build_configured_head(cfg.predictor, dim=h.dim, cond_dim=p.dim)
    return HypermodalJEPA(encoder, predictor, head, h.embed_dim, m3=h.m3.enabled)
