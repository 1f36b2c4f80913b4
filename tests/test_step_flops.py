"""The evaluation's FLOPs of a training step count what the run's trainer runs at that step."""
from __future__ import annotations

import pytest
import torch

from conftest import shrunk_model
from prob_jepa.data import build_datasets
from prob_jepa.distributed import DistInfo
from prob_jepa.eval.cost import micro_batch_flops, step_flops
from prob_jepa.run_dir import RunDir
from prob_jepa.train import Trainer

HYPERMODAL = ["experiment=hypermodal_flat", "data.train_size=32", "data.val_size=16", "hypermodal.dim=24",
              "hypermodal.depth=1", "hypermodal.num_heads=2", "hypermodal.embed_dim=16",
              "hypermodal.points.group_size=8", "hypermodal.predictor.dim=24", "hypermodal.predictor.depth=1",
              "hypermodal.predictor.num_heads=2", "trainer.batch_size=8", "trainer.progress=false",
              "hypermodal.modality_dropout=0.5"]  # steps draw different modalities, so their FLOPs differ
CASES = {"image": [*shrunk_model("jin_tiny"), "data.train_size=32", "trainer.batch_size=8"],
         "hypermodal": HYPERMODAL}


@pytest.mark.parametrize("case", list(CASES))
def test_step_flops_are_the_trainers_at_those_steps(case, compose, tmp_path):
    cfg = compose(*CASES[case])
    train_set, = build_datasets(cfg.data, ("train",))
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), RunDir(tmp_path), train_set)
    batch = next(iter(trainer.loader))
    steps = [0, 1, 2, 5]
    trained = []
    for s in steps:
        trainer.step = s
        trained.append(micro_batch_flops(trainer, batch))
    assert min(trained) > 0
    # an image run's masks keep their token counts; a hypermodal step's modalities and tasks vary (so the mean
    # below is not one draw's count)
    assert len(set(trained)) == 1 if case == "image" else len(set(trained)) > 1
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    trainer.model.eval()
    assert step_flops(cfg, trainer.model, batch, steps, trainer.total_steps) == sum(trained) / len(steps)
    assert not trainer.model.training and all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in trainer.model.named_buffers())  # batch-norm statistics
