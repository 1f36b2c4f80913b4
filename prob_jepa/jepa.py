"""The JEPA: modality encoders (JIN's hierarchical image encoder among them), an EMA target encoder, predictors and
probabilistic heads; with several modalities, the shared space they meet in (JIN's hypermodal space) and their
alignment. The image JEPA (I-JEPA / z-JEPA at JIN's levels) is its one-modality case; :class:`LevelJEPA` is the view
of one hierarchical modality at its levels that the image evaluation reads."""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jin import HierarchicalEncoder
from jin.cross_scale import CrossScalePredictors
from jin.encoder import Level
from jin.encoders import ModalityEncoder, Tokens, gather_tokens
from jin.hypermodal import HypermodalEncoder
from jin.layers import Stage

from .ema import ContextTargetPair
from .heads import Head
from .masks import Masks
from .predictor import SHARED, Predictor, PredictorOutput, TaskTokens
from .regularizers import SIGReg
from .step import Predicted, Predictions, Task, mean_over


def level_target_coords(encoder: HierarchicalEncoder, levels: Sequence[int],
                        targets: torch.Tensor) -> list[torch.Tensor]:
    """Target-unit indices ``[B, M, K]`` → coords ``[B, M, K·T_l, 3]`` of their tokens at each of ``levels``
    (``encoder``'s grid: what the predictor's queries are placed at)."""
    B, M, _ = targets.shape
    return [encoder.coords(level, targets.flatten(1)).reshape(B, M, -1, 3) for level in levels]


def gather_level_targets(target_all: Sequence[torch.Tensor], levels: Sequence[int],
                         targets: torch.Tensor) -> list[torch.Tensor]:
    """Per level ``l`` of ``levels``, the features ``target_all[l] [B, U, T_l, D_l]`` of the target units
    ``targets [B, M, K]``: ``[B, M, K·T_l, D_l]`` (the order of the predictor's ``cond``)."""
    B, M, _ = targets.shape
    batch = torch.arange(B, device=targets.device)[:, None]
    return [target_all[level][batch, targets.flatten(1)].reshape(B, M, -1, target_all[level].shape[-1])
            for level in levels]


def layer_normed(levels: Sequence[Level]) -> list[torch.Tensor]:
    """Each level's features ``[B, U, T_l, D_l]``, layer-normed without affine weights: the regression targets."""
    return [F.layer_norm(lv.features, lv.features.shape[-1:]) for lv in levels]


