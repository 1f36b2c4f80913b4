"""The hypermodal trainer: the JEPA trainer's loop with per-modality masks, tasks and modality dropout."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

from jin.layers import Stage

from ..data import seed_for
from ..model import StepOutput
from ..config import ConfigError
from ..train import Trainer
from .build import build_hypermodal
from .masks import coordinate_block_masks
from .model import HypermodalJEPA
from .objectives import check_curriculum, m3_tasks, modality_dropout, phase_at, plan_tasks


class HypermodalTrainer(Trainer):
    """Trains :class:`HypermodalJEPA` on batches of ``({modality: tensor}, label)``.

    Each step draws, from one generator seeded by (seed, rank, step, micro-batch): the
    modalities that take part (modality dropout, in the ``full`` phase), then a block mask
    per modality from its token coordinates. The curriculum phase
    (``hypermodal.curriculum``) decides which predictions are made; with ``hypermodal.m3``
    the step instead trains M3-JEPA's directional task ``step mod gates`` through its gate.
    """

    model: HypermodalJEPA
    # A parameter that has had no gradient yet (a modality left out of every step so far) has no AdamW state.
    optimizer_load_options = StateDictOptions(full_state_dict=True, strict=False)
    allow_unused_parameters = True  # modality dropout leaves some encoders out of a step

    def build_model(self) -> HypermodalJEPA:
        return build_hypermodal(self.cfg)

    def enable_grad_checkpointing(self) -> None:
        for module in self.model.modules():
            if isinstance(module, Stage):
                module.grad_checkpointing = True

    def setup_masks(self) -> None:
        h = self.cfg.hypermodal
        missing = [m for m in h.modalities if m not in h.mask]
        if missing:
            raise ValueError(f"hypermodal.mask has no entry for {missing}; it has {', '.join(h.mask)}")

    def check_steps(self) -> None:
        """Every step of the run can be computed: each curriculum phase has a loss, and the micro-batch feeds the
        alignment's batch norm. (Masks need no draw ahead: each step's blocks come from the tokens' coordinates,
        with sizes fixed by ``hypermodal.mask`` and no redraw that could give up.)

        Raises:
            ConfigError: naming the ``hypermodal.*`` / ``trainer.*`` keys.
        """
        h = self.cfg.hypermodal
        if not h.m3.enabled:
            check_curriculum(h.curriculum, h.objectives)
        if self.micro < 2:
            raise ConfigError(
                f"a hypermodal micro-batch of {self.micro} image(s) per rank (trainer.batch_size / "
                f"trainer.micro_batch_size / world size): the alignment's batch norm needs at least 2"
            )

    def wrap(self, strategy: str) -> nn.Module:
        if self.info.distributed and strategy != "ddp":
            raise ValueError(f"the hypermodal model trains with trainer.strategy=ddp, not {strategy!r}")
        return super().wrap(strategy)

    def forward_micro(self, batch, m: int) -> StepOutput:
        inputs, _ = batch
        h = self.cfg.hypermodal
        g = torch.Generator().manual_seed(seed_for(self.cfg.seed, self.info.rank, self.step, m))
        phase = phase_at(self.step, self.total_steps, h.curriculum)
        present = [n for n in self.model.modalities if n in inputs]
        if phase == "full" and h.modality_dropout > 0:
            present = modality_dropout(present, h.modality_dropout, g)
        if h.m3.enabled:
            tasks, gate = m3_tasks(present, self.step, h.m3.gates)
        else:
            tasks, gate = plan_tasks(present, phase, self.step), 0
            tasks = [t for t in tasks if h.objectives[t.kind] > 0]  # a term weighted 0 costs nothing
        masks = {}
        for name in present:
            spec = h.mask[name]
            coords = self.model.token_coords(name, inputs[name])
            weights = self.model.context_encoder.encoder(name).mask_weights
            masks[name] = coordinate_block_masks(coords, weights, spec.num_targets, spec.target_size, g)
        device = self.info.device
        inputs = {n: inputs[n].to(device, non_blocking=True) for n in present}
        masks = {n: mk.to(device) for n, mk in masks.items()}
        with self.autocast():
            return self.net(inputs, masks, tasks, gate, align=phase != "single")
