"""The JEPA predictor: every prediction task of a step in one pass, kept apart by the attention mask.

One transformer (:class:`Predictor`) makes every prediction of a step. What it predicts is
told by how its sequence is made, a module of its own (a variant is a module, not a flag):

- :class:`LevelTokens` (a hierarchical modality at its levels: the image JEPA's): context tokens
  of every predicted level and one query per target token of every target block; a block's
  queries read the context and their own block.
- :class:`ModalityTokens` (the shared space): context tokens of every present modality and one
  query per target token of every task (sources → target modality); a modality's context reads
  its own context, a task's queries read the context of its sources and their own task.
- :class:`TaskTokens`: the model's parts of either kind by name (``"shared"``, or the modality
  predicted at its levels), laid side by side in one sequence, no part reading another's.

Either way the context is embedded once, no prediction sees another's answer, the JIN eq. 7-8
spatial bias runs over every token's coordinates, and the MLPs may be a (multi-gate) mixture of experts.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from jin.encoders import Tokens
from jin.layers import Experts, SpatialBias, Stage, drop_path_rates, sincos_embed
from jin.layers.init import init_weights


SHARED = "shared"  # the part of a model's predictor that predicts shared-space tokens (:class:`TaskTokens`)


class PredictorSequence(NamedTuple):
    """What the predictor's blocks run on: ``x [B, N, dim]`` (context first, then queries), ``coords [B, N, 3]``,
    attention ``group [1, N]`` and ``reads [G, G]`` or ``None`` (see :class:`~jin.layers.AttentionSpec`),
    ``num_context`` tokens, and the ``sizes`` of the query groups the output splits into; ``parts``: of a
    :class:`TaskTokens` sequence, each part's name and own sequence (``None`` otherwise)."""

    x: torch.Tensor
    coords: torch.Tensor
    group: torch.Tensor
    reads: torch.Tensor | None
    num_context: int
    sizes: list[int]
    parts: list[tuple[str, "PredictorSequence"]] | None = None


class PredictorOutput(NamedTuple):
    """``cond``: the conditioning vectors of every query group (``tokens.split``; ``{part: …}`` for
    :class:`TaskTokens`); ``balance``: the mean load-balancing loss of the mixture-of-experts blocks (scalar), ``None``
    for dense blocks."""

    cond: list[torch.Tensor] | dict[str, list[torch.Tensor]]
    balance: torch.Tensor | None