def level_inputs(encoder: HierarchicalEncoder, levels: Sequence[int], context: Sequence[Level],
                 targets: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """What the predictor's :class:`~prob_jepa.predictor.LevelTokens` part of a modality reads to predict the tokens
    of the target units ``targets [B, M, K]`` at each of ``levels`` (its ``cond [B, M, N_l, C]``): the context levels
    ``context`` of ``encoder`` at ``levels`` (``(features, coords)``) and the target tokens' coords."""
    seen = [(context[level].features, context[level].coords) for level in levels]
    return seen, level_target_coords(encoder, levels, targets)


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


TOKEN_PARAMETERS = ("embed", "level_embed", "mask_token", "query_embed")


def legacy_names(model: "JEPA", names: Iterable[str], prefix: str = "") -> dict[str, str]:
    """The current name of each of ``names`` that a checkpoint of an earlier layout used (``{old: new}``; empty for a
    checkpoint of today's names) — the same tensors under other names. For model and optimizer state alike
    (:meth:`~prob_jepa.train.Trainer.resume`). The layouts:

    - the image JEPA as a class of its own (before the one model): its encoder at ``<prefix>context_encoder.*`` /
      ``<prefix>target_encoder.*``, now ``….encoders.image.backbone.*``;
    - a level predictor of its own per modality predicted at its levels (``level_predictors.<m>.*``, until the one
      predictor pass): now the model's ``predictor.*``, whose part ``<m>`` holds its embeddings;
    - the predictor's embeddings before its parts (``predictor.tokens.<p>``), or before its sequence was a module of
      its own (``predictor.<p>``): now ``predictor.tokens.<part>.<p>`` of the predictor's one part.

    Raises:
        ValueError: a checkpoint of a level predictor beside a shared predictor (``hypermodal.within_targets=levels``
            with several modalities, before the one predictor pass): their two sets of blocks are not one predictor's.
    """
    names = list(names)
    if not model.context_encoder.shared_space and any(k.startswith(f"{prefix}proj.") for k in names):
        return {}  # one modality at its levels of before 1f0ad1c: _legacy_shared_space_keys drops its shared space first
    moves: dict[str, str] = {}
    encoders = tuple(f"{prefix}{e}." for e in ("context_encoder", "target_encoder"))
    image = {k for k in names if k.startswith(encoders) and not k.startswith(tuple(f"{e}encoders." for e in encoders))}
    if image and not model.context_encoder.shared_space:
        (name,) = model.modalities
        moves.update({e: f"{e}encoders.{name}.backbone." for e in encoders})
    else:
        image = set()
    levels = f"{prefix}level_predictors."
    own = sorted({k[len(levels):].split(".")[0] for k in names if k.startswith(levels)})
    if own:
        if len(own) > 1 or any(k.startswith(f"{prefix}predictor.") for k in names):
            raise ValueError(f"this checkpoint holds a predictor for the levels of {', '.join(own)} beside the "
                             f"shared-space predictor (hypermodal.within_targets=levels with several modalities, "
                             f"written before the model's predictions became one predictor pass): this version "
                             f"cannot load it; evaluate it with the commit that trained it")
        moves[f"{levels}{own[0]}."] = f"{prefix}predictor."
    parts = list(model.predictor.tokens)

    def renamed(key: str) -> str:
        for start, to in moves.items():
            if key.startswith(start) and (key in image or not start.startswith(encoders)):
                key = to + key[len(start):]
                break
        head = f"{prefix}predictor."
        if not key.startswith(head) or len(parts) != 1:
            return key
        rest = key[len(head):].split(".")
        if rest[0] in TOKEN_PARAMETERS:
            rest = ["tokens", *rest]
        if rest[0] == "tokens" and rest[1] in TOKEN_PARAMETERS:
            rest = ["tokens", parts[0], *rest[1:]]
        return head + ".".join(rest)

    return {key: new for key in names if (new := renamed(key)) != key}


def _legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints of earlier layouts load under today's names (:func:`legacy_names`)."""
    for old, new in legacy_names(module, state_dict, prefix).items():
        state_dict[new] = state_dict.pop(old)


class JEPA(ContextTargetPair):
    """JEPA over one modality or several in one embedding space (JIN's hypermodal space, Jin's joint space); the
    image JEPA (I-JEPA / z-JEPA, JIN eq. 9) is its one-modality case.

    ``forward`` returns the step's :class:`~prob_jepa.step.Predictions`: for every task ``τ``
    (:class:`~prob_jepa.step.Task`) ``cond_τ`` and the layer-normed EMA target-encoder tokens at the masked positions,
    and, when the step aligns, ``z_m``: the projected mean of modality ``m``'s context tokens (masked views, as FLIP
    trains CLIP), standardized per modality by a batch norm before the projection. With hierarchical modality
    encoders their levels and α ride along (``Predictions.hierarchies``). A within-modality task of a modality
    predicted at its levels (the image JEPA's: ``level_heads``) predicts its encoder's levels at their own widths,
    one :class:`~prob_jepa.step.Predicted` per level (``Predicted.level``); every other task predicts shared-space
    tokens. One predictor pass per mask set makes every prediction (:class:`~prob_jepa.predictor.TaskTokens`: the
    shared space's tasks and each such modality's levels side by side, kept apart by the attention mask). The loss is
    the term list of the run's recipe (:mod:`prob_jepa.recipes`): for the image, :func:`~prob_jepa.model.image_terms`
    (``Σ_l w_l · head_l.loss(cond_l, sg[target_l])`` + cross-scale + budget + SIGReg + the experts' balance); for
    several modalities,
    :func:`~prob_jepa.hypermodal.objectives.hypermodal_terms`::

        Σ_kind w_kind · mean_{τ of kind} head.loss(cond_τ, sg[target_τ])
        + λ2 · mean_pairs energy_loss(z_a, z_b) + w_nce · mean_pairs InfoNCE(z_a, z_b)
        (+ the hierarchy's cross-scale, budget and SIGReg terms, + the experts' balance, when the model has them)

    and, for M3 tasks (:func:`~prob_jepa.hypermodal.objectives.m3_tasks`), M3-JEPA's
    ``(1 − α)·InfoNCE(pred, target) + α·head loss`` on each predicted modality, with the pooled prediction and
    target projected into the alignment space (``pred_proj``, ``proj``) and standardized.

    Args:
        encoder: the context encoder (the target encoder is its EMA copy).
        predictor: the :class:`Predictor` over :class:`~prob_jepa.predictor.TaskTokens` with a part ``"shared"``
            (:class:`~prob_jepa.predictor.ModalityTokens`) when the encoder has a shared space and a part per modality
            of ``level_heads`` (:class:`~prob_jepa.predictor.LevelTokens` of its encoder's levels ``predict_levels``).
        head: one head for every modality's ``D``-dim shared-space tokens (``heads[0]``); ``None`` for an encoder
            without a shared space (its one modality predicts its levels), which has no alignment either.
        embed_dim: width of the alignment space (with a shared space; ``None`` without).
        m3: the model trains M3 tasks (adds the projection of pooled predictions).
        cross_scale, sigreg: JIN's cross-scale predictors (eq. 2-3) and SIGReg over the levels of the hierarchical
            modality encoders (:class:`~jin.encoders.HierarchicalModalityEncoder`: the image's, and audio's, video's
            or points' when they have one; each term averages over them), or ``None``.
        level_heads: per modality predicted at its levels (a hierarchical one), one head per level of
            ``predict_levels``: that modality's within-modality JEPA is the image JEPA's — its context levels predict
            the target encoder's levels at their own widths (``Predicted.weight``: the level's share of
            ``level_weights`` over the predicted levels), not the shared-space tokens; the shared space then serves
            the cross-modal and joint tasks and the alignment. A modality without them (flat encoders, one added by
            :meth:`add_modality`) predicts its own shared-space tokens.

    Raises:
        ValueError: a shared head or alignment width without a shared space (or none with one), predictor parts
            other than those, a modality without a head per predicted level, or level weights that are 0 on every
            predicted level.
    """

    def __init__(self, encoder: HypermodalEncoder, predictor: Predictor, head: Head | None,
                 embed_dim: int | None = None, m3: bool = False, cross_scale: CrossScalePredictors | None = None,
                 sigreg: SIGReg | None = None, level_heads: Mapping[str, Sequence[Head]] | None = None,
                 predict_levels: Sequence[int] = (), level_weights: Sequence[float] = ()):
        super().__init__()
        if (head is None or embed_dim is None) == encoder.shared_space:
            raise ValueError("a shared-space head and alignment width exactly when the encoder has a shared space")
        level_heads = level_heads or {}
        parts = ([SHARED] if encoder.shared_space else []) + list(level_heads)
        given = list(predictor.tokens) if isinstance(predictor.tokens, TaskTokens) else type(predictor.tokens).__name__
        if given != parts:
            raise ValueError(f"the predictor's parts must be {parts} (the shared space's, then each modality predicted "
                             f"at its levels), not {given}")
        self.init_target(encoder)
        # the predictor's parameters before the heads': the order in which the image JEPA's optimizer and gradient
        # clipping have always met them
        self.predictor = predictor
        self.heads = nn.ModuleList([head] if head is not None else [])
        self.predict_levels = list(predict_levels)
        total = sum(float(level_weights[level]) for level in self.predict_levels) if level_heads else 1.0
        if total <= 0:
            raise ValueError(f"level weights {list(level_weights)} are 0 on every predicted level "
                             f"{self.predict_levels}")
        self.level_shares = [float(level_weights[level]) / total for level in self.predict_levels]
        self.level_heads: dict[str, list[int]] = {}  # modality → the indices of its level heads in ``heads``
        for name in level_heads:
            if len(level_heads[name]) != len(self.predict_levels):
                raise ValueError(f"{len(level_heads[name])} level heads of {name!r} for the levels "
                                 f"{self.predict_levels}")
            self.level_heads[name] = list(range(len(self.heads), len(self.heads) + len(self.predict_levels)))
            self.heads.extend(level_heads[name])
        self.cross_scale, self.sigreg = cross_scale, sigreg
        self.register_load_state_dict_pre_hook(_legacy_head_keys)
        self.register_load_state_dict_pre_hook(_legacy_shared_space_keys)
        self.register_load_state_dict_pre_hook(_legacy_keys)
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
                             f"at its levels: an image run, or hypermodal.within_targets=levels with one modality)")
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
        :meth:`LevelJEPA.features`)."""
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

    def shared_inputs(self, context: Mapping[str, Tokens], coords: Mapping[str, torch.Tensor],
                      masks: Mapping[str, Masks], tasks: Sequence[Task]) -> tuple:
        """What the predictor's ``"shared"`` part reads to predict every task's target tokens (:meth:`target_tokens`):
        the shared-space context of every modality in ``context``, one query per target token, and which modalities
        each task reads (:meth:`~prob_jepa.predictor.ModalityTokens.sequence`)."""
        names = list(context)
        device = next(iter(context.values())).features.device
        queries = []
        sources = torch.zeros(len(tasks), len(names), dtype=torch.bool, device=device)
        for t, task in enumerate(tasks):
            where = gather_tokens(coords[task.target], self.target_tokens(task.target, masks[task.target]))
            queries.append(Tokens(self.context_encoder.query(task.target, where), where))
            sources[t, [names.index(s) for s in task.sources]] = True
        return list(context.values()), queries, sources

    def predict(self, context: Mapping[str, Tokens], coords: Mapping[str, torch.Tensor],
                masks: Mapping[str, Masks], tasks: Sequence[Task], gate: int) -> PredictorOutput:
        """``cond [B, T, P]`` of every shared-space task's target tokens, in one predictor pass, and its MoE balance
        loss."""
        cond, balance = self.predictor({SHARED: self.shared_inputs(context, coords, masks, tasks)}, gate=gate)
        return PredictorOutput(cond[SHARED], balance)

    def forward(self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, Sequence[Masks]],
                tasks: Sequence[Task], gate: int = 0, align: bool = True) -> Predictions:
        """One step's predictions.

        Args:
            inputs: ``{modality: batch}`` of the present modalities.
            masks: ``{modality: [Masks, …]}`` for the same modalities (the order is the context order), one per
                mask set: set ``s`` encodes every modality's context ``s`` and makes every task on its targets ``s``
                in one predictor pass (V-JEPA's several masks of one input; the target encoder runs once).
            tasks: the predictions to make in each set (term ``jepa/<task.kind>``); align: the step aligns the
                modalities (``Predictions.pooled`` holds each modality's ``z [B, E]`` of its mean context token,
                averaged over the sets; empty otherwise).
            gate: the mixture-of-experts gate that routes this step's predictions.

        A modality's tokens pass the shared blocks only where a shared-space prediction or the alignment reads them
        (a within-modality task of a modality predicted at its levels reads its encoder's levels).
        """
        names = list(masks)
        aligned = align and len(names) > 1
        level_tasks = [t for t in tasks if t.kind == "within" and t.target in self.level_heads]
        shared_tasks = [t for t in tasks if t not in level_tasks]
        # what must pass the shared blocks: every modality not predicted at its levels, and one that is where a
        # shared-space task or the alignment reads it
        sources = set(names) if aligned else {m for t in shared_tasks for m in t.sources}
        read = ({t.target for t in shared_tasks}, sources)
        shared = [{m for m in names if m not in self.level_heads or m in r} for r in read]
        with torch.no_grad():
            encoded = {m: self.target_encoder.encode(m, inputs[m]) for m in names}
            full = {m: self.target_encoder.share(m, t) if m in shared[0] else t for m, t in encoded.items()}
        targets = {m: F.layer_norm(t.features, t.features.shape[-1:]) for m, t in full.items() if m in shared[0]}
        level_targets = {m: layer_normed(full[m].levels) for m in names if m in self.level_heads}
        coords = {m: t.coords for m, t in full.items()}
        predicted, balances, hierarchies, means = [], [], [], {m: [] for m in names}
        for s in range(len(next(iter(masks.values())))):
            sets = {m: masks[m][s] for m in names}
            own = {m: self.context_encoder.encode(m, inputs[m], sets[m].context) for m in names}
            ctx = {m: self.context_encoder.share(m, t) for m, t in own.items() if m in shared[1]}
            parts = {SHARED: self.shared_inputs(ctx, coords, sets, shared_tasks)} if shared_tasks else {}
            parts.update({t.target: self.level_inputs(t.target, own[t.target], sets[t.target]) for t in level_tasks})
            if parts:  # a phase may make no prediction and train the alignment (and the hierarchies) only
                cond, balance = self.predictor(parts, gate=gate)
                balances.append(balance)
                positions = {m: self.context_encoder.encoder(m).level_positions(sets[m].targets) for m in shared[0]}
                predicted += [
                    Predicted(f"jepa/{task.kind}", 0, c,
                              gather_tokens(targets[task.target], self.target_tokens(task.target, sets[task.target])),
                              positions[task.target])
                    for task, c in zip(shared_tasks, cond.get(SHARED, []))
                ]
                for task in level_tasks:
                    predicted += self.level_predictions(task.target, cond[task.target], sets[task.target],
                                                        level_targets[task.target])
            hierarchies += [t.levels for t in own.values() if t.levels]
            for m, c in ctx.items():
                means[m].append(c.features.mean(1))
        pooled = {m: self.align(m, mean_over(z)) for m, z in means.items()} if aligned else {}
        balances = [b for b in balances if b is not None]
        # the collapse diagnostics: each modality's targets, a modality predicted at its levels its finest level's (the
        # image JEPA's since its first run)
        diagnostics = {m: level_targets[m][0].flatten(1, 2) if m in level_targets else targets[m]
                       for m in names}
        return Predictions(predicted, diagnostics, hierarchies=hierarchies, pooled=pooled,
                           balance=mean_over(balances))

    def level_inputs(self, name: str, context: Tokens, mask: Masks) -> tuple:
        """What the predictor's part ``name`` reads to predict modality ``name``'s target units at its levels
        (:func:`level_inputs` of its context levels ``context.levels``)."""
        return level_inputs(self.context_encoder.encoder(name).backbone, self.predict_levels, context.levels,
                            mask.targets)

    def level_predictions(self, name: str, cond: Sequence[torch.Tensor], mask: Masks,
                          target_levels: Sequence[torch.Tensor]) -> list[Predicted]:
        """Modality ``name``'s within-modality prediction at its levels (the image JEPA's): ``cond [B, M, N_l, C]`` of
        every target token at each predicted level ``l`` against the layer-normed target-encoder levels
        ``target_levels[l] [B, U, T_l, D_l]`` at the target units; one :class:`Predicted` per level (term
        ``jepa/within``, its level's head and share of the weight)."""
        ys = gather_level_targets(target_levels, self.predict_levels, mask.targets)
        return [Predicted("jepa/within", head, c.flatten(1, 2), y.flatten(1, 2), weight=share, level=level)
                for head, share, level, c, y in zip(self.level_heads[name], self.level_shares, self.predict_levels,
                                                    cond, ys)]

    def level_jepa(self, name: str) -> "LevelJEPA":
        """Modality ``name``'s JEPA at its levels (:class:`LevelJEPA`): what the image evaluation reads.

        Raises:
            ValueError: ``name`` is not predicted at its levels (a flat encoder, or a model whose within-modality JEPA
                predicts shared-space tokens: ``hypermodal.within_targets=shared``).
        """
        if name not in self.level_heads:
            raise ValueError(f"modality {name!r} is not predicted at its levels in this model (modalities predicted "
                             f"at their levels: {', '.join(self.level_heads) or 'none'}; "
                             f"hypermodal.within_targets=levels predicts the hierarchical ones so)")
        return LevelJEPA(self, name)


class Prediction(NamedTuple):
    """What :meth:`LevelJEPA.predict` computes: ``context``, the context encoder's levels; ``cond``, per predicted
    level ``[B, M, N_l, C]`` for the target units; ``balance``, the predictor's mixture-of-experts load-balancing
    loss (scalar; ``None`` for dense blocks)."""

    context: list[Level]
    cond: list[torch.Tensor]
    balance: torch.Tensor | None


class LevelJEPA:
    """One hierarchical modality of a :class:`JEPA` at its levels — the image JEPA's interface (I-JEPA / z-JEPA on
    JIN's encoder), which the image evaluation reads (heads, ambiguity, uncertainty maps, what could be here, cost).
    A view: it holds no weights of its own (``context_encoder``, ``target_encoder``: the modality's
    :class:`~jin.HierarchicalEncoder` in the model's context and target encoders; ``predictor``: the model's
    predictor, whose part ``name`` predicts the levels; ``heads``: one per predicted level, ``heads[-1]`` the
    coarsest's), and it is no module: mode and device are the model's (``model.eval()``, ``model.to(device)``).
    """

    def __init__(self, model: JEPA, name: str):
        self.model, self.name = model, name
        self.context_encoder: HierarchicalEncoder = model.context_encoder.encoder(name).backbone
        self.target_encoder: HierarchicalEncoder = model.target_encoder.encoder(name).backbone
        self.predictor: Predictor = model.predictor
        self.heads = nn.ModuleList(model.heads[i] for i in model.level_heads[name])
        self.predict_levels: list[int] = model.predict_levels
        self.cross_scale: CrossScalePredictors | None = model.cross_scale

    @property
    def levels(self) -> int:
        return self.context_encoder.levels

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Layer-normed target-encoder features of all units, per level ``[B, U_all, T_l, D_l]``."""
        return layer_normed(self.target_encoder(images))

    def target_coords(self, targets: torch.Tensor) -> list[torch.Tensor]:
        """Target-unit indices ``[B, M, K]`` → per predicted level coords ``[B, M, K·T_l, 3]``."""
        return level_target_coords(self.context_encoder, self.predict_levels, targets)

    def gather_targets(self, target_all: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
        """Target features at the target units, per predicted level ``[B, M, N_l, D_l]`` (the order of ``cond``)."""
        return gather_level_targets(target_all, self.predict_levels, targets)

    def predict(self, images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor) -> Prediction:
        """The context levels of ``images [B, C, H, W]`` with the context units ``context [B, Kc]`` and, per
        predicted level, ``cond [B, M, N_l, C]`` for the target units ``targets [B, M, Kt]``."""
        ctx = self.context_encoder(images, context)
        inputs = level_inputs(self.context_encoder, self.predict_levels, ctx, targets)
        cond, balance = self.predictor({self.name: inputs})
        return Prediction(ctx, cond[self.name], balance)

    @torch.no_grad()
    def features(self, images: torch.Tensor, encoder: str = "target") -> torch.Tensor:
        """Frozen representation ``[B, D_L]``: average-pooled last-level tokens (I-JEPA probes the target encoder;
        ``encoder="context"``: the context encoder's)."""
        enc = self.target_encoder if encoder == "target" else self.context_encoder
        return enc(images)[-1].features.mean(dim=(1, 2))
