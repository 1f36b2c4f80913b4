"""What a hypermodal step trains: the modalities that take part, their block masks, the prediction tasks."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ..config import ConfigError
from ..data import seed_for
from ..distributed import DistInfo
from .masks import coordinate_block_masks
from .model import HypermodalJEPA
from .objectives import check_curriculum, m3_tasks, modality_dropout, phase_at, plan_tasks


class HypermodalPlanner:
    """The hypermodal JEPA's :class:`~prob_jepa.step.StepPlanner`.

    Each micro-batch draws, from one generator seeded by (seed, rank, step, micro-batch): the modalities that take
    part (modality dropout, in the ``full`` phase), then a block mask per modality from its token coordinates. The
    curriculum phase (``hypermodal.curriculum``) decides which predictions are made and whether the modalities are
    aligned; with ``hypermodal.m3`` the step instead trains M3-JEPA's directional task ``step mod gates`` through
    its gate. A task whose term is weighted 0 is not made (it would cost compute and train nothing).
    """

    def __init__(self, cfg: DictConfig, model: HypermodalJEPA, info: DistInfo, micro: int, accum: int,
                 total_steps: int):
        self.cfg, self.model, self.info = cfg, model, info
        self.micro, self.total_steps = micro, total_steps

    def check(self) -> None:
        """Every step of the run can be computed: each modality has a mask that leaves a context, each curriculum
        phase has a loss, and the micro-batch feeds the alignment's batch norm. (Masks need no draw ahead: each
        step's blocks come from the tokens' coordinates, with sizes fixed by ``hypermodal.mask`` and no redraw that
        could give up.)

        Raises:
            ConfigError: naming the ``hypermodal.*`` / ``trainer.*`` keys.
        """
        h = self.cfg.hypermodal
        missing = [m for m in h.modalities if m not in h.mask]
        if missing:
            raise ConfigError(f"hypermodal.mask has no entry for {missing}; it has {', '.join(h.mask)}")
        for name in h.modalities:
            spec, units = h.mask[name], self.model.context_encoder.encoder(name).num_units
            if spec.num_targets * spec.target_size >= units:
                raise ConfigError(
                    f"hypermodal.mask.{name}: {spec.num_targets} target blocks (num_targets) of {spec.target_size} "
                    f"mask units (target_size) leave no context among the modality's {units} mask units"
                )
        if not h.m3.enabled:
            check_curriculum(h.curriculum, h.objectives)
        if self.micro < 2:
            raise ConfigError(
                f"a hypermodal micro-batch of {self.micro} image(s) per rank (trainer.batch_size / "
                f"trainer.micro_batch_size / world size): the alignment's batch norm needs at least 2"
            )

    def __call__(self, batch, step: int, micro: int) -> dict[str, Any]:
        """``{"inputs": {modality: batch}, "masks": {modality: ModalityMask}, "tasks", "gate", "align"}`` on the
        training device (the keyword inputs of :meth:`HypermodalJEPA.forward`)."""
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
        for name in present:
            spec = h.mask[name]
            coords = self.model.unit_coords(name, inputs[name])
            encoder = self.model.context_encoder.encoder(name)
            masks[name] = coordinate_block_masks(coords, encoder.mask_weights, spec.num_targets, spec.target_size, g,
                                                 encoder.unit_content(inputs[name]))
        device = self.info.device
        return {"inputs": {n: inputs[n].to(device, non_blocking=True) for n in present},
                "masks": {n: mk.to(device) for n, mk in masks.items()},
                "tasks": tasks, "gate": gate, "align": phase != "single"}
