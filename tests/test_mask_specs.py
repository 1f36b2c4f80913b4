"""One mask interface for every modality: a list of mask specs per modality (V-JEPA's convention), each drawn from
the modality's mask units; a step predicts the targets of every spec from that spec's context."""
from __future__ import annotations

import pytest
import torch

from conftest import shrunk_model
from prob_jepa.config import ConfigError
from prob_jepa.distributed import DistInfo
from prob_jepa.masks import CoordinateBlocks, ImageMasks, MaskCollator, build_mask_specs, image_inputs
from prob_jepa.model import build_model, image_terms
from prob_jepa.step import TrainingStep

TWO_SPECS = "mask.image=[{kind:multiblock,min_keep:2},{kind:blocks,num_targets:2,target_size:9}]"
DETERMINISTIC = ["model.drop_path_rate=0", "model.predictor.drop_path_rate=0", "model.dropout=0"]


@pytest.mark.parametrize("specs, grid, message", [
    ({"kind": "blocks"}, 8, r"mask\.x=.* must be a non-empty list of mask specs"),
    ([], 8, r"mask\.x=\[\] must be a non-empty list"),
    ([{"num_targets": 2}], 8, r"mask\.x\.0\.kind=None; valid: multiblock, blocks"),
    ([{"kind": "blocks", "num_targets": 2, "target_size": 2}, {"kind": "multiblock", "scale": 1}], 8,
     r"mask\.x\.1: kind multiblock takes no option\(s\) \['scale'\]; valid: num_targets, target_scale"),
    ([{"kind": "multiblock"}], None, r"mask\.x\.0\.kind=multiblock needs mask units on a square grid.*here: blocks"),
    ([{"kind": "blocks", "num_targets": 0, "target_size": 2}], 8, r"mask\.x\.0\.num_targets=0 must be a positive"),
    ([{"kind": "blocks", "num_targets": 2, "target_size": 2.5}], 8, r"mask\.x\.0\.target_size=2\.5 must be a positive"),
    ([{"kind": "multiblock", "target_aspect": [4, 5]}], 3, r"mask\.x\.0: no block with aspect ratio"),
])
def test_a_mask_list_no_run_can_draw_is_named_by_its_keys(specs, grid, message):
    with pytest.raises(ConfigError, match=message):
        build_mask_specs(specs, "mask.x", num_units=(grid or 8) ** 2, grid=grid)


def test_each_kind_has_static_sizes():
    multi, blocks = build_mask_specs([{"kind": "multiblock"}, {"kind": "blocks", "num_targets": 3, "target_size": 5}],
                                     "mask.x", num_units=64, grid=8)
    assert isinstance(multi, MaskCollator) and isinstance(blocks, CoordinateBlocks)
    assert (blocks.num_targets, blocks.num_target_units, blocks.num_context) == (3, 5, 64 - 15)
    # 12 units: the area nearest 0.175 · 64 that a 3×4 / 4×3 block of aspect 0.75-1.5 has; blocks may overlap
    assert (multi.num_targets, multi.num_target_units) == (4, 12) and 0 < multi.num_context <= 64 - 12


def test_the_first_spec_draws_what_a_lone_spec_draws_and_the_second_its_own_blocks(compose):
    """Adding a spec leaves the first one's masks as they were (the default run's draws are the single collator's);
    the image's `blocks` spec hides compact squares of the unit grid: a block of 9 units around an interior centre
    is exactly a 3×3 square."""
    cfg = compose(*shrunk_model("jin_tiny"), "data.image_size=64", TWO_SPECS)  # 8×8 mask units
    encoder = build_model(cfg).level_jepa("image").context_encoder
    lone = MaskCollator(encoder.unit_grid, seed=cfg.seed, min_keep=2)
    first, second = ImageMasks(cfg, encoder)(64, 7)
    assert torch.equal(first.context, lone(64, 7).context) and torch.equal(first.targets, lone(64, 7).targets)
    assert second.context.shape == (64, 64 - 18) and second.targets.shape == (64, 2, 9)
    hidden = torch.zeros(64, 64, dtype=torch.bool).scatter_(1, second.targets.flatten(1), True)
    assert not hidden.gather(1, second.context).any()
    rows, cols = second.targets // 8, second.targets % 8
    height = rows.amax(-1) - rows.amin(-1) + 1
    width = cols.amax(-1) - cols.amin(-1) + 1
    squares = (height == 3) & (width == 3)
    assert (height * width <= 15).all() and squares.float().mean() > 0.4  # 36 of 64 centres are interior


