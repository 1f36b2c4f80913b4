"""Cross-modal objectives: energy-based alignment (JIN eq. 5-6), InfoNCE, and which predictions a step makes."""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError
from ..model import hierarchy_terms, level_config
from ..step import Measure, Predictions, Task, Term, balance_term, jepa_term

PHASES = ("single", "cross", "full")


def pair_energy(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """Energy of every pair ``E[i, j] = ½‖ẑ_a,i − ẑ_b,j‖² = 1 − cos``, ``[B, B]`` (lower: compatible): JIN eq. 5 at
    λ = 0, shifted by 1 so that it is non-negative (the hinge's margin is measured on it).

    ``za``, ``zb``: ``[B, E]`` embeddings of the same ``B`` scenes in two modalities (L2-normalized here).
    """
    return 1.0 - F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T


def energy_alignment(za: torch.Tensor, zb: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Energy alignment as a hinge (``hypermodal.objectives.energy_loss=hinge``): pull matched pairs' energy down,
    push mismatched pairs above ``margin``.

    ``mean_i E[i, i] + mean_{i≠j} max(0, margin − E[i, j])`` with ``E`` of :func:`pair_energy` — the contrastive
    energy loss of LeCun et al. (2006) over in-batch negatives; our reading of "energy-based alignment" before the
    JIN paper's equations were available (:func:`jin_energy_alignment` is eq. 5-6 as written).
    """
    energy = pair_energy(za, zb)
    off = ~torch.eye(len(energy), dtype=torch.bool, device=energy.device)
    return energy.diagonal().mean() + F.relu(margin - energy[off]).mean()


def jin_energy_alignment(za: torch.Tensor, zb: torch.Tensor, norm_weight: float = 0.0) -> torch.Tensor:
    """JIN eq. 5-6 as written (``hypermodal.objectives.energy_loss=jin_eq6``; the JIN paper, §3.2.2):
    ``E(x_i, x_j) = −cos(g_i(x_i), g_j(x_j)) + λ‖g_i(x_i)‖²`` and ``L_EBM = E_data[E] − E_noise[E]``, the data pairs
    the batch's matched scenes ``(za_i, zb_i)``, the noise pairs its mismatched ones ``(za_i, zb_j)``, ``i ≠ j``.

    With in-batch noise pairs the norm term cancels exactly: every ``za_i`` is the first argument of one data pair
    and of ``B − 1`` noise pairs, so ``λ`` (``norm_weight``) changes neither the loss nor its gradient. The loss lies
    in ``[−2, 2]`` (lower: matched pairs more similar than mismatched ones).

    Args:
        za, zb: ``[B, E]`` embeddings of the same ``B`` scenes in two modalities (``B ≥ 2``), not normalized.
    """
    energy = -F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T + norm_weight * za.square().sum(-1, keepdim=True)
    off = ~torch.eye(len(energy), dtype=torch.bool, device=energy.device)
    return energy.diagonal().mean() - energy[off].mean()


def energy_loss(objectives: DictConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The pair loss ``hypermodal.objectives.energy_loss`` names, with its options.

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    losses = {"hinge": lambda: partial(energy_alignment, margin=objectives.energy_margin),
              "jin_eq6": lambda: partial(jin_energy_alignment, norm_weight=objectives.energy_norm_weight)}
    if objectives.energy_loss not in losses:
        raise ConfigError(f"hypermodal.objectives.energy_loss={objectives.energy_loss!r}; valid: {', '.join(losses)}")
    return losses[objectives.energy_loss]()


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over the batch: ``[B, E]`` × ``[B, E]`` → scalar."""
    logits = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def plan_tasks(present: Sequence[str], phase: str, step: int) -> list[Task]:
    """The predictions of one step.

    ``single``: each modality from its own context (within-modality JEPA). ``cross`` adds
    cross-modal JEPA: modality ``i`` predicts modality ``i + 1 + step mod (n − 1)`` of the
    present ones, so every ordered pair recurs. ``full`` adds the joint prediction of every
    modality from the context of all present modalities.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    n = len(present)
    tasks = [Task((m,), m, "within") for m in present]
    if phase in ("cross", "full") and n > 1:
        shift = 1 + step % (n - 1)
        tasks += [Task((m,), present[(i + shift) % n], "cross") for i, m in enumerate(present)]
    if phase == "full" and n > 1:
        tasks += [Task(tuple(present), m, "joint") for m in present]
    return tasks


def m3_tasks(present: Sequence[str], step: int, num_gates: int = 2) -> tuple[list[Task], int]:
    """M3-JEPA's alternating directional tasks and the gate that routes them.

    Step ``s`` trains direction group ``g = s mod num_gates``: with two gates, group 0 is every
    ``a → b`` with ``a`` before ``b`` in ``present`` and group 1 the reverse directions, each
    routed through its own gate of the mixture-of-experts predictor.
    """
    g = step % num_gates
    pairs = [(a, b) for i, a in enumerate(present) for j, b in enumerate(present) if i != j]
    chosen = [(a, b) for a, b in pairs if (present.index(a) > present.index(b)) == bool(g % 2)]
    return [Task((a,), b, "m3") for a, b in chosen], g


PHASE_KINDS = {"single": ("within",), "cross": ("within", "cross"), "full": ("within", "cross", "joint")}


def check_curriculum(curriculum: Sequence[Sequence] | None, objectives) -> None:
    """Every phase of ``hypermodal.curriculum`` known, its fractions increasing in (0, 1], each phase with a loss.

    Raises:
        ConfigError: naming the phase and the ``hypermodal.*`` keys (before step 1: a phase is reached late).
    """
    last = 0.0
    for phase, until in curriculum or []:
        if phase not in PHASES:
            raise ConfigError(f"hypermodal.curriculum: unknown phase {phase!r}; valid: {', '.join(PHASES)}")
        if not last < float(until) <= 1.0:
            raise ConfigError(f"hypermodal.curriculum: the fractions must increase within (0, 1]; {phase} ends at {until}")
        last = float(until)
        aligned = phase != "single" and (objectives.energy > 0 or objectives.infonce > 0)
        if not aligned and not any(objectives[k] > 0 for k in PHASE_KINDS[phase]):
            keys = ", ".join(f"hypermodal.objectives.{k}" for k in PHASE_KINDS[phase])
            raise ConfigError(f"hypermodal.curriculum phase {phase!r} has no loss: {keys} are all 0")


def phase_at(step: int, total: int, curriculum: Sequence[Sequence] | None) -> str:
    """The curriculum phase at ``step`` (Jin: single-modality → cross-modal → full).

    ``curriculum``: ``[[phase, until_fraction], ...]`` in order; ``None`` trains ``full`` throughout.
    """
    if not curriculum:
        return "full"
    for phase, until in curriculum:
        if phase not in PHASES:
            raise ValueError(f"unknown curriculum phase {phase!r}; valid: {', '.join(PHASES)}")
        if step < float(until) * total:
            return str(phase)
    return str(curriculum[-1][0])


def modality_dropout(modalities: Sequence[str], p: float, generator: torch.Generator, keep: int = 2) -> list[str]:
    """Each modality left out with probability ``p``; at least ``keep`` stay (chosen at random when too few do)."""
    n = len(modalities)
    draws = torch.rand(n, generator=generator)
    kept = draws >= p
    if int(kept.sum()) < min(keep, n):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[draws.argsort(descending=True)[: min(keep, n)]] = True
    return [m for m, k in zip(modalities, kept.tolist()) if k]


def standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per feature over the batch ``[B, E]`` (a batch norm without running statistics)."""
    return (x - x.mean(0)) / (x.var(0, unbiased=False) + eps).sqrt()


def pairs_of(p: Predictions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every pair of the step's aligned modalities' embeddings ``(z_a, z_b)``, each ``[B, E]``."""
    z = list(p.pooled.values())
    return [(a, b) for i, a in enumerate(z) for b in z[i + 1:]]


def aligned_pairs_term(pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Measure:
    """``pair_loss(z_a, z_b)`` averaged over every pair of aligned modalities; ``None`` on a step that does not
    align (energy: :func:`energy_loss`; InfoNCE: ``partial(info_nce, temperature=…)``)."""

    def measure(model: nn.Module, p: Predictions) -> torch.Tensor | None:
        pairs = pairs_of(p)
        return torch.stack([pair_loss(a, b) for a, b in pairs]).mean() if pairs else None

    return measure


def m3_contrastive_term(temperature: float) -> Measure:
    """M3-JEPA's contrastive term: InfoNCE between each M3 task's pooled prediction and its pooled target, both
    projected into the alignment space (``model.pred_proj``, ``model.proj``) and standardized (mean over tasks)."""

    def measure(model: nn.Module, p: Predictions) -> torch.Tensor | None:
        m3 = [x for x in p.predicted if x.term == "jepa/m3"]
        if not m3:
            return None
        if model.pred_proj is None:
            raise ValueError("M3 tasks need a model built with m3=True (hypermodal.m3.enabled=true)")
        return torch.stack([
            info_nce(standardize(model.pred_proj(x.cond.mean(1))), standardize(model.proj(x.target.mean(1))),
                     temperature)
            for x in m3
        ]).mean()

    return measure


def hypermodal_terms(cfg: DictConfig, model: nn.Module) -> list[Term]:
    """The hypermodal JEPA's loss terms, in the order they are summed: the JEPA term of each task kind
    (``hypermodal.objectives.{within,cross,joint}``; with ``hypermodal.m3.enabled`` the M3 tasks' head loss at
    ``α`` = ``hypermodal.m3.alpha`` and their contrastive term at ``1 − α``), with a hierarchical image encoder
    (``hypermodal.image.backbone``) the hierarchy's terms (:func:`~prob_jepa.model.hierarchy_terms`), the energy
    alignment (λ2 = ``hypermodal.objectives.energy``, the pair loss :func:`energy_loss`), InfoNCE (``infonce``,
    ``temperature``) and, with experts, their balance (``hypermodal.predictor.moe_balance_weight``). A prediction of
    the hierarchical image's tokens of several levels (``hypermodal.image.levels``) weighs its levels by
    ``model.level_weights`` (JIN eq. 9), normalized over them (:func:`~prob_jepa.step.jepa_term`)."""
    h = cfg.hypermodal
    o = h.objectives
    level_weights = None if h.image.backbone is None else level_config(cfg.model)["level_weights"]
    terms = [Term(f"jepa/{kind}", o[kind], jepa_term(f"jepa/{kind}", level_weights))
             for kind in ("within", "cross", "joint")]
    if h.m3.enabled:
        terms += [Term("jepa/m3", h.m3.alpha, jepa_term("jepa/m3", level_weights)),
                  Term("m3/contrastive", 1 - h.m3.alpha, m3_contrastive_term(o.temperature))]
    if h.image.backbone is not None:
        terms += hierarchy_terms(cfg, model)
    terms += [Term("energy", o.energy, aligned_pairs_term(energy_loss(o))),
              Term("infonce", o.infonce, aligned_pairs_term(partial(info_nce, temperature=o.temperature)))]
    if h.predictor.moe_experts:
        terms.append(Term("moe_balance", h.predictor.moe_balance_weight, balance_term))
    return terms
