"""The hypermodal JEPA: within-modality, cross-modal and joint prediction plus energy / InfoNCE alignment."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jin.cross_scale import CrossScalePredictors
from jin.encoders import ModalityEncoder, Tokens, gather_tokens
from jin.hypermodal import HypermodalEncoder
from jin.layers import Stage

from ..ema import ContextTargetPair
from ..heads import Head
from ..masks import Masks
from ..model import gather_level_targets, level_target_coords
from ..predictor import Predictor, PredictorOutput
from ..regularizers import SIGReg
from ..step import Predicted, Predictions, mean_over
from .objectives import Task


def _legacy_head_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the model's head joined ``heads`` hold it at ``<prefix>head.*``; they load under
    ``<prefix>heads.0.*``."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}head.")]:
        state_dict[f"{prefix}heads.0.{key[len(prefix) + 5:]}"] = state_dict.pop(key)


SHARED_SPACE_KEYS = ("predictor.", "pred_proj.", "proj.", "align_norm.", "heads.0.")
SHARED_ENCODER_KEYS = ("stage.", "norm.", "modality_embed.", "modality_stages.")


def _legacy_shared_space_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints of one modality at its levels written before such a model dropped its shared space (1f0ad1c) hold
    one — modality table, shared blocks, projections, shared predictor and head (``heads.0``), alignment — that no
    loss trained: into a model without one they load without it, its level heads moving down to ``heads.0…``."""
    if module.context_encoder.shared_space or not any(k.startswith(f"{prefix}proj.") for k in state_dict):
        return
    dropped = [f"{prefix}{k}" for k in SHARED_SPACE_KEYS]
    dropped += [f"{prefix}{e}.{k}" for e in ("context_encoder", "target_encoder") for k in SHARED_ENCODER_KEYS]
    dropped += [f"{prefix}{e}.encoders.{m}.proj." for e in ("context_encoder", "target_encoder")
                for m in module.modalities]
    for key in [k for k in state_dict if k.startswith(tuple(dropped))]:
        del state_dict[key]
    heads = f"{prefix}heads."
    for key in sorted((k for k in state_dict if k.startswith(heads)), key=lambda k: int(k[len(heads):].split(".")[0])):
        index, rest = key[len(heads):].split(".", 1)
        state_dict[f"{heads}{int(index) - 1}.{rest}"] = state_dict.pop(key)


