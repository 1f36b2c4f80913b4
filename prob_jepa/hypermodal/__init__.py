"""Hypermodal JIN: several modalities in one embedding space, cross-modal JEPA and alignment."""
from .build import ENCODERS, build_hypermodal, build_modality_encoder
from .objectives import (
    PHASES, Task, energy_alignment, hypermodal_terms, info_nce, jin_energy_alignment, m3_tasks, modality_dropout,
    pair_energy, phase_at, plan_tasks,
)

__all__ = [
    "ENCODERS", "PHASES", "Task",
    "build_hypermodal", "build_modality_encoder", "energy_alignment", "hypermodal_terms",
    "info_nce", "jin_energy_alignment",
    "m3_tasks", "modality_dropout", "pair_energy", "phase_at", "plan_tasks",
]
