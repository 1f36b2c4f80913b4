"""Scale robustness of a frozen representation (JIN Table 4): the probe fitted at 1× scores rescaled images."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from .representation import ProbeResult, extract_features, knn_accuracy


def rescale(images: torch.Tensor, factor: float) -> torch.Tensor:
    """The content of ``images [B, C, H, W]`` scaled by ``factor`` about the centre, at the same size ``[B, C, H, W]``.

    ``factor > 1`` magnifies: the central ``H / factor`` crop, resized up to ``H`` (the object larger, its edges
    cut). ``factor < 1`` shrinks: the whole image, resized down (antialiased) to ``H · factor`` and centred on a
    canvas of each image's mean border colour per channel (the object smaller, surrounded by its own background).
    Bilinear throughout; ``factor = 1`` returns ``images`` unchanged.

    Raises:
        ValueError: ``factor`` is not positive.
    """
    if factor <= 0:
        raise ValueError(f"scale factor {factor} must be positive")
    if factor == 1:
        return images
    H, W = images.shape[-2:]
    if factor > 1:
        crop = TF.center_crop(images, [max(1, round(H / factor)), max(1, round(W / factor))])
        return TF.resize(crop, [H, W], antialias=True)
    h, w = max(1, round(H * factor)), max(1, round(W * factor))
    small = TF.resize(images, [h, w], antialias=True)
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    canvas = border.mean(-1)[..., None, None].expand_as(images).clone()
    top, left = (H - h) // 2, (W - w) // 2
    canvas[..., top:top + h, left:left + w] = small
    return canvas


def scale_scores(
    encode: Callable[[torch.Tensor], torch.Tensor],
    probe: ProbeResult,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_set: Dataset,
    factors: Sequence[float],
    batch_size: int,
    device: torch.device,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    name: str = "",
) -> dict[str, dict[str, float]]:
    """Linear probe and k-NN accuracy of ``encode`` on ``val_set`` rescaled by each factor (:func:`rescale`, batch by
    batch as the features are extracted), with the probe fitted on unscaled training features and the k-NN bank of
    them (JIN Table 4 re-scores ImageNet at 0.5× / 1× / 2× the same way).

    Args:
        encode: images ``[B, C, H, W]`` → frozen features ``[B, D]``.
        probe: the :class:`ProbeResult` fitted at 1× on ``train_x [N, D]`` / ``train_y [N]``.
    Returns:
        ``{str(float(factor)): {"linear_probe", "knn"}}`` (keys such as ``"0.5"``, ``"2.0"``).
    """
    out: dict[str, dict[str, float]] = {}
    for factor in factors:
        vx, vy = extract_features(lambda x, f=factor: encode(rescale(x, f)), val_set, batch_size, device,
                                  f"{name} val features at {factor}x")
        out[str(float(factor))] = {
            "linear_probe": (probe.predict(vx).argmax(1) == vy).float().mean().item(),
            "knn": knn_accuracy(train_x, train_y, vx, vy, k=knn_k, temperature=knn_temperature),
        }
    return out
