"""What a family of models brings to the one trainer, chosen by the config's ``recipe`` key (``image`` |
``hypermodal``): how the model is built, what each step draws, which loss terms it sums, how it is evaluated."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from .config import ConfigError
from .distributed import STRATEGIES
from .hypermodal.build import build_hypermodal
from .hypermodal.objectives import hypermodal_terms
from .hypermodal.planner import HypermodalPlanner
from .masks import ImagePlanner
from .model import build_model, image_terms
from .preflight import Evaluate
from .step import StepPlanner, Term


@dataclass(frozen=True)
class Recipe:
    """One family of models.

    build_model: the model of a config. build_terms: its loss terms (:class:`~prob_jepa.step.Term`, in the order
    they are summed). planner: ``(cfg, model, info, micro=, accum=, total_steps=)`` → the
    :class:`~prob_jepa.step.StepPlanner` drawing each micro-batch's model inputs. evaluation: ``module:function``
    of its evaluation (imported when used: evaluation imports plotting). requires: the config nodes it reads
    (composed by ``experiment=`` / the defaults). strategies: the ``trainer.strategy``
    values it trains with on several ranks. every_step_trains_every_parameter: false when a step may leave
    parameters without gradient by design (modality dropout); DDP then looks for them, and an optimizer state
    may lack them. frozen_features: model → ``(images [B, 3, H, W] → [B, D])``, what a probe during training reads
    (``eval.probe_curve``); ``None``: the recipe has none.
    """

    build_model: Callable[[DictConfig], nn.Module]
    build_terms: Callable[[DictConfig, nn.Module], list[Term]]
    planner: Callable[..., StepPlanner]
    evaluation: str
    requires: tuple[str, ...]
    strategies: tuple[str, ...] = STRATEGIES
    every_step_trains_every_parameter: bool = True
    frozen_features: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None = None

    def evaluate(self) -> Evaluate:
        module, _, name = self.evaluation.partition(":")
        return getattr(importlib.import_module(module), name)


RECIPES: dict[str, Recipe] = {
    "image": Recipe(build_model, image_terms, ImagePlanner, "prob_jepa.eval:evaluate", requires=("model", "mask"),
                    frozen_features=lambda model: model.level_jepa("image").features),
    "hypermodal": Recipe(build_hypermodal, hypermodal_terms, HypermodalPlanner,
                         "prob_jepa.hypermodal.evaluate:evaluate_hypermodal", requires=("hypermodal", "mask"),
                         strategies=("ddp",), every_step_trains_every_parameter=False),
}


def recipe_of(cfg: DictConfig) -> Recipe:
    """The :class:`Recipe` named by ``cfg.recipe``.

    Raises:
        ConfigError: ``recipe`` is missing or names none of :data:`RECIPES`, or the config lacks a node the recipe
            reads (``recipe=hypermodal`` without ``experiment=hypermodal_*``).
    """
    name = cfg.get("recipe")
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r}; valid: {', '.join(RECIPES)} (experiment=hypermodal_* sets hypermodal)")
    recipe = RECIPES[name]
    missing = [key for key in recipe.requires if cfg.get(key) is None]
    if missing:
        raise ConfigError(f"recipe={name} reads {', '.join(f'{k}.*' for k in missing)}, which the config does not "
                          f"compose: recipe is set by the experiment (experiment=hypermodal_* for hypermodal, none "
                          f"for image); leave recipe= out")
    return recipe
