"""The contract of the one training step: every model preset (shrunk to CPU size), alone and as the image encoder of
a hypermodal model beside another modality, and the hypermodal recipes run the real step — planner, TrainingStep,
the recipe's loss terms — and every trainable parameter receives a gradient."""
from __future__ import annotations

import pytest
import torch

from conftest import MODEL_PRESETS, shrunk_model
from prob_jepa.distributed import DistInfo
from prob_jepa.run_dir import RunDir
from prob_jepa.data import build_datasets
from prob_jepa.model import has_cross_scale
from prob_jepa.train import Trainer
from jin.encoders import HierarchicalModalityEncoder

HYPERMODAL = [
    "experiment=hypermodal_flat", "data.train_size=32", "data.val_size=16", "hypermodal.dim=24",
    "hypermodal.depth=1", "hypermodal.num_heads=2", "hypermodal.embed_dim=16", "hypermodal.points.group_size=8",
    "hypermodal.predictor.dim=24", "hypermodal.predictor.depth=1", "hypermodal.predictor.num_heads=2",
    "hypermodal.modality_dropout=0", "trainer.batch_size=8", "trainer.progress=false",
]


def with_text(name: str) -> list[str]:
    """Preset ``name`` (shrunk) as the hierarchical image encoder of a hypermodal model beside text
    (``experiment=hypermodal_shapes``): its coarsest level's mask units are the image's tokens."""
    unread = ("mask.", "data.marker", "data.train_size", "data.val_size")  # the image world's keys
    image = [o for o in shrunk_model(name) if not o.startswith(unread)]
    flat = [o for o in HYPERMODAL if not o.startswith("hypermodal.predictor.")]  # the predictor is model.predictor
    return [*flat, "experiment=hypermodal_shapes", *image, "data.modalities=[image,text]",
            "model.predictor.levels=1", "mask.image.0.num_targets=2", "mask.image.0.target_size=2"]


CASES = {f"image-{name}": shrunk_model(name) for name in MODEL_PRESETS}
CASES.update({f"image+text-{name}": with_text(name) for name in MODEL_PRESETS})
CASES["image+text-jin_tiny-every-level"] = [*with_text("jin_tiny"), "hypermodal.image.levels=[0,1]"]
CASES["every-modality-hierarchy"] = [  # JIN §3.2.1: audio, video and points through JIN's hierarchy too
    *[o if o != "experiment=hypermodal_shapes" else "experiment=hypermodal_hierarchies" for o in with_text("jin_tiny")
      if not o.startswith("data.modalities")],
    "data.modalities=[image,audio,video,points]", "hypermodal.hierarchy.grid=8", *[f"mask.{m}.0.{k}=2" for m in ("audio", "video", "points")
                                     for k in ("num_targets", "target_size")],
]
CASES["image-two-mask-specs"] = [  # V-JEPA's convention: a list of mask specs, each predicted from its own context
    *shrunk_model("jin_tiny"), "mask.image=[{kind: multiblock, min_keep: 2}, {kind: blocks, num_targets: 2, "
    "target_size: 4}]"]
CASES["image+text-multiblock-two-mask-sets"] = [  # I-JEPA's masks on the hierarchical image inside the hypermodal model
    *with_text("jin_tiny"), "mask.image=[{kind: multiblock, num_targets: 2, min_keep: 2}]",
    "mask.text=[{kind: blocks, num_targets: 2, target_size: 3}, {kind: blocks, num_targets: 1, target_size: 2}]"]
CASES["hypermodal"] = HYPERMODAL
CASES["hypermodal-m3"] = [*HYPERMODAL, "experiment=hypermodal_m3"]


def first_steps(cfg, tmp_path, steps: int) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """The trainer of ``cfg`` and the loss terms of its last step, the gradients of ``steps`` steps accumulated."""
    train_set, = build_datasets(cfg.data, ("train",))
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), RunDir(tmp_path), train_set)
    trainer.model.zero_grad(set_to_none=True)
    for step in range(steps):
        trainer.step = step
        out = trainer.forward_micro(next(iter(trainer.loader)), 0)
        out.loss.backward()
    return trainer, out.terms


@pytest.mark.parametrize("case", list(CASES))
def test_the_training_step_trains_every_parameter_of_every_configuration(case, compose, tmp_path):
    overrides = CASES[case]
    if case == "hypermodal-m3" or case.startswith(("image+text", "every-modality")):  # one experiment= per composition
        overrides = [o for o in overrides if o != "experiment=hypermodal_flat"]
    cfg = compose(*overrides)
    torch.manual_seed(0)
    steps = 2 if case == "hypermodal-m3" else 1  # M3's two gates route alternate steps
    trainer, terms = first_steps(cfg, tmp_path, steps)
    assert torch.isfinite(terms["loss"])
    weighted = sum(t.weight * terms[t.name] for t in trainer.training_step.terms if t.name in terms)
    torch.testing.assert_close(terms["loss"], weighted)  # the loss is exactly the recipe's weighted terms
    missing = [n for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    if case.startswith(("image+text", "every-modality")):  # JIN's hierarchy inside, as model.* sets it, and its terms
        for name in ["image", *cfg.hypermodal.hierarchy.modalities]:
            encoder = trainer.model.context_encoder.encoder(name)
            assert isinstance(encoder, HierarchicalModalityEncoder) and encoder.backbone.levels == cfg.model.levels
        expected = {"cross_scale": has_cross_scale(cfg.model), "budget": cfg.model.adaptive,
                    "sigreg": cfg.model.sigreg_weight > 0}
        assert {k: k in terms for k in expected} == expected
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)
