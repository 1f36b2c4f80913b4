"""What a hypermodal step trains: the modalities that take part, their block masks, the prediction tasks."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ..config import ConfigError
from ..data import seed_for
from ..distributed import DistInfo
from ..masks import MaskCollator, Masks, MaskSpec, MaskUnits, build_mask_specs, mask_generator
from .build import ENCODERS
from ..jepa import JEPA
from .objectives import check_curriculum, m3_tasks, modality_dropout, phase_at, plan_tasks


class HypermodalPlanner:
    """The hypermodal JEPA's :class:`~prob_jepa.step.StepPlanner`.

    Each micro-batch draws, from one generator seeded by (seed, rank, step, micro-batch): the modalities that take
    part (modality dropout, in the ``full`` phase), then each modality's masks from its mask units
    (:class:`~prob_jepa.masks.MaskUnits`: coordinates, grid, content), one per spec of ``mask.<modality>``. Mask set
    ``s`` of the step takes spec ``s mod len(mask.<modality>)`` of every modality; there are as many sets as the
    longest list of the present modalities has specs. A ``multiblock`` spec, which redraws images whose context is
    too small, draws from a generator of its own (seed, draw, set, modality), where draw ``(step · accum + micro) ·
    world + rank`` counts this rank's micro-batches, so :meth:`check` replays its draws before step 1. The
    curriculum phase (``hypermodal.curriculum``) decides which predictions are made and whether the modalities are
    aligned; with ``hypermodal.m3`` the step instead trains M3-JEPA's directional task ``step mod gates`` through
    its gate. A task whose term is weighted 0 is not made (it would cost compute and train nothing).
    """

    def __init__(self, cfg: DictConfig, model: JEPA, info: DistInfo, micro: int, accum: int,
                 total_steps: int):
        self.cfg, self.model, self.info = cfg, model, info
        self.micro, self.accum, self.total_steps = micro, accum, total_steps
        self.specs = self.mask_specs()

    def mask_specs(self) -> dict[str, list[MaskSpec]]:
        """Every modality's mask specs (``mask.<modality>``), built on its encoder's units.

        Raises:
            ConfigError: a modality of ``hypermodal.modalities`` without an entry in ``mask``, an entry for no
                modality the hypermodal model knows (a typo), or an invalid list
                (:func:`~prob_jepa.masks.build_mask_specs`). (The experiments keep an entry for each of the five
                modalities, read when ``data.modalities`` has it, as ``hypermodal.<modality>.*``.)
        """
        modalities, mask = list(self.cfg.hypermodal.modalities), self.cfg.get("mask") or {}
        missing = [m for m in modalities if m not in mask]
        unknown = [m for m in mask if m not in ENCODERS]
        if missing or unknown:
            raise ConfigError(f"mask has entries for {', '.join(mask) or 'no modality'}: "
                              + (f"{missing} of hypermodal.modalities have none (a list of mask specs each)"
                                 if missing else f"{unknown} are no modality; valid: {', '.join(ENCODERS)}"))
        specs = {}
        for name in modalities:
            encoder = self.model.context_encoder.encoder(name)
            specs[name] = build_mask_specs(mask[name], f"mask.{name}", encoder.num_units, encoder.unit_grid,
                                           seed=self.cfg.seed)
        return specs

    def check(self, max_draws: int = 2000) -> None:
        """Every step of the run can be computed: each modality's mask specs leave a context (checked when they
        were built) and each ``multiblock`` spec's draws can be drawn (all of this rank's up to ``max_draws``, else
        that many spread evenly over the run: a ``blocks`` spec has static sizes and no redraw that could give up),
        each curriculum phase has a loss, and the micro-batch feeds the alignment's batch norm (several modalities).

        Raises:
            ConfigError: naming the ``mask.*`` / ``hypermodal.*`` / ``trainer.*`` keys.
        """
        h = self.cfg.hypermodal
        sets = max(len(specs) for specs in self.specs.values())
        draws = self.total_steps * self.accum
        for i in sorted({int(i) for i in torch.linspace(0, draws - 1, min(draws, max_draws)).tolist()}):
            for name, specs in self.specs.items():
                for s in range(sets):
                    if isinstance(specs[s % len(specs)], MaskCollator):
                        try:
                            self.multiblock(name, s, i // self.accum, i % self.accum)
                        except ValueError as e:
                            raise ConfigError(f"the masks of step {i // self.accum + 1} cannot be drawn: "
                                              f"mask.{name}.{s % len(specs)}: {e}") from e
        if not h.m3.enabled:
            check_curriculum(h.curriculum, h.objectives)
        if self.micro < 2 and len(h.modalities) > 1:  # one modality aligns nothing
            raise ConfigError(
                f"a hypermodal micro-batch of {self.micro} image(s) per rank (trainer.batch_size / "
                f"trainer.micro_batch_size / world size): the alignment's batch norm needs at least 2"
            )

    def multiblock(self, name: str, s: int, step: int, micro: int) -> Masks:
        """Mask set ``s`` of modality ``name`` (a ``multiblock`` spec) in micro-batch ``micro`` of step ``step``."""
        specs = self.specs[name]
        draw = (step * self.accum + micro) * self.info.world_size + self.info.rank
        generator = mask_generator(self.cfg.seed, draw, s, 1 + list(ENCODERS).index(name))
        return specs[s % len(specs)].draw(self.micro, generator)

    def __call__(self, batch, step: int, micro: int) -> dict[str, Any]:
        """``{"inputs": {modality: batch}, "masks": {modality: [Masks per set]}, "tasks", "gate", "align"}`` on the
        training device (the keyword inputs of :meth:`JEPA.forward`)."""
        inputs, _ = batch
        h = self.cfg.hypermodal
        g = torch.Generator().manual_seed(seed_for(self.cfg.seed, self.info.rank, step, micro))
        phase = phase_at(step, self.total_steps, h.curriculum)
        present = [n for n in self.model.modalities if n in inputs]
        if phase == "full" and h.modality_dropout > 0:
            present = modality_dropout(present, h.modality_dropout, g)
        if h.m3.enabled:
            tasks, gate = m3_tasks(present, step, h.m3.gates)
        else:
            tasks, gate = plan_tasks(present, phase, step), 0
            tasks = [t for t in tasks if h.objectives[t.kind] > 0]
        masks = {}
        sets = max((len(self.specs[n]) for n in present), default=0)
        for name in present:
            encoder = self.model.context_encoder.encoder(name)
            units = MaskUnits(self.model.unit_coords(name, inputs[name]), encoder.mask_weights, encoder.unit_grid,
                              encoder.unit_content(inputs[name]))
            specs = self.specs[name]
            masks[name] = [self.multiblock(name, s, step, micro) if isinstance(specs[s % len(specs)], MaskCollator)
                           else specs[s % len(specs)].sample(units, g) for s in range(sets)]
        device = self.info.device
        return {"inputs": {n: inputs[n].to(device, non_blocking=True) for n in present},
                "masks": {n: [mk.to(device) for mk in sets_] for n, sets_ in masks.items()},
                "tasks": tasks, "gate": gate, "align": phase != "single"}