class LevelTokens(nn.Module):
    """The image predictor's sequence: context tokens of every level + one mask token per target token.

    Every context token of every level is projected to ``dim``; it and every query (the mask token)
    carry the sin-cos embedding of their (x, y) and a learned level embedding. Attention groups:
    -1 for the context (read by every token), ``m`` for block ``m``'s queries at every level (JIN:
    the predictor attends across levels), so target blocks stay independent, as in I-JEPA.

    Args:
        context_dims: encoder width per level; dim: predictor width.
        grid: tokens per side of the finest grid (position frequencies).
    """

    def __init__(self, context_dims: Sequence[int], dim: int, grid: int):
        super().__init__()
        self.dim, self.grid = dim, grid
        self.embed = nn.ModuleList(nn.Linear(d, dim) for d in context_dims)
        self.level_embed = nn.Parameter(torch.zeros(len(context_dims), dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def init_embeddings(self) -> None:
        trunc_normal_(self.level_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)

    def position(self, coords: torch.Tensor, level: int) -> torch.Tensor:
        return sincos_embed(coords[..., :2], self.dim, self.grid / 2) + self.level_embed[level]

    @staticmethod
    def task_groups(num_context: int, num_blocks: int, block_size: int) -> torch.Tensor:
        """``[1, N]`` attention groups: -1 for the context (seen by every token), ``m`` for block ``m``'s mask tokens,
        so context ↔ context and block m → context + block m (see :class:`~jin.layers.AttentionSpec`)."""
        blocks = torch.arange(num_blocks).repeat_interleave(block_size)
        return torch.cat([torch.full((num_context,), -1), blocks])[None]

    def sequence(
        self, context: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[torch.Tensor]
    ) -> PredictorSequence:
        """context: per level ``(features [B, U, T_l, D_l], coords [B, U, T_l, 3])``; targets: per level target
        coords ``[B, M, N_l, 3]`` (M blocks, N_l tokens per block)."""
        M = targets[0].shape[1]
        ctx = [self.embed[l](f.flatten(1, 2)) + self.position(c.flatten(1, 2), l) for l, (f, c) in enumerate(context)]
        ctx_coords = torch.cat([c.flatten(1, 2) for _, c in context], 1)
        sizes = [t.shape[2] for t in targets]
        queries = torch.cat([self.mask_token + self.position(t, l) for l, t in enumerate(targets)], 2)  # [B, M, ΣN, dim]
        x = torch.cat([torch.cat(ctx, 1), queries.flatten(1, 2).to(ctx[0].dtype)], 1)
        coords = torch.cat([ctx_coords, torch.cat(list(targets), 2).flatten(1, 2)], 1)
        num_ctx = ctx_coords.shape[1]
        group = self.task_groups(num_ctx, M, sum(sizes)).to(x.device)
        return PredictorSequence(x, coords, group, None, num_ctx, sizes)

    @staticmethod
    def reads_table(seq: PredictorSequence) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq``'s attention groups as ``(group [1, N] ≥ 0, reads [M + 1, M + 1])`` (:class:`TaskTokens` lays
        parts side by side this way): the context is group 0, read by every group; block ``m``'s queries group
        ``m + 1``, reading the context and their own block."""
        blocks = (seq.x.shape[1] - seq.num_context) // sum(seq.sizes)
        table = torch.eye(blocks + 1, dtype=torch.bool, device=seq.group.device)
        table[:, 0] = True
        return seq.group + 1, table

    def split(self, out: torch.Tensor, seq: PredictorSequence) -> list[torch.Tensor]:
        """Query outputs ``[B, M·ΣN_l, dim]`` → per level ``cond [B, M, N_l, dim]``."""
        return list(out.view(out.shape[0], -1, sum(seq.sizes), out.shape[-1]).split(seq.sizes, dim=2))


class ModalityTokens(nn.Module):
    """The hypermodal predictor's sequence: context tokens of every present modality + one query per target token
    of every task.

    Context tokens are projected from the shared width ``in_dim`` to ``dim``; a query is the mask token plus the
    projection of its target token's position and modality embedding. Attention groups: modality ``k``'s context
    reads its own context; task ``t``'s queries read the context of the task's sources and their own task.

    Args:
        in_dim: the encoder's width ``D``; dim: the predictor's width ``P``.
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.query_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def init_embeddings(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def reads(sources: torch.Tensor) -> torch.Tensor:
        """``sources [T, K]`` (which of K modalities each of T tasks reads) → ``[K + T, K + T]`` group table:
        groups ``0 … K−1`` are the modalities' context, ``K + t`` task ``t``'s queries."""
        T, K = sources.shape
        table = torch.eye(K + T, dtype=torch.bool, device=sources.device)
        table[K:, :K] = sources
        return table

    def sequence(
        self, context: Sequence[Tokens], queries: Sequence[Tokens], sources: torch.Tensor
    ) -> PredictorSequence:
        """context: per present modality ``Tokens([B, N_k, D], coords [B, N_k, 3])``; queries: per task the
        position + modality embeddings of its target tokens ``[B, Q_t, D]`` and their coords; sources ``[T, K]``."""
        device = sources.device
        ctx_sizes = [c.features.shape[1] for c in context]
        sizes = [q.features.shape[1] for q in queries]
        x = torch.cat([self.embed(torch.cat([c.features for c in context], 1)),
                       self.mask_token + self.query_embed(torch.cat([q.features for q in queries], 1))], 1)
        coords = torch.cat([c.coords for c in context] + [q.coords for q in queries], 1)
        K = len(context)
        group = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(ctx_sizes)]
                          + [torch.full((n,), K + t, device=device) for t, n in enumerate(sizes)])[None]
        return PredictorSequence(x, coords, group, self.reads(sources), sum(ctx_sizes), sizes)

    @staticmethod
    def reads_table(seq: PredictorSequence) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq``'s attention groups and their table ``(group [1, N], reads [K + T, K + T])``, as they are."""
        return seq.group, seq.reads

    def split(self, out: torch.Tensor, seq: PredictorSequence) -> list[torch.Tensor]:
        """Query outputs ``[B, ΣQ_t, dim]`` → per task ``cond [B, Q_t, dim]``."""
        return list(out.split(seq.sizes, dim=1))


