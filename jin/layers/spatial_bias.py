"""Spatially-aware attention bias (JIN eq. 7-8)."""
from __future__ import annotations

import torch
from torch import nn


class SpatialBias(nn.Module):
    """Per-head attention bias from relative position and relative scale.

    ``B[b, h, i, j] = MLP(pos_i − pos_j, scale_i − scale_j)[h]`` (JIN eq. 7-8),
    added to the attention logits as the float ``attn_mask`` of
    ``scaled_dot_product_attention``. Offsets are measured in tokens of the
    finest grid and log-spaced as in Swin-V2's continuous position bias, so one
    MLP serves every level and every zoom view.

    The MLP is evaluated once per call on a table of every quantized offset —
    Δpos in half fine-token steps, Δscale in half octaves — and gathered per
    token pair. Tokens of any level sit on that lattice, so the bias is exact
    for grid tokens (zoom tokens are placed to within a quarter fine token) and
    costs a gather instead of an MLP per pair.

    Args:
        num_heads: attention heads (one bias map each).
        hidden: MLP width.
        grid: tokens per side of the finest grid (the unit of Δpos).
        max_scale_delta: largest |Δscale| (octaves) represented; larger ones are clamped.
    """

    def __init__(self, num_heads: int, hidden: int, grid: int, max_scale_delta: int = 4):
        super().__init__()
        self.grid, self.max_scale = grid, max_scale_delta
        # No output bias: a per-head constant shifts every logit of a query's row alike, which softmax ignores, so
        # it would get no gradient (exactly zero, up to rounding) and only drift with the optimizer's noise. It is
        # drawn and dropped rather than never built, so the generator, and every weight drawn after it, stays where
        # it was: a seed's initial weights are the ones the README's runs started from.
        out = nn.Linear(hidden, num_heads)
        out.bias = None
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), out)
        self.register_load_state_dict_pre_hook(_drop_output_bias)
        pos = torch.arange(-2 * grid, 2 * grid + 1, dtype=torch.float32) / 2  # fine tokens
        scale = torch.arange(-2 * max_scale_delta, 2 * max_scale_delta + 1, dtype=torch.float32) / 2
        dx, dy, ds = torch.meshgrid(pos, pos, scale, indexing="ij")
        logpos = lambda v: torch.sign(v) * torch.log2(1.0 + v.abs())  # noqa: E731
        self.register_buffer("offsets", torch.stack([logpos(dx), logpos(dy), ds], -1).reshape(-1, 3), persistent=False)

    def index(self, coords: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3]`` coords → ``[B, N, N]`` row of every pair's offset in the table."""
        return pair_rows(coords, self.grid, self.max_scale)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: ``[B, N, 3]`` (x, y, scale) → bias ``[B, heads, N, N]`` (:func:`gather_bias` of :meth:`table`)."""
        return gather_bias(self.table(), coords, self.grid, self.max_scale)

    def table(self) -> torch.Tensor:
        """The bias of every quantized offset, ``[heads, rows]``; a pair's row is :func:`offset_row` of its offset.

        ``forward`` gathers exactly this table with :meth:`index`; the fused
        attention of :mod:`jin.layers.attention` reads it per token pair instead.
        """
        return self.mlp(self.offsets).T


def _drop_output_bias(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the MLP lost its output bias hold ``<prefix>mlp.2.bias``; it shifted every logit
    of a row alike (no effect on attention), so it is dropped."""
    state_dict.pop(f"{prefix}mlp.2.bias", None)


def offset_row(dx: torch.Tensor, dy: torch.Tensor, ds: torch.Tensor, grid: int, max_scale: int) -> torch.Tensor:
    """Row of :meth:`SpatialBias.table` for the coordinate offset ``(dx, dy, ds)`` = query − key.

    The arithmetic of :meth:`SpatialBias.index`, one component at a time, so the
    same float32 operations give the same row whether the offsets are a dense
    ``[B, N, N]`` tensor or one token pair inside a FlexAttention ``score_mod``.

    Args:
        dx, dy: position offsets in image units (``[0, 1]`` spans the image), any equal shapes.
        ds: scale offset in octaves.
        grid: tokens per side of the finest grid (Δpos is quantized to half of its tokens).
        max_scale: largest |Δscale| (octaves) represented; Δscale is quantized to half octaves.
    Returns:
        int64 rows, the shape of ``dx``.
    """
    n_pos, n_scale = 4 * grid + 1, 4 * max_scale + 1
    qx = torch.round(dx * (2.0 * grid)).long().clamp(-2 * grid, 2 * grid) + 2 * grid
    qy = torch.round(dy * (2.0 * grid)).long().clamp(-2 * grid, 2 * grid) + 2 * grid
    qs = torch.round(ds * 2.0).long().clamp(-2 * max_scale, 2 * max_scale) + 2 * max_scale
    return (qx * n_pos + qy) * n_scale + qs


def pair_rows(coords: torch.Tensor, grid: int, max_scale: int) -> torch.Tensor:
    """``[B, N, 3]`` coords → ``[B, N, N]`` table row (:func:`offset_row`) of every query − key offset."""
    d = coords[:, :, None, :] - coords[:, None, :, :]
    return offset_row(d[..., 0], d[..., 1], d[..., 2], grid, max_scale)


def gather_bias(table: torch.Tensor, coords: torch.Tensor, grid: int, max_scale: int) -> torch.Tensor:
    """The bias of every token pair, ``[B, heads, N, N]``, gathered from ``table`` ``[heads, rows]``.

    A batch whose coordinates are one expanded tensor (every image the same,
    e.g. the target view) is gathered once and broadcast. ``index_select``, not
    ``table[:, rows]``: on CPU the backward of advanced indexing accumulates the
    many pairs that share a row in a varying order (the hypermodal predictor's
    bias gradients differed between two identical steps); ``index_add`` does not.
    """
    shared = coords.shape[0] > 1 and coords.stride(0) == 0
    rows = pair_rows(coords[:1] if shared else coords, grid, max_scale)
    bias = table.index_select(1, rows.flatten()).view(table.shape[0], *rows.shape).transpose(0, 1)
    return bias.expand(coords.shape[0], -1, -1, -1) if shared else bias
