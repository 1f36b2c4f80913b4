"""The JEPA model: target encoder, predictor structure, cross-scale loss, EMA."""
from __future__ import annotations

import pytest
import torch

from conftest import MODEL_PRESETS, OLD_IMAGE_LAYOUTS, image_class_name, shrunk_model
from jin.cross_scale import CrossScalePredictors, children
from prob_jepa.data import build_datasets
from prob_jepa.distributed import DistInfo
from prob_jepa.masks import ImageMasks, image_inputs
from prob_jepa.model import build_model, image_terms, level_config
from prob_jepa.predictor import LevelTokens, Predictor
from prob_jepa.run_dir import RunDir
from prob_jepa.step import TrainingStep
from prob_jepa.train import Trainer


def test_target_encoder_equals_context_encoder_right_after_construction(compose, tiny_overrides):
    model = build_model(compose(*tiny_overrides)).level_jepa("image")
    ctx, tgt = model.context_encoder.state_dict(), model.target_encoder.state_dict()
    assert ctx.keys() == tgt.keys()
    assert all(torch.equal(ctx[k], tgt[k]) for k in ctx)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())


@pytest.mark.parametrize("stochastic", [[], ["model.dropout=0.1", "model.drop_path_rate=0.3"]], ids=["preset", "dropout"])
@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_target_encoder_is_never_stochastic(preset, stochastic, compose):
    """Regression targets are a function of the EMA weights and the image: not of drop-path or dropout,
    which the target encoder inherits from the context encoder (every full-scale preset has them)."""
    cfg = compose(*shrunk_model(preset), *stochastic)
    torch.manual_seed(0)
    model = build_model(cfg).train().level_jepa("image")  # what Trainer.fit sets
    images = torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size)
    for a, b in zip(model.target_features(images), model.target_features(images)):
        assert torch.equal(a, b)
    if stochastic:  # the same passes through the context encoder do vary: the check above can fail
        ctx = [model.context_encoder(images)[-1].features for _ in range(2)]
        assert not torch.equal(*ctx)


def test_ema_update_moves_target_by_one_minus_momentum(compose, tiny_overrides):
    model = build_model(compose(*tiny_overrides))
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for b, t, c in zip(before, model.target_encoder.parameters(), model.context_encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * c)


def test_loss_is_finite_and_reaches_every_trainable_parameter(compose, tiny_overrides):
    cfg = compose(*tiny_overrides)
    model = build_model(cfg)
    masks = ImageMasks(cfg, model.level_jepa("image").context_encoder)(4, 0)
    step = TrainingStep(model, image_terms(cfg, model))
    out = step(**image_inputs(torch.randn(4, 3, 32, 32), masks))
    assert torch.isfinite(out.loss) and set(out.terms) >= {"loss", "jepa", "jepa/level0"}
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_sigreg_term_is_weighted_into_the_loss(compose, tiny_overrides):
    assert compose().model.sigreg_weight == 1.0  # the default run's recipe (model=jin_tiny)
    # the weights the README's tables of these presets were measured at: the default's, and 0.1 for hypermodal JIN
    assert compose("experiment=compare_heads").model.sigreg_weight == 1.0
    assert compose("experiment=hypermodal_shapes").model.sigreg_weight == 0.1
    cfg = compose(*tiny_overrides, "model.sigreg_weight=0.5")
    model = build_model(cfg)
    masks = ImageMasks(cfg, model.level_jepa("image").context_encoder)(4, 0)
    images = torch.randn(4, 3, 32, 32)
    terms = image_terms(cfg, model)
    assert [t.name for t in terms if t.name == "sigreg"] == ["sigreg"]
    torch.manual_seed(0)
    out = TrainingStep(model, terms)(**image_inputs(images, masks))
    torch.manual_seed(0)
    plain = TrainingStep(model, [t for t in terms if t.name != "sigreg"])(**image_inputs(images, masks))
    assert out.terms["sigreg"] > 0
    torch.testing.assert_close(out.loss - plain.loss, 0.5 * out.terms["sigreg"])
    assert build_model(compose(*tiny_overrides, "model.sigreg_weight=0")).sigreg is None