class TaskTokens(nn.ModuleDict):
    """The predictor's sequence of a model's parts, by name: ``"shared"`` (:class:`ModalityTokens`, the shared space's
    tasks) and each modality predicted at its levels (:class:`LevelTokens`), side by side in one pass.

    ``sequence({part: args})`` takes the parts a step predicts (any of them, in any order), each with the arguments of
    its own ``sequence``: every part's context comes first, then every part's queries, and a part's tokens read only
    its own part's (its attention groups are renumbered after the previous parts'); ``split`` returns ``{part: the
    part's own split}``. One part's sequence is that part's, unchanged.

    Raises:
        ValueError: parts of different widths (one predictor has one width).
    """

    def __init__(self, parts: Mapping[str, LevelTokens | ModalityTokens]):
        super().__init__(parts)
        widths = {part.dim for part in parts.values()}
        if len(widths) != 1:
            raise ValueError(f"the parts {list(parts)} of one predictor must share its width; they have {widths}")
        self.dim = widths.pop()

    def init_embeddings(self) -> None:
        for part in self.values():
            part.init_embeddings()

    def sequence(self, inputs: Mapping[str, tuple]) -> PredictorSequence:
        """``{part: the arguments of its sequence}`` → one :class:`PredictorSequence` (``parts``: each part's own)."""
        seqs = [(name, self[name].sequence(*args)) for name, args in inputs.items()]
        if len(seqs) == 1:
            return seqs[0][1]._replace(parts=seqs)
        groups, tables, offset = [], [], 0
        for name, seq in seqs:
            group, reads = self[name].reads_table(seq)
            groups.append(group + offset)
            tables.append(reads)
            offset += reads.shape[0]
        own = [s for _, s in seqs]

        def side_by_side(parts: list[torch.Tensor]) -> torch.Tensor:  # every context, then every part's queries
            return torch.cat([t[:, :s.num_context] for t, s in zip(parts, own)]
                             + [t[:, s.num_context:] for t, s in zip(parts, own)], 1)

        return PredictorSequence(side_by_side([s.x for s in own]), side_by_side([s.coords for s in own]),
                                 side_by_side(groups), torch.block_diag(*tables), sum(s.num_context for s in own),
                                 [s.x.shape[1] - s.num_context for s in own], seqs)

    def split(self, out: torch.Tensor, seq: PredictorSequence) -> dict[str, list[torch.Tensor]]:
        """Query outputs → ``{part: its split}`` (each part's own ``split`` of its queries)."""
        if len(seq.parts) == 1:
            (name, own), = seq.parts
            return {name: self[name].split(out, own)}
        return {name: self[name].split(o, own) for (name, own), o in zip(seq.parts, out.split(seq.sizes, 1))}


class Predictor(nn.Module):
    """The JEPA predictor: ``depth`` blocks over the sequence that ``tokens`` makes, then a norm.

    ``forward(*inputs, gate=0)`` hands ``inputs`` to ``tokens.sequence``, runs the blocks with
    its attention groups (and the spatial bias over its coordinates) and returns a
    :class:`PredictorOutput`: ``tokens.split`` of the normed query outputs (the conditioning
    vectors ``cond`` of the head) and the routing's load-balancing loss.

    Args:
        tokens: :class:`TaskTokens` (a model's predictor), or one :class:`LevelTokens` or :class:`ModalityTokens`
            (its ``dim`` is the predictor's width).
        depth, num_heads, mlp_ratio: block shape.
        spatial_bias: add the JIN eq. 7-8 bias (``bias_hidden`` MLP width, ``bias_grid`` tokens per side of the
            finest grid: the unit of Δpos).
        drop_path_rate, dropout: regularization.
        moe_experts: > 0 turns every block's MLP into a top-``moe_top_k`` mixture of that many experts
            (:class:`~jin.layers.moe.MoEMLP`), routed by one of ``num_gates`` gates (M3-JEPA: one per task direction).

    Raises:
        ValueError: ``num_gates > 1`` without experts.
    """

    def __init__(
        self,
        tokens: TaskTokens | LevelTokens | ModalityTokens,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        spatial_bias: bool = False,
        bias_hidden: int = 16,
        bias_grid: int = 8,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        moe_experts: int = 0,
        moe_top_k: int = 2,
        num_gates: int = 1,
    ):
        super().__init__()
        if num_gates > 1 and not moe_experts:
            raise ValueError(f"num_gates={num_gates} needs a mixture of experts (predictor.moe_experts > 0)")
        self.tokens = tokens
        self.dim = dim = tokens.dim
        bias = SpatialBias(num_heads, bias_hidden, bias_grid) if spatial_bias else None
        experts = Experts(moe_experts, moe_top_k, num_gates) if moe_experts else None
        rates = drop_path_rates(drop_path_rate, depth)
        self.stage = Stage(dim, depth, num_heads, mlp_ratio, rates, bias, dropout, experts)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)
        tokens.init_embeddings()

    def forward(self, *inputs, gate: int = 0) -> PredictorOutput:
        """``cond`` of every query group (see ``tokens.split``) and the load-balancing loss, the mixture of experts
        routed by router ``gate``."""
        seq = self.tokens.sequence(*inputs)
        x, routing = self.stage.attend(seq.x, seq.coords, seq.group, reads=seq.reads, gate=gate)
        balance = torch.stack([r.balance for r in routing]).mean() if routing else None
        return PredictorOutput(self.tokens.split(self.norm(x[:, seq.num_context:]), seq), balance)