class HypermodalJEPA(ContextTargetPair):
    """JEPA over several modalities in one embedding space (JIN's hypermodal space, Jin's joint space).

    ``forward`` returns the step's :class:`~prob_jepa.step.Predictions`: for every task ``τ``
    (:func:`~prob_jepa.hypermodal.objectives.plan_tasks`) ``cond_τ`` and the layer-normed EMA target-encoder
    tokens at the masked positions, and, when the step aligns, ``z_m``: the projected mean of modality ``m``'s
    context tokens (masked views, as FLIP trains CLIP), standardized per modality by a batch norm before the
    projection. With hierarchical modality encoders their levels and α ride along (``Predictions.hierarchies``).
    The loss is the term list of :func:`~prob_jepa.hypermodal.objectives.hypermodal_terms`::

        Σ_kind w_kind · mean_{τ of kind} head.loss(cond_τ, sg[target_τ])
        + λ2 · mean_pairs energy_loss(z_a, z_b) + w_nce · mean_pairs InfoNCE(z_a, z_b)
        (+ the hierarchy's cross-scale, budget and SIGReg terms, + the experts' balance, when the model has them)

    and, for M3 tasks (:func:`~prob_jepa.hypermodal.objectives.m3_tasks`), M3-JEPA's
    ``(1 − α)·InfoNCE(pred, target) + α·head loss`` on each predicted modality, with the pooled prediction and
    target projected into the alignment space (``pred_proj``, ``proj``) and standardized.

    Args:
        encoder: the context encoder (the target encoder is its EMA copy).
        predictor: the shared :class:`Predictor` over :class:`ModalityTokens`; head: one head for every
            modality's ``D``-dim tokens (``heads[0]``). Both ``None`` for an encoder without a shared space (its one
            modality predicts its levels: ``level_predictors``), which has no alignment either.
        embed_dim: width of the alignment space.
        m3: the model trains M3 tasks (adds the projection of pooled predictions).
        cross_scale, sigreg: JIN's cross-scale predictors (eq. 2-3) and SIGReg over the levels of the hierarchical
            modality encoders (:class:`~jin.encoders.HierarchicalModalityEncoder`: the image's, and audio's, video's
            or points' when they have one; each term averages over them), or ``None``.
        level_predictors: per hierarchical modality, a predictor over :class:`~prob_jepa.predictor.LevelTokens` of
            its encoder's levels ``predict_levels`` (``hypermodal.within_targets=levels``): that modality's
            within-modality JEPA is the image JEPA's — its context levels predict the target encoder's levels at
            their own widths (one head of ``level_heads[m]`` per level, weighted by ``level_weights``, normalized),
            not the shared-space tokens; the shared space then serves the cross-modal and joint tasks and the
            alignment. A modality without one (flat encoders, one added by :meth:`add_modality`) predicts its own
            shared-space tokens.
    """

    def __init__(self, encoder: HypermodalEncoder, predictor: Predictor | None, head: Head | None, embed_dim: int,
                 m3: bool = False, cross_scale: CrossScalePredictors | None = None, sigreg: SIGReg | None = None,
                 level_predictors: Mapping[str, Predictor] | None = None,
                 level_heads: Mapping[str, Sequence[Head]] | None = None, predict_levels: Sequence[int] = (),
                 level_weights: Sequence[float] = ()):
        super().__init__()
        if (predictor is None or head is None) == encoder.shared_space:
            raise ValueError("a shared predictor and head exactly when the encoder has a shared space")
        self.init_target(encoder)
        self.predictor = predictor
        self.heads = nn.ModuleList([head] if head is not None else [])
        self.level_predictors = nn.ModuleDict(level_predictors or {})
        self.predict_levels = list(predict_levels)
        total = sum(float(level_weights[level]) for level in self.predict_levels) if self.level_predictors else 1.0
        self.level_shares = [float(level_weights[level]) / total for level in self.predict_levels]
        self.level_heads: dict[str, list[int]] = {}  # modality → the indices of its level heads in ``heads``
        for name in self.level_predictors:
            if len(level_heads[name]) != len(self.predict_levels):
                raise ValueError(f"{len(level_heads[name])} level heads of {name!r} for the levels "
                                 f"{self.predict_levels}")
            self.level_heads[name] = list(range(len(self.heads), len(self.heads) + len(self.predict_levels)))
            self.heads.extend(level_heads[name])
        self.cross_scale, self.sigreg = cross_scale, sigreg
        self.register_load_state_dict_pre_hook(_legacy_head_keys)
        self.register_load_state_dict_pre_hook(_legacy_shared_space_keys)
        # Pooled features of one modality share a large common part (positions, modality embedding) that
        # would drown the per-scene differences the alignment needs: standardize them per modality first.
        shared = encoder.shared_space
        self.align_norm = nn.ModuleDict({m: nn.BatchNorm1d(encoder.dim, affine=False)
                                         for m in encoder.modalities if shared})
        self.proj = nn.Linear(encoder.dim, embed_dim) if shared else None
        # M3's contrastive term compares pooled predictions with pooled targets in the alignment space
        self.pred_proj = nn.Linear(predictor.dim, embed_dim) if m3 else None

    @property
    def modalities(self) -> list[str]:
        return self.context_encoder.modalities

    def add_modality(self, name: str, encoder: ModalityEncoder) -> list[nn.Parameter]:
        """Add a modality to the context and target encoders; returns the new trainable parameters.

        Every existing modality's outputs are unchanged, bit for bit. Give the returned
        parameters to the optimizer (``optimizer.add_param_group({"params": ...})``).

        Raises:
            ValueError: the model has no shared space (one modality trained at its levels alone).
        """
        if not self.context_encoder.shared_space:
            raise ValueError(f"modality {name!r}: this model has no shared space for it to meet "
                             f"{', '.join(self.modalities)} in (it was trained on {', '.join(self.modalities)} alone "
                             f"at its levels, hypermodal.within_targets=levels)")
        target_copy = copy.deepcopy(encoder).requires_grad_(False).eval()
        new = self.context_encoder.add_modality(name, encoder)
        # without shared blocks the modality has blocks of its own: the target's start as a frozen copy
        blocks = None if self.context_encoder.shared_blocks else copy.deepcopy(
            self.context_encoder.blocks(name)).requires_grad_(False).eval()
        self.target_encoder.add_modality(name, target_copy, blocks)
        self.target_encoder.modality_embed.rows[name].data.copy_(self.context_encoder.modality_embed(name).data)
        self.target_encoder.modality_embed.rows[name].requires_grad_(False)
        self.align_norm[name] = nn.BatchNorm1d(self.context_encoder.dim, affine=False)
        return new

    def set_grad_checkpointing(self) -> None:
        """Recompute every block (encoders, shared blocks, predictor) in the backward pass instead of storing its
        activations."""
        for module in self.modules():
            if isinstance(module, Stage):
                module.grad_checkpointing = True

    def unit_coords(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``[B, U, 3]`` coordinates of the mask units of ``x`` (what masks are drawn from)."""
        return self.context_encoder.unit_coords(name, x)

    def align(self, name: str, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]`` of modality ``name`` → alignment space ``[B, E]`` (not normalized)."""
        return self.proj(self.align_norm[name](pooled.float()))

    @torch.no_grad()
    def embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Alignment-space embedding of full inputs ``[B, E]`` (L2-normalized): retrieval uses it."""
        return F.normalize(self.align(name, self.context_encoder.pooled(name, x)), dim=-1)

    @torch.no_grad()
    def representations(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen representations of modality ``name``'s inputs, as I-JEPA probes the target encoder: ``name``, the
        mean shared-space token ``[B, D]`` (when the model has a shared space); for a hierarchical encoder also
        ``<name>/encoder``, the mean token of its coarsest level ``[B, D_L]`` (what the image JEPA's probe reads,
        :meth:`~prob_jepa.model.JEPA.features`)."""
        tokens = self.target_encoder.encode(name, x)
        out = {}
        if self.target_encoder.shared_space:
            out[name] = self.target_encoder.share(name, tokens).features.mean(1)
        if tokens.levels:
            out[f"{name}/encoder"] = tokens.levels[-1].features.mean((1, 2))
        return out

    def target_tokens(self, name: str, mask: Masks) -> torch.Tensor:
        """``[B, T]``: indices of the tokens of ``mask``'s target units among all tokens of modality ``name``."""
        return self.context_encoder.encoder(name).unit_tokens(mask.targets).flatten(1)

    def predict(self, context: Mapping[str, Tokens], coords: Mapping[str, torch.Tensor],
                masks: Mapping[str, Masks], tasks: Sequence[Task], gate: int) -> PredictorOutput:
        """``cond [B, T, P]`` of every task's target tokens (:meth:`target_tokens`), in one predictor pass, and its
        MoE balance loss."""
        names = list(context)
        device = next(iter(context.values())).features.device
        queries = []
        sources = torch.zeros(len(tasks), len(names), dtype=torch.bool, device=device)
        for t, task in enumerate(tasks):
            where = gather_tokens(coords[task.target], self.target_tokens(task.target, masks[task.target]))
            queries.append(Tokens(self.context_encoder.query(task.target, where), where))
            sources[t, [names.index(s) for s in task.sources]] = True
        return self.predictor(list(context.values()), queries, sources, gate=gate)

    def forward(self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, Sequence[Masks]],
                tasks: Sequence[Task], gate: int = 0, align: bool = True) -> Predictions:
        """One step's predictions.

        Args:
            inputs: ``{modality: batch}`` of the present modalities.
            masks: ``{modality: [Masks, …]}`` for the same modalities (the order is the context order), one per
                mask set: set ``s`` encodes every modality's context ``s`` and makes every task on its targets ``s``
                (V-JEPA's several masks of one input; the target encoder runs once).
            tasks: the predictions to make in each set (term ``jepa/<task.kind>``); align: the step aligns the
                modalities (``Predictions.pooled`` holds each modality's ``z [B, E]`` of its mean context token,
                averaged over the sets; empty otherwise).
            gate: the mixture-of-experts gate that routes this step's predictions.

        A modality's tokens pass the shared blocks only where a shared-space prediction or the alignment reads them
        (a within-modality task of a modality with a level predictor reads its encoder's levels).
        """
        names = list(masks)
        aligned = align and len(names) > 1
        level_tasks = [t for t in tasks if t.kind == "within" and t.target in self.level_predictors]
        shared_tasks = [t for t in tasks if t not in level_tasks]
        # what must pass the shared blocks: every modality without a level predictor (as before level predictors),
        # and a modality with one where a shared-space task or the alignment reads it
        sources = set(names) if aligned else {m for t in shared_tasks for m in t.sources}
        read = ({t.target for t in shared_tasks}, sources)
        shared = [{m for m in names if m not in self.level_predictors or m in r} for r in read]
        with torch.no_grad():
            encoded = {m: self.target_encoder.encode(m, inputs[m]) for m in names}
            full = {m: self.target_encoder.share(m, t) if m in shared[0] else t for m, t in encoded.items()}
        targets = {m: F.layer_norm(t.features, t.features.shape[-1:]) for m, t in full.items() if m in shared[0]}
        level_targets = {m: [F.layer_norm(lv.features, lv.features.shape[-1:]) for lv in full[m].levels]
                         for m in names if m in self.level_predictors}
        coords = {m: t.coords for m, t in full.items()}
        predicted, balances, hierarchies, means = [], [], [], {m: [] for m in names}
        for s in range(len(next(iter(masks.values())))):
            sets = {m: masks[m][s] for m in names}
            own = {m: self.context_encoder.encode(m, inputs[m], sets[m].context) for m in names}
            ctx = {m: self.context_encoder.share(m, t) for m, t in own.items() if m in shared[1]}
            if shared_tasks:  # a phase may make no prediction and train the alignment only
                conds, balance = self.predict(ctx, coords, sets, shared_tasks, gate)
                balances.append(balance)
                parts = {m: self.context_encoder.encoder(m).level_positions(sets[m].targets) for m in shared[0]}
                predicted += [
                    Predicted(f"jepa/{task.kind}", 0, cond,
                              gather_tokens(targets[task.target], self.target_tokens(task.target, sets[task.target])),
                              parts[task.target])
                    for task, cond in zip(shared_tasks, conds)
                ]
            for task in level_tasks:
                predictions, balance = self.predict_levels_of(task.target, own[task.target], sets[task.target],
                                                              level_targets[task.target])
                predicted += predictions
                balances.append(balance)
            hierarchies += [t.levels for t in own.values() if t.levels]
            for m, c in ctx.items():
                means[m].append(c.features.mean(1))
        pooled = {m: self.align(m, mean_over(z)) for m, z in means.items()} if aligned else {}
        balances = [b for b in balances if b is not None]
        # the collapse diagnostics: each modality's targets, a modality with a level predictor its top predicted level's
        diagnostics = {m: level_targets[m][self.predict_levels[-1]].flatten(1, 2) if m in level_targets else targets[m]
                       for m in names}
        return Predictions(predicted, diagnostics, hierarchies=hierarchies, pooled=pooled,
                           balance=mean_over(balances))

    def predict_levels_of(self, name: str, context: Tokens, mask: Masks,
                          target_levels: Sequence[torch.Tensor]) -> tuple[list[Predicted], torch.Tensor | None]:
        """Modality ``name``'s within-modality prediction at its levels (the image JEPA's, :class:`JEPA`): its context
        levels (``context.levels``) → ``cond [B, M·N_l, C]`` of every target token at each predicted level ``l``,
        against the layer-normed target-encoder levels ``target_levels[l] [B, U, T_l, D_l]`` at the target units;
        one :class:`Predicted` per level (term ``jepa/within``, its level's head and share of the weight), and the
        predictor's balance loss."""
        backbone = self.context_encoder.encoder(name).backbone
        seen = [(context.levels[level].features, context.levels[level].coords) for level in self.predict_levels]
        cond, balance = self.level_predictors[name](
            seen, level_target_coords(backbone, self.predict_levels, mask.targets))
        ys = gather_level_targets(target_levels, self.predict_levels, mask.targets)
        return [Predicted("jepa/within", head, c.flatten(1, 2), y.flatten(1, 2), weight=share)
                for head, share, c, y in zip(self.level_heads[name], self.level_shares, cond, ys)], balance