def trunk(spatial_bias: bool = False) -> Predictor:
    torch.manual_seed(0)
    return Predictor(LevelTokens([8, 12], 16, grid=8), depth=2, num_heads=2, mlp_ratio=2.0, spatial_bias=spatial_bias).eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = [(torch.randn(2, 5, 4, 8, generator=g), torch.rand(2, 5, 4, 3, generator=g)),
           (torch.randn(2, 5, 1, 12, generator=g), torch.rand(2, 5, 1, 3, generator=g))]
    targets = [torch.rand(2, 3, 8, 3, generator=g), torch.rand(2, 3, 2, 3, generator=g)]
    return ctx, targets


@pytest.mark.parametrize("layout", OLD_IMAGE_LAYOUTS)
def test_an_image_checkpoint_of_an_earlier_layout_loads(compose, tiny_overrides, layout):
    """Image runs written when the image JEPA was a class of its own, or when the one model had a level predictor of
    its own, load into today's model, every tensor where it was (the same modules under other names)."""
    torch.manual_seed(0)
    trained = build_model(compose(*tiny_overrides))
    old = {OLD_IMAGE_LAYOUTS[layout](k): v for k, v in trained.state_dict().items()}
    tops = {"image_class": {"context_encoder", "target_encoder", "predictor", "heads"},
            "level_predictor": {"context_encoder", "target_encoder", "level_predictors", "heads"}}[layout]
    assert {k.split(".")[0] for k in old} == tops and not any(".tokens.image." in k for k in old)
    if layout == "image_class":
        assert {"context_encoder.patch_embed.proj.weight", "target_encoder.norms.0.weight"} <= set(old)
        assert not any("encoders." in k for k in old)
    torch.manual_seed(1)
    fresh = build_model(compose(*tiny_overrides))
    fresh.load_state_dict(old)  # strict
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_from_before_the_token_module_loads(compose, tiny_overrides):
    """State dicts written when the predictor's embeddings sat on the predictor itself load unchanged."""
    torch.manual_seed(0)
    trained = build_model(compose(*tiny_overrides))
    old = {image_class_name(k).replace("predictor.tokens.", "predictor."): v for k, v in trained.state_dict().items()}
    assert "predictor.level_embed" in old and not any(".tokens." in k for k in old)
    torch.manual_seed(1)
    fresh = build_model(compose(*tiny_overrides))
    fresh.load_state_dict(old)  # strict
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_trunk_output_shapes():
    ctx, targets = inputs()
    out = trunk()(ctx, targets)
    assert [o.shape for o in out.cond] == [(2, 3, 8, 16), (2, 3, 2, 16)] and out.balance is None


def test_target_blocks_are_predicted_independently_of_each_other():
    """One pass over all blocks equals I-JEPA's one pass per block."""
    for bias in (False, True):
        net = trunk(bias)
        ctx, targets = inputs()
        joint = net(ctx, targets).cond
        moved = [t.clone() for t in targets]
        for t in moved:
            t[:, 1:] = torch.rand_like(t[:, 1:])  # move every block but block 0
        again = net(ctx, moved).cond
        for a, b in zip(joint, again):
            torch.testing.assert_close(a[:, 0], b[:, 0])
            assert not torch.allclose(a[:, 1:], b[:, 1:])
        alone = net(ctx, [t[:, :1] for t in targets]).cond
        for a, b in zip(joint, alone):
            torch.testing.assert_close(a[:, :1], b, rtol=1e-5, atol=1e-5)


def test_cross_scale_loss_has_gradients_only_where_stop_gradient_allows():
    torch.manual_seed(0)
    cs = CrossScalePredictors([8, 12])
    fine = torch.randn(2, 3, 16, 8, requires_grad=True)
    coarse = torch.randn(2, 3, 4, 12, requires_grad=True)
    g_fine, g_coarse = torch.autograd.grad(cs([fine, coarse]), [fine, coarse])
    # each level receives gradient only as the *input* of its predictor (eq. 2 for fine, eq. 3 for coarse),
    # never as the sg[·] target of the other one
    fine2, coarse2 = fine.detach().requires_grad_(), coarse.detach().requires_grad_()
    up_only = torch.nn.functional.smooth_l1_loss(cs.up[0](children(fine2)), coarse2.detach())
    down_only = torch.nn.functional.smooth_l1_loss(cs.down[0](coarse2), children(fine2).detach())
    e_fine = torch.autograd.grad(up_only / 2, fine2)[0]
    e_coarse = torch.autograd.grad(down_only / 2, coarse2)[0]
    assert e_fine.abs().sum() > 0 and e_coarse.abs().sum() > 0
    torch.testing.assert_close(g_fine, e_fine)
    torch.testing.assert_close(g_coarse, e_coarse)


