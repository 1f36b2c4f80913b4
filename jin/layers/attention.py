"""Attention with the JIN spatial bias and a token structure, dense (SDPA) or fused (FlexAttention).

An :class:`AttentionSpec` describes one stage's attention for a batch: the
JIN eq. 7-8 bias ``table[h, row(pos_i − pos_j, scale_i − scale_j)]`` and which
keys each query may see (task blocks, hidden tokens). Two equivalent masks are
built from it, once per stage forward, and passed to every block:

- :func:`dense_mask`: the additive float ``attn_mask [B, heads, N, N]`` of
  ``scaled_dot_product_attention`` — the reference, and the path on CPU, where
  FlexAttention has no backward.
- :func:`flex_mask`: a ``score_mod`` that computes each pair's table row from
  the two tokens' coordinates inside the kernel, and a ``BlockMask`` of the
  structure, for ``torch.compile``-d ``flex_attention`` on CUDA; no ``[N, N]``
  tensor is materialized.

:class:`SpatialAttention` is timm's ``Attention`` (same parameters, same
state dict) that takes either mask, or a plain tensor as before.

References:
    JIN eq. 7-8 (spatial bias); Dong et al., "Flex Attention: A Programming
    Model for Generating Optimized Attention Kernels" (arXiv:2412.05496).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from timm.layers.attention import Attention
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .precision import compute_dtype
from .spatial_bias import SpatialBias, gather_bias, offset_row

# The documented way to get the fused kernels; compiled lazily, on first call.
_flex_attention_compiled = torch.compile(flex_attention)
_create_block_mask_compiled = torch.compile(create_block_mask)


@dataclass(frozen=True)
class AttentionSpec:
    """One stage's attention for a batch of ``B`` sequences of ``N`` tokens.

    Query ``i`` attends key ``j`` iff ``group[j] == -1 or group[i] == group[j]``
    (or, with a ``reads`` table, iff ``reads[group[i], group[j]]``) and ``valid[j]``;
    the logit gets ``table[h, offset_row(coords_i − coords_j)]``.
    Every query must keep at least one key (SDPA returns NaN for a row with none,
    FlexAttention zeros).

    Args:
        coords: ``[B, N, 3]`` float32 ``(x, y, scale)`` (see :mod:`jin.layers.coords`), or
            ``None`` without spatial bias. A batch-broadcast tensor (stride 0) is computed once.
        table: ``[heads, rows]`` bias of every quantized offset (:meth:`SpatialBias.table`).
        grid, max_scale: the quantization of :func:`offset_row` (``SpatialBias.grid``, ``.max_scale``).
        group: ``[B or 1, N]`` int64: -1 = shared context, ``g ≥ 0`` = task block ``g``;
            ``None`` = no structure.
        valid: ``[B, N]`` bool, keys that exist (hidden tokens are ``False``); ``None`` = all.
        reads: ``[G, G]`` bool, which group (row) reads which (column), for groups ``0 … G−1`` (no -1);
            ``None`` = the rule above. The hypermodal predictor's tasks read chosen modalities' context.
    """

    coords: torch.Tensor | None
    table: torch.Tensor | None
    grid: int
    max_scale: int
    group: torch.Tensor | None
    valid: torch.Tensor | None
    reads: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        bias: SpatialBias | None,
        coords: torch.Tensor,
        group: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        reads: torch.Tensor | None = None,
    ) -> AttentionSpec:
        """The spec of a stage with spatial bias module ``bias`` (or ``None``); evaluates the bias MLP once."""
        if bias is None:
            return cls(None, None, 0, 0, group, valid, reads)
        return cls(coords.float(), bias.table(), bias.grid, bias.max_scale, group, valid, reads)


@dataclass(frozen=True)
class FlexMask:
    """What ``flex_attention`` takes for an :class:`AttentionSpec`; ``None`` fields mean no bias / no mask."""

    score_mod: Callable | None
    block_mask: BlockMask | None


def group_rule(reads: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Whether a query of group ``gq`` may read a key of group ``gk`` (tensors of any equal shape → bool):
    ``reads[gq, gk]`` with a table, else the shared-context rule ``gk == -1 or gq == gk``."""
    if reads is None:
        return lambda gq, gk: (gk == -1) | (gq == gk)
    return lambda gq, gk: reads[gq, gk]


def allowed(spec: AttentionSpec) -> torch.Tensor | None:
    """Structure as a bool ``[B or 1, 1, N, N]`` (query, key) of allowed pairs; ``None`` = all allowed."""
    ok = None
    if spec.group is not None:
        g = spec.group
        ok = group_rule(spec.reads)(g[:, :, None], g[:, None, :])[:, None]
    if spec.valid is not None:
        v = spec.valid[:, None, None, :]
        ok = v if ok is None else ok & v
    return ok


