"""One training step's loss, in plain sight: the model predicts, a list of weighted terms scores the predictions.

Every JEPA of the project (the image JEPA, the hypermodal JEPA) returns :class:`Predictions` from its
``forward``; :class:`TrainingStep` sums ``weight · measure(model, predictions)`` over the :class:`Term` list its
recipe builds from the config (:mod:`prob_jepa.recipes`). The trainer wraps :class:`TrainingStep` (DDP / FSDP /
``torch.compile``), so the whole loss runs inside the wrapped forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from jin.encoder import Level


@dataclass
class Predicted:
    """One prediction of a step: ``cond [B, N, C]`` of ``N`` target tokens, their regression targets
    ``target [B, N, D]`` (layer-normed EMA target-encoder features), the kind of prediction that names its loss term
    (``"jepa/within"``, ``"jepa/cross"``; the image recipe splits ``jepa/within`` by ``level``) and the index of its
    head in ``model.heads``. ``parts``: for a prediction of several levels' tokens (a hierarchical modality with
    ``levels=[0, 1]``), each level's positions among the ``N`` tokens (``{level: [N_l]}``); ``None``: the tokens are
    of one level. ``weight``: its share in its term's mean over the step's predictions (a hypermodal within-modality
    prediction of several levels at their own widths is one :class:`Predicted` per level, each weighted by its
    level's normalized weight). ``level``: the encoder level whose tokens it predicts, for a prediction at a
    hierarchical modality's levels (the image JEPA's: the image recipe weighs each level as a term of its own, JIN
    eq. 9); ``None`` otherwise."""

    term: str
    head: int
    cond: torch.Tensor
    target: torch.Tensor
    parts: dict[int, torch.Tensor] | None = None
    weight: float = 1.0
    level: int | None = None


@dataclass
class Predictions:
    """What a JEPA's forward returns; the loss terms read nothing else.

    predicted: every prediction of the step.
    hierarchies: the context levels of every hierarchical encoder of the step, as the encoder returns them (per
        level a :class:`~jin.encoder.Level`: features ``[B, U, T_l, D_l]``, coords, computed fraction α ``[B]``): the
        image JEPA's one; the hypermodal JEPA's hierarchical modalities present in the step, in the context order;
        empty otherwise. The cross-scale, budget and SIGReg terms average over them.
    pooled: per modality, its mean context token in the alignment space ``[B, E]`` (the hypermodal JEPA, on steps
        that align the modalities; empty otherwise).
    targets: per modality, target features for the collapse diagnostics (``feature_std``, ``effective_rank``): its
        shared-space tokens, or for a modality predicted at its levels its finest level's (the image JEPA's, whatever
        levels are predicted).
    balance: the predictor's mixture-of-experts load-balancing loss (scalar; ``None`` for dense blocks).
    """

    predicted: list[Predicted]
    targets: dict[str, torch.Tensor]
    hierarchies: list[Sequence[Level]] = field(default_factory=list)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    balance: torch.Tensor | None = None


Measure = Callable[[nn.Module, Predictions], "torch.Tensor | None"]


@dataclass(frozen=True)
class Term:
    """A weighted loss term: ``weight · measure(model, predictions)``; ``measure`` returns ``None`` when the step
    made nothing it scores (a curriculum phase without cross-modal tasks). ``logs``: what else to log by name when
    the term is scored (the budget's α per level)."""

    name: str
    weight: float
    measure: Measure
    logs: Callable[[Predictions], dict[str, torch.Tensor]] | None = None


class Task(NamedTuple):
    """A prediction of a step: ``target``'s masked tokens from the context tokens of ``sources``; ``kind`` names
    the loss term (``within``: a modality from its own context, the image JEPA's one task)."""

    sources: tuple[str, ...]
    target: str
    kind: str  # "within" | "cross" | "joint" | "m3"


class StepOutput(NamedTuple):
    """loss: the scalar objective; terms: its parts by name (and ``loss``), still in the autograd graph (the
    trainer logs them detached); targets: the predictions' target features for the collapse diagnostics.

    Not detached here on purpose: under inductor (torch 2.14) a detached term that the loss equals after
    simplification (one level, weight 1: ``0 + 1.0 · term``) shares the loss's output buffer, and the compiled
    function then returns the loss without a gradient (``model=vit_tiny trainer.compile=true`` failed at backward).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]


def jepa_term(term: str, level_weights: Sequence[float] | None = None, level: int | None = None) -> Measure:
    """The JEPA regression term ``term``: the mean, over the step's predictions of that term, of their head's loss
    (NLL in nats/dim for the probabilistic heads, MSE for the deterministic one) on ``sg[target]``; with ``level``,
    over those at that encoder level only (``Predicted.level``: the image JEPA's term of level ``l``, JIN eq. 9).

    A prediction of several levels' tokens (``Predicted.parts``) scores each level apart and weighs them by
    ``level_weights[level]``, normalized over its levels (``Σ_l w_l · loss_l / Σ_l w_l``: the levels share the
    prediction's weight in the mean, and one level alone is scored as before); ``None``: every level's tokens
    alike (the mean over all ``N``). JIN eq. 9's level weights ``w_l``, for a model that predicts its levels in one
    task (the hypermodal JEPA's hierarchical image). The predictions of the term are averaged with their
    ``Predicted.weight`` (``Σ w·loss / Σ w``; the plain mean when the weights are equal).
    """

    def loss(model: nn.Module, x: Predicted) -> torch.Tensor:
        head = model.heads[x.head]
        if x.parts is None or level_weights is None:
            return head(x.cond.flatten(0, 1), x.target.flatten(0, 1))
        weights = {part: float(level_weights[part]) for part in x.parts}
        total = sum(weights.values())
        return sum(w / total * head(x.cond[:, x.parts[part]].flatten(0, 1), x.target[:, x.parts[part]].flatten(0, 1))
                   for part, w in weights.items() if w > 0)

    def measure(model: nn.Module, p: Predictions) -> torch.Tensor | None:
        chosen = [x for x in p.predicted if x.term == term and (level is None or x.level == level)]
        if len({x.weight for x in chosen}) <= 1:
            return mean_over([loss(model, x) for x in chosen])
        return sum(x.weight * loss(model, x) for x in chosen) / sum(x.weight for x in chosen)

    return measure


def mean_over(values: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The element-wise mean of same-shaped ``values`` (the one value itself when there is one; ``None`` when there
    are none)."""
    if not values:
        return None
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)


def balance_term(model: nn.Module, p: Predictions) -> torch.Tensor | None:
    """The mixture-of-experts load-balancing loss (Switch Transformer, arXiv:2101.03961, eq. 4)."""
    return p.balance


def total_loss(terms: Sequence[Term], model: nn.Module, p: Predictions) -> StepOutput:
    """``Σ weight · term`` over the terms the step has, with every term (and its ``logs``), ``jepa`` (the weighted
    sum of the ``jepa/*`` terms) and ``loss`` by name."""
    values: dict[str, torch.Tensor] = {}
    loss = jepa = torch.zeros((), dtype=torch.float32, device=next(iter(p.targets.values())).device)
    for term in terms:
        value = term.measure(model, p)
        if value is None:
            continue
        values[term.name] = value
        if term.logs is not None:
            values.update(term.logs(p))
        loss = loss + term.weight * value
        if term.name.startswith("jepa/"):
            jepa = jepa + term.weight * value
    values["jepa"] = jepa
    values["loss"] = loss
    return StepOutput(loss, values, p.targets)


class TrainingStep(nn.Module):
    """The module the trainer runs (and wraps with DDP / FSDP / ``torch.compile``): the model's predictions, then
    the weighted terms (:func:`total_loss`). ``model`` is its only submodule; checkpoints hold ``model``'s state."""

    def __init__(self, model: nn.Module, terms: Sequence[Term]):
        super().__init__()
        if not terms:
            raise ValueError("a training step needs at least one loss term")
        self.model = model
        self.terms = list(terms)

    def forward(self, **inputs) -> StepOutput:
        return total_loss(self.terms, self.model, self.model(**inputs))


class StepPlanner(Protocol):
    """What a recipe draws for each micro-batch before the model runs: its masks (and, for several modalities,
    which modalities and prediction tasks take part), as the keyword inputs of the model's ``forward`` on the
    training device. Every draw depends on (seed, rank, step, micro-batch) only, so a resumed run continues
    exactly."""

    def check(self) -> None:
        """Raise :class:`~prob_jepa.config.ConfigError` before step 1 if some step of the run cannot be drawn."""

    def __call__(self, batch: Any, step: int, micro: int) -> dict[str, Any]:
        """The model inputs of micro-batch ``micro`` of optimizer step ``step``."""