def test_levels_ablation_keeps_total_depth_and_top_width(compose):
    cfg = compose("model.dims=[16,32,64]", "model.depths=[1,2,3]", "model.num_heads=[1,2,4]", "model.levels=1")
    lv = level_config(cfg.model)
    assert lv["dims"] == [64] and lv["depths"] == [6] and lv["num_heads"] == [4] and lv["level_weights"] == [1.0]


@pytest.mark.parametrize("levels, global_from", [(2, 1), (1, 0)])
def test_levels_ablation_keeps_global_attention_where_the_full_model_has_it(compose, levels, global_from):
    """jin_tiny's level 0 attends within 2×2 units; at levels=1 a unit is one token, so the kept level must
    attend globally (as level 1 does in the full model), not within itself."""
    cfg = compose(*shrunk_model("jin_tiny"), f"model.levels={levels}", "model.adaptive=false")  # every token computed
    encoder = build_model(cfg).level_jepa("image").context_encoder
    assert encoder.global_from == global_from
    images = torch.rand(1, 3, cfg.data.image_size, cfg.data.image_size)
    moved = images.clone()
    moved[..., :4, :4] += 1.0  # one patch changes: every last-level token of a globally attending level feels it
    with torch.no_grad():
        change = (encoder(moved)[-1].features - encoder(images)[-1].features).abs().flatten(1, 2).amax(-1)
    assert (change > 0).all()


# Measured at 4f05d8b, when the image JEPA was a class of its own (its own forward, masks as a list, its own terms):
# per step of the first three, the loss, cross-scale, SIGReg, gradient norm and JEPA term of each predicted level, and
# the summed absolute values of the checkpoint's floating-point tensors after them. The one-modality model reproduced
# them to the last bit on the machine that wrote them; the tolerance leaves room for another CPU's kernels, not for
# another loss.
STEP_KEYS = ("loss", "cross_scale", "sigreg", "grad_norm", "jepa/level0", "jepa/level1")
SIGREG_WEIGHT_AT_4F05D8B = 0.1  # jin_tiny's until 2026-12-06: the weight the steps below were taken at
IMAGE_JEPA_CLASS_STEPS = {
    "default": ([(1.315693974494934, 0.4417513608932495, 0.20244990289211273, 0.5684603452682495, None,
                  2.142533779144287),
                 (1.3161227703094482, 0.4400728940963745, 0.17413771152496338, 0.47192367911338806, None,
                  2.1507344245910645),
                 (1.3109768629074097, 0.44527190923690796, 0.137653648853302, 0.4595075249671936, None,
                  2.1425485610961914)],
                1456.9156034704865),
    "flow_every_level_moe_clipped": (
        [(2.4281251430511475, 0.4577813744544983, 0.20244990289211273, 0.7031853199005127, 1.4400874376296997,
          1.4511913061141968),
         (2.4242727756500244, 0.4522739052772522, 0.17568308115005493, 0.577083170413971, 1.441624402999878,
          1.4512752294540405),
         (2.4008629322052, 0.4438689351081848, 0.14158695936203003, 0.551630437374115, 1.4320106506347656,
          1.4389152526855469)],
        10275.282016649477),
}


