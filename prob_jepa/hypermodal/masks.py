"""Block masks for any modality, drawn from token coordinates."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

EMPTY_DISTANCE = 1e3  # added to an empty token's distance: beyond every weighted L∞ distance of coordinates in [0, 1]


class ModalityMask(NamedTuple):
    """context: ``[B, Kc]`` mask-unit indices; targets: ``[B, M, Kt]`` (M blocks of Kt units). A unit is a token, or a
    group of tokens (:meth:`~jin.encoders.ModalityEncoder.unit_tokens`)."""

    context: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device) -> "ModalityMask":
        return ModalityMask(self.context.to(device), self.targets.to(device))


def coordinate_block_masks(
    coords: torch.Tensor,
    weights: Sequence[float],
    num_targets: int,
    target_size: int,
    generator: torch.Generator,
    content: torch.Tensor | None = None,
) -> ModalityMask:
    """I-JEPA's multi-block masking for tokens that only have coordinates.

    Each of the ``M`` target blocks is the ``Kt`` tokens nearest to a random centre token
    under the weighted L∞ distance ``max_k w_k |c_k − c'_k|`` — a square patch of an
    image, a time-frequency rectangle of a spectrogram (A-JEPA), a span of text
    (``w = (1, 0, 0)``), a tube through a clip (``w = (1, 1, 0)`` on ``(x, y, t)``, V-JEPA)
    or a ball-like patch of a point cloud. The context is every other token, less a random
    few when blocks overlap, so that its size ``N − M·Kt`` is the same for every sample.
    Vectorized over the batch and the blocks.

    With ``content``, blocks hide what the input holds: centres are drawn among the tokens
    with content (> 0), and a block is the ``Kt`` tokens with content nearest its centre,
    empty ones only when fewer hold content (a point cloud's hierarchy over pillars, most
    of them empty, would otherwise hide empty space and predict the empty token).

    Args:
        coords: ``[B, N, 3]`` token coordinates.
        weights: per-axis distance weights (0 ignores an axis).
        content: ``[B, N]`` share of each token that holds content; ``None``: every token does, drawn as before
            this argument existed (a ``content`` of ones hides the same kind of blocks from other draws).
    Returns:
        :class:`ModalityMask` with context ``[B, N − M·Kt]`` (sorted) and targets ``[B, M, Kt]``.
    Raises:
        ValueError: blocks that leave no context; ``content`` of another shape than ``[B, N]``.
    """
    B, N, _ = coords.shape
    if num_targets * target_size >= N:
        raise ValueError(f"{num_targets} target blocks of {target_size} tokens leave no context among {N} tokens")
    if content is not None and content.shape != (B, N):
        raise ValueError(f"content of shape {list(content.shape)} for {B} inputs of {N} tokens: [B, N] = [{B}, {N}]")
    coords = coords.double().cpu()  # float64: the tie-breaking jitter below must not round away
    if content is None:
        centre = torch.randint(N, (B, num_targets), generator=generator)
    else:
        empty = content.cpu() <= 0
        chance = (~empty | empty.all(1, keepdim=True)).double()  # an input without content: any token
        centre = torch.multinomial(chance, num_targets, replacement=True, generator=generator)
    c = coords.gather(1, centre[..., None].expand(-1, -1, 3))  # [B, M, 3]
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    dist = ((coords[:, None] - c[:, :, None]).abs() * w).amax(-1)  # [B, M, N]
    # Random order among equidistant tokens, the same for tokens that differ only along an ignored axis
    # (a tube's frames), so a block of k·frames tokens is k whole tubes.
    seen = coords * (w > 0)
    direction = torch.rand(B, num_targets, 1, 3, generator=generator, dtype=torch.float64)
    jitter = ((seen[:, None] * direction).sum(-1) * 1e3).frac()
    dist = dist + 1e-6 * jitter
    if content is not None:
        dist = dist + EMPTY_DISTANCE * empty[:, None].double()  # every token with content is nearer
    targets = dist.topk(target_size, dim=-1, largest=False).indices
    hidden = torch.zeros(B, N).scatter_(1, targets.flatten(1), 1.0)
    score = torch.rand(B, N, generator=generator) + 2 * hidden  # hidden tokens rank last
    context = score.topk(N - num_targets * target_size, dim=1, largest=False).indices.sort(1).values
    return ModalityMask(context, targets)
