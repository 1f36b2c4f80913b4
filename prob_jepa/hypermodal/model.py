"""The hypermodal JEPA: within-modality, cross-modal and joint prediction plus energy / InfoNCE alignment."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jin.encoders import ModalityEncoder, Tokens, gather_tokens
from jin.hypermodal import HypermodalEncoder

from ..ema import ContextTargetPair
from ..heads import Head
from ..model import StepOutput
from ..predictor import Predictor, PredictorOutput
from .masks import ModalityMask
from .objectives import Task, energy_alignment, info_nce


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms: JEPA per task kind, λ2 (energy alignment), InfoNCE, M3's α, MoE balance."""

    within: float = 1.0
    cross: float = 1.0
    joint: float = 1.0
    energy: float = 0.1
    energy_margin: float = 1.0
    infonce: float = 1.0
    temperature: float = 0.07
    m3_alpha: float = 0.5
    balance: float = 0.01


def standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per feature over the batch ``[B, E]`` (a batch norm without running statistics)."""
    return (x - x.mean(0)) / (x.var(0, unbiased=False) + eps).sqrt()


class HypermodalJEPA(ContextTargetPair):
    """JEPA over several modalities in one embedding space (JIN's hypermodal space, Jin's joint space).

    Loss of a step with tasks ``τ`` (:func:`~prob_jepa.hypermodal.objectives.plan_tasks`)::

        Σ_kind w_kind · mean_{τ of kind} head.loss(cond_τ, sg[target_τ])
        + λ2 · mean_pairs energy_alignment(z_a, z_b) + w_nce · mean_pairs InfoNCE(z_a, z_b)

    where targets are the layer-normed EMA target-encoder tokens at the masked positions
    and ``z_m`` is the projected mean of modality ``m``'s context tokens (masked views,
    as FLIP trains CLIP), standardized per modality by a batch norm before the projection.
    M3 tasks (:func:`~prob_jepa.hypermodal.objectives.m3_tasks`) replace the JEPA sum by
    M3-JEPA's ``(1 − α)·InfoNCE(pred, target) + α·head loss`` on each predicted modality,
    with the pooled prediction and target projected into the alignment space and standardized.

    Args:
        encoder: the context encoder (the target encoder is its EMA copy).
        predictor: the shared :class:`Predictor` over :class:`ModalityTokens`; head: one head for every
            modality's ``D``-dim tokens.
        embed_dim: width of the alignment space.
        m3: the model trains M3 tasks (adds the projection of pooled predictions).
    """

    def __init__(self, encoder: HypermodalEncoder, predictor: Predictor, head: Head, embed_dim: int,
                 weights: LossWeights = LossWeights(), m3: bool = False):
        super().__init__()
        self.init_target(encoder)
        self.predictor, self.head, self.weights = predictor, head, weights
        # Pooled features of one modality share a large common part (positions, modality embedding) that
        # would drown the per-scene differences the alignment needs: standardize them per modality first.
        self.align_norm = nn.ModuleDict({m: nn.BatchNorm1d(encoder.dim, affine=False) for m in encoder.modalities})
        self.proj = nn.Linear(encoder.dim, embed_dim)
        # M3's contrastive term compares pooled predictions with pooled targets in the alignment space
        self.pred_proj = nn.Linear(predictor.dim, embed_dim) if m3 else None

    @property
    def modalities(self) -> list[str]:
        return self.context_encoder.modalities

    def add_modality(self, name: str, encoder: ModalityEncoder) -> list[nn.Parameter]:
        """Add a modality to the context and target encoders; returns the new trainable parameters.

        Every existing modality's outputs are unchanged, bit for bit. Give the returned
        parameters to the optimizer (``optimizer.add_param_group({"params": ...})``).
        """
        target_copy = copy.deepcopy(encoder).requires_grad_(False).eval()
        new = self.context_encoder.add_modality(name, encoder)
        self.target_encoder.add_modality(name, target_copy)
        self.target_encoder.modality_embed.rows[name].data.copy_(self.context_encoder.modality_embed(name).data)
        self.target_encoder.modality_embed.rows[name].requires_grad_(False)
        self.align_norm[name] = nn.BatchNorm1d(self.context_encoder.dim, affine=False)
        return new

    def token_coords(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.context_encoder.token_coords(name, x)

    def align(self, name: str, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]`` of modality ``name`` → alignment space ``[B, E]`` (not normalized)."""
        return self.proj(self.align_norm[name](pooled.float()))

    @torch.no_grad()
    def embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Alignment-space embedding of full inputs ``[B, E]`` (L2-normalized): retrieval uses it."""
        return F.normalize(self.align(name, self.context_encoder.pooled(name, x)), dim=-1)

    @torch.no_grad()
    def features(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Frozen representation ``[B, D]``: the target encoder's mean token (as I-JEPA probes)."""
        return self.target_encoder.pooled(name, x)

    def predict(self, context: Mapping[str, Tokens], coords: Mapping[str, torch.Tensor],
                masks: Mapping[str, ModalityMask], tasks: Sequence[Task], gate: int) -> PredictorOutput:
        """``cond [B, M·Kt, P]`` of every task's target tokens, in one predictor pass, and its MoE balance loss."""
        names = list(context)
        device = next(iter(context.values())).features.device
        queries = []
        sources = torch.zeros(len(tasks), len(names), dtype=torch.bool, device=device)
        for t, task in enumerate(tasks):
            where = gather_tokens(coords[task.target], masks[task.target].targets.flatten(1))
            queries.append(Tokens(self.context_encoder.query(task.target, where), where))
            sources[t, [names.index(s) for s in task.sources]] = True
        return self.predictor(list(context.values()), queries, sources, gate=gate)

    def forward(self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, ModalityMask],
                tasks: Sequence[Task], gate: int = 0, align: bool = True) -> StepOutput:
        """One step's loss.

        Args:
            inputs: ``{modality: batch}`` of the present modalities.
            masks: ``{modality: ModalityMask}`` for the same modalities (the order is the context order).
            tasks: the predictions to make; align: add the energy and InfoNCE terms.
            gate: the mixture-of-experts gate that routes this step's predictions.
        """
        w = self.weights
        names = list(masks)
        with torch.no_grad():
            full = {m: self.target_encoder(m, inputs[m]) for m in names}
        targets = {m: F.layer_norm(t.features, t.features.shape[-1:]) for m, t in full.items()}
        ctx = {m: self.context_encoder(m, inputs[m], masks[m].context) for m in names}

        terms: dict[str, torch.Tensor] = {}
        loss = next(iter(ctx.values())).features.new_zeros((), dtype=torch.float32)
        by_kind: dict[str, list[torch.Tensor]] = {}
        contrastive: list[torch.Tensor] = []
        balance = None
        if tasks:
            conds, balance = self.predict(ctx, {m: t.coords for m, t in full.items()}, masks, tasks, gate)
            for task, cond in zip(tasks, conds):
                y = gather_tokens(targets[task.target], masks[task.target].targets.flatten(1))
                by_kind.setdefault(task.kind, []).append(self.head(cond.flatten(0, 1), y.flatten(0, 1)))
                if task.kind == "m3":
                    if self.pred_proj is None:
                        raise ValueError("M3 tasks need a model built with m3=True (hypermodal.m3.enabled=true)")
                    pred, true = standardize(self.pred_proj(cond.mean(1))), standardize(self.proj(y.mean(1)))
                    contrastive.append(info_nce(pred, true, w.temperature))
        for kind, values in by_kind.items():
            term = torch.stack(values).mean()
            terms[f"jepa/{kind}"] = term
            if kind == "m3":
                nce = torch.stack(contrastive).mean()
                terms["m3/contrastive"] = nce
                loss = loss + (1 - w.m3_alpha) * nce + w.m3_alpha * term
            else:
                loss = loss + getattr(w, kind) * term
        if align and len(names) > 1:
            z = {m: self.align(m, c.features.mean(1)) for m, c in ctx.items()}
            pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
            energy = torch.stack([energy_alignment(z[a], z[b], w.energy_margin) for a, b in pairs]).mean()
            nce = torch.stack([info_nce(z[a], z[b], w.temperature) for a, b in pairs]).mean()
            terms.update(energy=energy, infonce=nce)
            loss = loss + w.energy * energy + w.infonce * nce
        if balance is not None:
            terms["moe_balance"] = balance
            loss = loss + w.balance * balance
        terms["loss"] = loss
        return StepOutput(loss, terms, targets[names[0]])