@pytest.mark.parametrize("case, overrides", [
    ("default", []),
    ("flow_every_level_moe_clipped", ["predictor=flow", "predictor.base_components=1", "predictor.hold_steps=0",
                                      "model.predictor.levels=null", "model.predictor.moe_experts=2",
                                      "trainer.clip_grad=0.3"]),
])
def test_the_image_recipe_trains_as_the_image_jepa_class_did(case, overrides, compose, tmp_path):
    """The default recipe (jin_tiny's switches: cross-scale, budget, SIGReg — at 4f05d8b's weight; one predicted
    level) and a run of every level, a flow head and experts with the gradient clipped, at CPU size: the one-modality
    model takes the steps the image JEPA class took — its losses, level terms, gradient norms and weights (a changed
    term weight, level or mask draw would move them)."""
    from prob_jepa.train import pretrain

    cfg = compose(*shrunk_model("jin_tiny"), "eval.enabled=false", "trainer.max_steps=3",
                  f"model.sigreg_weight={SIGREG_WEIGHT_AT_4F05D8B}", *overrides)
    pretrain(cfg, run_dir=tmp_path)
    steps = [tuple(r.get(k) for k in STEP_KEYS) for r in RunDir(tmp_path).read_metrics() if "loss" in r]
    state = torch.load(RunDir(tmp_path).checkpoint, weights_only=True)["model"]
    expected_steps, expected_sum = IMAGE_JEPA_CLASS_STEPS[case]
    assert [[v is None for v in row] for row in steps] == [[v is None for v in row] for row in expected_steps]
    torch.testing.assert_close(torch.tensor([[v for v in row if v is not None] for row in steps], dtype=torch.float64),
                               torch.tensor([[v for v in row if v is not None] for row in expected_steps],
                                            dtype=torch.float64), rtol=1e-5, atol=0)
    total = sum(v.double().abs().sum().item() for v in state.values() if v.is_floating_point())
    assert total == pytest.approx(expected_sum, rel=1e-6)


def test_gradient_checkpointing_recomputes_every_block_and_changes_no_gradient(compose):
    """trainer.grad_checkpointing: every block (encoders, predictor) is recomputed in the backward pass, with
    the same drop-path draws, so loss and gradients are those of the plain step."""
    from jin.layers import Stage

    cfg = compose(*shrunk_model("jin_tiny"), "model.depths=[2,2]", "model.predictor.depth=2", "model.dropout=0.1",
                  "model.drop_path_rate=0.3", "model.predictor.drop_path_rate=0.3")  # every block stochastic but two
    images = torch.rand(4, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if checkpointing:
            model.set_grad_checkpointing()
            assert all(m.grad_checkpointing for m in model.modules() if isinstance(m, Stage))
        masks = ImageMasks(cfg, model.level_jepa("image").context_encoder)(4, 0)
        torch.manual_seed(1)
        out = TrainingStep(model, image_terms(cfg, model))(**image_inputs(images, masks))
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".stages." in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_the_parameters_come_in_the_image_jepa_class_s_order(compose):
    """Gradient clipping sums the parameters' norms in the model's order: the image JEPA class's (encoder, predictor,
    heads, cross-scale) keeps its runs reproducible to the last bit (with the heads before the predictor the
    three steps above move in their last bits, inside the tolerance that the test above must leave)."""
    model = build_model(compose(*shrunk_model("jin_tiny")))
    order = list(dict.fromkeys(n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad))
    assert order == ["context_encoder", "predictor", "heads", "cross_scale"]


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_takes_a_real_training_step(preset, compose, tmp_path):
    """The default ``jin_tiny`` and every other preset, at CPU size, through ``Trainer.train_step`` (masks, the
    loss with every configured term, backward, clipping, AdamW, EMA): the loss is finite, every trainable
    parameter receives a finite gradient and moves, and the target encoder follows by EMA."""
    cfg = compose(*shrunk_model(preset), "eval.enabled=false")
    train_set, = build_datasets(cfg.data, ("train",))
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), RunDir(tmp_path), train_set)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    terms = trainer.train_step([next(iter(trainer.loader))])
    assert torch.isfinite(terms["loss"]) and torch.isfinite(terms["grad_norm"]) and terms["grad_norm"] > 0
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"{preset}: no finite gradient for {no_grad}"
    unmoved = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unmoved, f"{preset}: not updated by the step: {unmoved}"
    target = dict(trainer.model.target_encoder.named_parameters())
    assert any(not torch.equal(p, before[f"target_encoder.{n}"]) for n, p in target.items()), "EMA did not move"