def dense_mask(spec: AttentionSpec, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive float mask for ``scaled_dot_product_attention``: bias + 0 / −inf structure.

    Returns ``[B, heads, N, N]`` (``[B or 1, 1, N, N]`` without bias; ``None``
    when the spec has neither bias nor structure) in ``dtype``, the dtype
    attention runs in. The bias is :func:`gather_bias`, as ``SpatialBias.forward``.
    """
    mask = None if spec.coords is None else gather_bias(spec.table, spec.coords, spec.grid, spec.max_scale)
    ok = allowed(spec)
    if ok is not None:
        mask = torch.where(ok, 0.0 if mask is None else mask, float("-inf"))
    return None if mask is None else mask.to(dtype)


def bias_score_mod(coords: torch.Tensor, table: torch.Tensor, grid: int, max_scale: int) -> Callable:
    """FlexAttention ``score_mod`` adding ``table[h, offset_row(coords[b, q] − coords[b, kv])]`` (JIN eq. 7-8)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        dx = coords[b, q_idx, 0] - coords[b, kv_idx, 0]
        dy = coords[b, q_idx, 1] - coords[b, kv_idx, 1]
        ds = coords[b, q_idx, 2] - coords[b, kv_idx, 2]
        return score + table[h, offset_row(dx, dy, ds, grid, max_scale)]

    return score_mod


def structure_mask_mod(
    group: torch.Tensor | None, valid: torch.Tensor | None, reads: torch.Tensor | None = None
) -> Callable:
    """FlexAttention ``mask_mod`` of :func:`allowed`; ``group`` ``[B or 1, N]``, ``valid`` ``[B, N]``, not both None;
    ``reads`` ``[G, G]`` (with ``group``) or None."""
    if group is None:
        return lambda b, h, q_idx, kv_idx: valid[b, kv_idx]
    rule = group_rule(reads)
    if valid is None and group.shape[0] == 1:  # flex still calls it with every batch index of q
        shared = group[0]
        return lambda b, h, q_idx, kv_idx: rule(shared[q_idx], shared[kv_idx])
    group = group if valid is None else group.expand(valid.shape[0], -1)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = rule(group[b, q_idx], group[b, kv_idx])
        return ok if valid is None else ok & valid[b, kv_idx]

    return mask_mod


def flex_mask(spec: AttentionSpec) -> FlexMask:
    """The :class:`FlexMask` of ``spec``; the block mask is built here, once (compiled on CUDA)."""
    score_mod = None
    if spec.coords is not None:
        score_mod = bias_score_mod(spec.coords, spec.table, spec.grid, spec.max_scale)
    if spec.group is None and spec.valid is None:
        return FlexMask(score_mod, None)
    ref = spec.valid if spec.valid is not None else spec.group  # its batch: B, or 1 for a shared structure
    (batch, n), device = ref.shape, ref.device
    build = _create_block_mask_compiled if device.type == "cuda" else create_block_mask
    block_mask = build(structure_mask_mod(spec.group, spec.valid, spec.reads), batch, None, n, n, device=device)
    return FlexMask(score_mod, block_mask)


def prepare_mask(spec: AttentionSpec, x: torch.Tensor) -> FlexMask | torch.Tensor | None:
    """The mask every block of a stage gets: a :class:`FlexMask` on CUDA, else the :func:`dense_mask`.

    Call once per stage forward; ``x`` (``[B, N, D]``) gives the device and dtype.
    """
    if x.device.type == "cuda":
        return flex_mask(spec)
    return dense_mask(spec, compute_dtype(x))


class SpatialAttention(Attention):
    """timm's ``Attention`` whose ``attn_mask`` may be a tensor, an :class:`AttentionSpec` or a :class:`FlexMask`.

    A tensor or ``None`` runs timm's forward unchanged (SDPA); a spec is turned
    into its mask by :func:`prepare_mask` (per call: a stage should prepare it
    once and pass the result to every block); a :class:`FlexMask` runs
    ``flex_attention``, compiled on CUDA and the unfused reference elsewhere
    (forward only: FlexAttention has no CPU backward). Parameters and state
    dict are timm's: use as ``Block(..., attn_layer=SpatialAttention)``.
    """

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | AttentionSpec | FlexMask | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x: ``[B, N, D]`` → ``[B, N, D]``."""
        if isinstance(attn_mask, AttentionSpec):
            attn_mask = prepare_mask(attn_mask, x)
        if not isinstance(attn_mask, FlexMask):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal or (self.training and self.attn_drop.p > 0):
            raise NotImplementedError("FlexAttention path: no is_causal, no attention dropout")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dtype = compute_dtype(x)  # flex has no autocast rule; SDPA would cast q, k, v alike
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        attend = _flex_attention_compiled if x.device.type == "cuda" else flex_attention
        x = attend(q, k, v, score_mod=attn_mask.score_mod, block_mask=attn_mask.block_mask, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