def test_two_mask_specs_average_their_jepa_and_hierarchy_terms(compose):
    """The step predicts each spec's targets from its own context: every JEPA term and the cross-scale term of two
    mask sets are the means of the one-set steps' terms (the target encoder runs once for both)."""
    cfg = compose(*shrunk_model("jin_tiny"), "data.image_size=64", *DETERMINISTIC, TWO_SPECS)  # 8×8 mask units
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    step = TrainingStep(model, image_terms(cfg, model))
    images = torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size)
    first, second = ImageMasks(cfg, model.level_jepa("image").context_encoder)(4, 0)
    with torch.no_grad():
        both, one, two = (step(**image_inputs(images, m)).terms for m in ([first, second], [first], [second]))
    names = [name for name in both if name.startswith("jepa/") or name == "cross_scale"]
    assert "cross_scale" in names and len(names) >= 2
    for name in names:
        torch.testing.assert_close(both[name], (one[name] + two[name]) / 2)
        assert not torch.equal(one[name], two[name])


def hypermodal_planner(compose, *overrides):
    from prob_jepa.hypermodal import build_hypermodal
    from prob_jepa.hypermodal.planner import HypermodalPlanner

    from test_step_contract import with_text

    cfg = compose(*[o for o in with_text("jin_tiny") if o != "experiment=hypermodal_flat"], *DETERMINISTIC, *overrides)
    torch.manual_seed(0)
    model = build_hypermodal(cfg).eval()
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    return HypermodalPlanner(cfg, model, info, micro=4, accum=1, total_steps=10), model, cfg


def test_hypermodal_mask_sets_cycle_through_each_modalitys_specs_and_average_the_jepa_terms(compose):
    """Mask set s takes spec s mod len of every modality: text's two specs make two sets, the image's one spec is
    drawn twice (I-JEPA's multi-block masks on JIN's image grid inside the hypermodal model); each JEPA term of the
    two sets is the mean of the one-set steps'."""
    from prob_jepa.hypermodal import hypermodal_terms
    from prob_jepa.data import build_datasets

    planner, model, cfg = hypermodal_planner(
        compose, "mask.image=[{kind:multiblock,num_targets:2,min_keep:2}]",
        "mask.text=[{kind:blocks,num_targets:2,target_size:3},{kind:blocks,num_targets:1,target_size:2}]")
    planner.check()
    train_set, = build_datasets(cfg.data, ("train",))
    batch = torch.utils.data.default_collate([train_set[i] for i in range(4)])
    inputs = planner(batch, step=0, micro=0)
    image, text = inputs["masks"]["image"], inputs["masks"]["text"]
    assert [m.targets.shape for m in text] == [(4, 2, 3), (4, 1, 2)]
    assert [m.targets.shape for m in image] == [image[0].targets.shape] * 2 and image[0].targets.shape[1] == 2
    assert not torch.equal(image[0].targets, image[1].targets)
    step = TrainingStep(model, hypermodal_terms(cfg, model))
    with torch.no_grad():
        both = step(**inputs).terms
        alone = [step(**{**inputs, "masks": {m: [sets[s]] for m, sets in inputs["masks"].items()}}).terms
                 for s in (0, 1)]
    names = [name for name in both if name.startswith("jepa/") and name != "jepa"]
    assert names
    for name in names:
        torch.testing.assert_close(both[name], (alone[0][name] + alone[1][name]) / 2)


def test_multiblock_masks_need_a_grid_of_units(compose):
    """The flat image encoder's tokens are not JIN's grid of mask units: `multiblock` is refused by name."""
    from prob_jepa.hypermodal import build_hypermodal
    from prob_jepa.hypermodal.planner import HypermodalPlanner

    from test_hypermodal import SMALL

    cfg = compose(*SMALL, "mask.image=[{kind:multiblock}]")
    model = build_hypermodal(cfg)
    with pytest.raises(ConfigError, match=r"mask\.image\.0\.kind=multiblock needs mask units on a square grid"):
        HypermodalPlanner(cfg, model, DistInfo(0, 1, 0, torch.device("cpu")), micro=4, accum=1, total_steps=1)


def test_a_run_saved_before_mask_lists_reads_its_masks_as_a_one_spec_list():
    """Old image runs held one multi-block ``mask`` node, old hypermodal runs ``hypermodal.mask.<modality>``: both
    load as the one-spec lists they trained with (and the hypermodal node is gone, so nothing is read twice)."""
    from omegaconf import OmegaConf

    from prob_jepa.run_dir import with_added_keys

    image = with_added_keys(OmegaConf.create({"mask": {"num_targets": 3, "min_keep": 2}}))
    assert OmegaConf.to_container(image.mask) == {"image": [{"kind": "multiblock", "num_targets": 3, "min_keep": 2}]}
    old = {"hypermodal": {"image": {}, "predictor": {}, "objectives": {}, "points": {},
                          "mask": {"image": {"num_targets": 4, "target_size": 6}, "text": {"num_targets": 2,
                                                                                          "target_size": 3}}}}
    hypermodal = with_added_keys(OmegaConf.create(old))
    assert "mask" not in hypermodal.hypermodal and OmegaConf.to_container(hypermodal.mask) == {
        "image": [{"kind": "blocks", "num_targets": 4, "target_size": 6}],
        "text": [{"kind": "blocks", "num_targets": 2, "target_size": 3}]}
    current = with_added_keys(OmegaConf.create({"mask": {"image": [{"kind": "multiblock"}]}}))
    assert OmegaConf.to_container(current.mask) == {"image": [{"kind": "multiblock"}]}


def test_the_run_saves_every_option_of_a_short_spec_and_a_resume_names_the_changed_one(tiny_overrides, compose,
                                                                                          tmp_path):
    """``{kind: multiblock}`` trains with MaskCollator's defaults, which equal conf/mask/multiblock.yaml's numbers;
    config.yaml holds them, and a resume that changes one option of the second spec is refused naming it."""
    from omegaconf import OmegaConf

    from prob_jepa.masks import complete_mask_specs, spec_options
    from prob_jepa.run_dir import RunDir
    from prob_jepa.train import pretrain

    default = OmegaConf.to_container(compose().mask.image[0])
    short = OmegaConf.to_container(complete_mask_specs(compose("mask.image=[{kind:multiblock}]")).mask.image[0])
    assert short == default and set(default) == {"kind", *spec_options("multiblock")}
    two = "mask.image=[{kind:multiblock,min_keep:2},{kind:blocks,num_targets:2,target_size:3}]"
    run = tmp_path / "run"
    pretrain(compose(*tiny_overrides, two, "trainer.max_steps=1", "eval.enabled=false"), run_dir=run)
    saved = RunDir(run).load_config().mask.image
    assert OmegaConf.to_container(saved[0]) == {**default, "min_keep": 2} and saved[1].target_size == 3
    changed = two.replace("target_size:3", "target_size:4")
    with pytest.raises(ConfigError, match=r"mask\.image\.1\.target_size: 3 -> 4"):
        pretrain(compose(*tiny_overrides, changed, "trainer.max_steps=2", "eval.enabled=false"), run_dir=run)


def test_hypermodal_mask_entries_name_modalities_and_multiblock_draws_are_checked_before_step_1(compose):
    """A typo in a modality's name is refused, listing the modalities; a multi-block spec whose contexts cannot be
    drawn fails in the planner's check (its draws have a generator of their own, replayed there)."""
    with pytest.raises(ConfigError, match=r"\['imgae'\] are no modality; valid: image, audio"):
        hypermodal_planner(compose, "+mask.imgae=[{kind:blocks,num_targets:1,target_size:1}]")
    planner, _, _ = hypermodal_planner(compose, "mask.image=[{kind:multiblock,num_targets:2,min_keep:60}]")
    with pytest.raises(ConfigError, match=r"the masks of step 1 cannot be drawn: mask\.image\.0: .*redraws"):
        planner.check()
    planner, _, _ = hypermodal_planner(compose, "mask.image=[{kind:multiblock,num_targets:2,min_keep:2}]")
    planner.check()
    first = planner.multiblock("image", 0, step=3, micro=0)
    assert torch.equal(first.targets, planner.multiblock("image", 0, step=3, micro=0).targets)
    assert not torch.equal(first.targets, planner.multiblock("image", 0, step=4, micro=0).targets)
