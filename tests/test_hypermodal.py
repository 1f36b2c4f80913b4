"""The hypermodal JEPA: add_modality invariance, task isolation, gates, alignment, retrieval, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import CONF, level_predictor_name, paired_scene, shrunk_model
from jin.encoders import HierarchicalModalityEncoder
from prob_jepa.config import ConfigError, compose_config
from prob_jepa.data.multimodal import MultimodalSpec, PairedShapes
from prob_jepa.hypermodal import (
    build_hypermodal, build_modality_encoder, energy_alignment, hypermodal_terms,
    jin_energy_alignment, m3_tasks,
    modality_dropout, pair_energy, phase_at, plan_tasks,
)
from prob_jepa.hypermodal.evaluate import energy_retrieval_correlation, recall_at_k
from prob_jepa.masks import coordinate_block_masks
from prob_jepa.eval.summary import markdown, model_label, summary_row
from prob_jepa.run_dir import RunDir
from prob_jepa.step import Predictions, StepOutput, TrainingStep
from prob_jepa.train import pretrain

MODALITIES = ["image", "audio", "text", "video", "points"]
SMALL = [
    "experiment=hypermodal_flat",
    "data.train_size=128",
    "data.val_size=64",
    "hypermodal.dim=24",
    "hypermodal.depth=1",
    "hypermodal.num_heads=2",
    "hypermodal.embed_dim=16",
    "hypermodal.points.group_size=8",
    "hypermodal.predictor.dim=24",
    "hypermodal.predictor.depth=1",
    "hypermodal.predictor.num_heads=2",
    "trainer.batch_size=32",
    "trainer.epochs=2",
    "trainer.log_every=1",
    "trainer.progress=false",
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def scenes() -> PairedShapes:
    return PairedShapes(64, 5, paired_scene(), MultimodalSpec(num_points=128))


def batch(scenes: PairedShapes, n: int, modalities=MODALITIES, start: int = 0) -> dict[str, torch.Tensor]:
    items = [scenes[i][0] for i in range(start, start + n)]
    return {m: torch.stack([it[m] for it in items]) for m in modalities}


def masks_for(model, inputs, cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, x in inputs.items():
        spec = cfg.mask[m][0]
        weights = model.context_encoder.encoder(m).mask_weights
        out[m] = coordinate_block_masks(model.unit_coords(m, x), weights, spec.num_targets, spec.target_size, g)
    return out


def small_model(compose, *overrides):
    cfg = compose(*SMALL, *overrides)
    torch.manual_seed(0)
    return build_hypermodal(cfg).eval(), cfg


def loss_of(model, cfg, inputs, masks, tasks, gate=0) -> StepOutput:
    """The training step's loss terms (:func:`hypermodal_terms`) on the model's predictions."""
    sets = {m: [mask] for m, mask in masks.items()}  # one mask set
    return TrainingStep(model, hypermodal_terms(cfg, model))(inputs=inputs, masks=sets, tasks=tasks, gate=gate)


@pytest.mark.parametrize("shared", ["true", "false"])
def test_add_modality_at_run_time_leaves_every_existing_output_bit_for_bit(shared, compose, scenes):
    model, cfg = small_model(compose, "data.modalities=[image,text]", f"hypermodal.shared_blocks={shared}")
    x = batch(scenes, 8, MODALITIES)
    old = {m: x[m] for m in ("image", "text")}
    masks = masks_for(model, old, cfg)
    tasks = plan_tasks(["image", "text"], "full", step=0)
    before = loss_of(model, cfg, old, masks, tasks)
    embeds = {m: model.embed(m, old[m]) for m in old}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a run in progress

    new = model.add_modality("audio", build_modality_encoder("audio", cfg))
    assert model.modalities == ["image", "text", "audio"] == model.target_encoder.modalities
    after = loss_of(model, cfg, old, masks, tasks)
    assert torch.equal(after.loss, before.loss) and after.terms.keys() == before.terms.keys()
    assert all(torch.equal(after.terms[k], before.terms[k]) for k in before.terms)
    assert all(torch.equal(model.embed(m, old[m]), embeds[m]) for m in old)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    target_row = model.target_encoder.modality_embed("audio")
    assert torch.equal(target_row, model.context_encoder.modality_embed("audio")) and not target_row.requires_grad
    if shared == "false":  # blocks of its own: among the new parameters; the target's a frozen copy of them
        blocks = model.context_encoder.blocks("audio")
        assert {id(p) for p in blocks.parameters()} <= {id(p) for p in new}
        assert blocks is not model.context_encoder.blocks("image")
        target = model.target_encoder.blocks("audio")
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in blocks.state_dict().items())
        assert not any(p.requires_grad for p in target.parameters()) and not any(m.training for m in target.modules())

    # the new modality trains: its parameters join the optimizer and receive gradients
    model.train()
    opt.add_param_group({"params": new})
    three = {**old, "audio": x["audio"]}
    out = loss_of(model, cfg, three, masks_for(model, three, cfg), plan_tasks(list(three), "full", step=0))
    out.loss.backward()
    assert all(p.grad is not None for p in new)
    snapshot = [p.detach().clone() for p in new]
    opt.step()
    assert any(not torch.equal(p, s) for p, s in zip(new, snapshot))


def test_the_config_holds_only_what_the_hypermodal_model_reads(compose):
    """config.yaml describes what was trained: no image-model keys (passing them is an error), and one list of
    mask specs per modality."""
    cfg = compose("experiment=hypermodal_flat")
    assert "model" not in cfg and set(cfg.mask) == set(cfg.hypermodal.modalities)
    assert all(spec.kind == "blocks" for specs in cfg.mask.values() for spec in specs)
    with pytest.raises(ConfigError, match=r"model\.\* is not read by the hypermodal model.*hypermodal\.image"):
        build_hypermodal(compose(*SMALL, "model=vit_tiny"))


def test_two_identical_steps_give_bit_identical_gradients(compose, scenes):
    """Resume equality rests on it; the spatial bias's gather once accumulated its gradient in a varying order."""
    model, cfg = small_model(compose)
    x = batch(scenes, 8)
    masks = masks_for(model, x, cfg)
    tasks = plan_tasks(MODALITIES, "full", step=0)
    grads = []
    for _ in range(3):
        model.zero_grad()
        loss_of(model, cfg, x, masks, tasks).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.predictor.stage.spatial_bias is not None and model.context_encoder.stage.spatial_bias is not None
    for again in grads[1:]:
        assert [n for n in grads[0] if not torch.equal(grads[0][n], again[n])] == []


def test_tasks_read_only_their_source_modalities(compose, scenes):
    model, cfg = small_model(compose)
    x = batch(scenes, 4)
    masks = masks_for(model, x, cfg)
    tasks = plan_tasks(MODALITIES, "full", step=0)
    other = dict(x, audio=batch(scenes, 4, start=20)["audio"])  # change only the audio
    ctx = lambda inp: {m: model.context_encoder(m, inp[m], masks[m].context) for m in MODALITIES}  # noqa: E731
    coords = {m: model.target_encoder(m, x[m]).coords for m in MODALITIES}
    a = model.predict(ctx(x), coords, masks, tasks, gate=0).cond
    b = model.predict(ctx(other), coords, masks, tasks, gate=0).cond
    for task, ca, cb in zip(tasks, a, b):
        assert torch.equal(ca, cb) == ("audio" not in task.sources), task


def test_each_gate_routes_its_own_task_direction(compose, scenes):
    model, cfg = small_model(compose, "hypermodal.m3.enabled=true", "hypermodal.predictor.moe_experts=4")
    x = batch(scenes, 4, ["image", "text"])
    masks = masks_for(model, x, cfg)
    (t0, g0), (t1, g1) = m3_tasks(["image", "text"], step=0), m3_tasks(["image", "text"], step=1)
    assert (g0, g1) == (0, 1)
    assert [(t.sources, t.target) for t in t0 + t1] == [(("image",), "text"), (("text",), "image")]
    ctx = {m: model.context_encoder(m, x[m], masks[m].context) for m in x}
    coords = {m: model.target_encoder(m, x[m]).coords for m in x}
    via0, via1 = (model.predict(ctx, coords, masks, t0, gate=g).cond[0] for g in (0, 1))
    assert not torch.allclose(via0, via1)
    out = loss_of(model, cfg, x, masks, t0, gate=0)
    assert {"jepa/m3", "m3/contrastive", "moe_balance", "energy", "infonce"} <= out.terms.keys()
    alpha = cfg.hypermodal.m3.alpha
    expected = (1 - alpha) * out.terms["m3/contrastive"] + alpha * out.terms["jepa/m3"]
    expected += 0.1 * out.terms["energy"] + out.terms["infonce"] + 0.01 * out.terms["moe_balance"]
    assert torch.allclose(out.loss, expected)
    with pytest.raises(ValueError, match="mixture of experts"):
        small_model(compose, "hypermodal.m3.enabled=true")


def test_curriculum_phases_and_modality_dropout():
    curriculum = [["single", 0.2], ["cross", 0.5], ["full", 1.0]]
    phases = [phase_at(s, 100, curriculum) for s in (0, 19, 20, 49, 50, 99)]
    assert phases == ["single"] * 2 + ["cross"] * 2 + ["full"] * 2
    assert phase_at(0, 100, None) == "full"
    kinds = lambda phase: sorted({t.kind for t in plan_tasks(MODALITIES, phase, 0)})  # noqa: E731
    assert kinds("single") == ["within"] and kinds("cross") == ["cross", "within"]
    assert kinds("full") == ["cross", "joint", "within"]
    cross = [t for s in range(4) for t in plan_tasks(MODALITIES, "cross", s) if t.kind == "cross"]
    pairs = {(t.sources[0], t.target) for t in cross}
    assert len(pairs) == 20  # every ordered pair within n − 1 steps
    with pytest.raises(ValueError, match="valid: single, cross, full"):
        phase_at(0, 10, [["warmup", 1.0]])
    kept = [modality_dropout(MODALITIES, 0.5, torch.Generator().manual_seed(s)) for s in range(200)]
    assert min(map(len, kept)) == 2 and max(map(len, kept)) == 5
    assert kept[:5] == [modality_dropout(MODALITIES, 0.5, torch.Generator().manual_seed(s)) for s in range(5)]
    assert sum(map(len, kept)) / 200 == pytest.approx(2.5 + 0.5, abs=0.4)  # 5 × (1 − p), raised to at least 2


def test_jin_eq_5_6_against_a_hand_computation_on_two_pairs():
    """E(x_i, x_j) = −cos(g_i, g_j) + λ‖g_i‖² (eq. 5); L = mean of the matched pairs' E − mean of the mismatched
    (eq. 6). The norm term appears once in a matched and once in a mismatched pair per row, so it cancels."""
    za = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # |za| = 5, 2
    zb = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # cos: (a1, b1) = 3/5, (a1, b2) = −4/5, (a2, b1) = 0, (a2, b2) = −1
    lam = 0.1
    e11, e12, e21, e22 = -0.6 + lam * 25, 0.8 + lam * 25, 0.0 + lam * 4, 1.0 + lam * 4
    expected = (e11 + e22) / 2 - (e12 + e21) / 2
    assert jin_energy_alignment(za, zb, norm_weight=lam).item() == pytest.approx(expected)
    assert expected == pytest.approx((-0.6 + 1.0) / 2 - (0.8 + 0.0) / 2)  # = −0.2, whatever λ
    za.requires_grad_(True)
    grads = []
    for norm_weight in (0.0, 10.0):
        za.grad = None
        jin_energy_alignment(za, zb, norm_weight).backward()
        grads.append(za.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # λ changes no gradient either


def test_the_energy_loss_is_chosen_by_name_and_an_unknown_name_is_refused(compose):
    model, cfg = small_model(compose, "hypermodal.objectives.energy_margin=0.3")
    z = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    p = Predictions([], {"x": z[0]}, pooled={"image": z[0], "audio": z[1]})

    def energy_term() -> float:
        return next(t for t in hypermodal_terms(cfg, model) if t.name == "energy").measure(model, p).item()

    assert cfg.hypermodal.objectives.energy_loss == "hinge"  # the default
    assert energy_term() == pytest.approx(energy_alignment(z[0], z[1], margin=0.3).item())
    assert energy_term() != pytest.approx(energy_alignment(z[0], z[1], margin=1.0).item())
    cfg.hypermodal.objectives.energy_loss = "jin_eq6"
    assert energy_term() == pytest.approx(jin_energy_alignment(z[0], z[1]).item())
    cfg.hypermodal.objectives.energy_loss = "margin"
    with pytest.raises(ConfigError, match="energy_loss='margin'; valid: hinge, jin_eq6"):
        hypermodal_terms(cfg, model)


@pytest.mark.parametrize("loss", ["hinge", "jin_eq6"])
def test_energy_alignment_separates_matched_from_random_pairs_after_training(loss, compose):
    pair_loss = energy_alignment if loss == "hinge" else jin_energy_alignment
    model, cfg = small_model(compose, "data.modalities=[image,audio,text]")
    data = PairedShapes(128, 3, paired_scene(), modalities=["image", "audio", "text"])
    x = {m: torch.stack([data[i][0][m] for i in range(128)]) for m in ("image", "audio", "text")}

    def energies():
        with torch.no_grad():
            z = {m: model.embed(m, v) for m, v in x.items()}
        e = pair_energy(z["image"], z["audio"]), pair_energy(z["image"], z["text"])
        off = ~torch.eye(128, dtype=torch.bool)
        return [(m.diagonal().mean().item(), m[off].mean().item()) for m in e]

    untrained = energies()
    assert all(abs(matched - random) < 0.05 for matched, random in untrained)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        rows = torch.randperm(128, generator=g)[:32]
        inp = {m: v[rows] for m, v in x.items()}
        z = {m: model.align(m, model.context_encoder.pooled(m, inp[m])) for m in inp}  # as the step: norm, proj
        loss = pair_loss(z["image"], z["audio"]) + pair_loss(z["image"], z["text"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for matched, random in energies():
        assert matched < random - 0.25, (matched, random)


def test_recall_at_k():
    z = torch.nn.functional.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    perfect = recall_at_k(z, z)
    assert perfect == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0}
    shuffled = recall_at_k(z, z[torch.randperm(200, generator=torch.Generator().manual_seed(1))])
    assert shuffled["R@1"] < 0.05 and shuffled["R@10"] < 0.15 and shuffled["median_rank"] > 50
    # ties with the true match are ordered at random (they counted as hits: a collapsed model read R@1 = 1)
    collapsed = recall_at_k(torch.ones(100, 16) / 4, torch.ones(100, 16) / 4)
    assert collapsed == pytest.approx({"R@1": 0.01, "R@5": 0.05, "R@10": 0.1, "median_rank": 50.5})
    twins = torch.cat([z[:50], z[:50]])  # every item has an identical twin (two scenes, one caption)
    assert recall_at_k(twins, twins) == pytest.approx({"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.5})


def test_the_energy_retrieval_correlation_reads_the_energies_of_the_true_and_the_retrieved_pairs():
    """Four queries at 0°, 90°, 180°, 270° and their matches turned 10°, 30°, 95°, −75° from them: the first two
    retrieve their match, the last two each other's (15° and 5° away). Pearson r is computed from those angles."""
    degrees = lambda *a: torch.tensor([[math.cos(math.radians(x)), math.sin(math.radians(x))] for x in a])  # noqa: E731
    queries, matches = degrees(0, 90, 180, 270), degrees(10, 120, 275, 195)
    energy = lambda d: 1 - math.cos(math.radians(d))  # noqa: E731
    right = [1, 1, 0, 0]
    r = energy_retrieval_correlation({"a": queries, "b": matches})["a->b"]
    assert r["matched"] == pytest.approx(np.corrcoef([energy(d) for d in (10, 30, 95, 75)], right)[0, 1])
    assert r["matched"] < -0.9
    # the wrong retrievals land nearer than the second right one's match: the retrieved energy misleads
    assert r["retrieved"] == pytest.approx(np.corrcoef([energy(d) for d in (10, 30, 15, 5)], right)[0, 1])
    assert r["retrieved"] > 0
    # a tie with the true match counts at its chance, as R@1 does: two matches at 0°, the third 10° from its query
    queries, matches = degrees(0, 120, 240), degrees(0, 0, 250)
    r = energy_retrieval_correlation({"a": queries, "b": matches})["a->b"]
    assert r["matched"] == pytest.approx(np.corrcoef([energy(d) for d in (0, 120, 10)], [0.5, 0.5, 1])[0, 1])
    assert r["retrieved"] == pytest.approx(np.corrcoef([energy(d) for d in (0, 120, 10)], [0.5, 0.5, 1])[0, 1])
    # a collapsed model retrieves by chance alike for every query: nothing to correlate with
    collapsed = energy_retrieval_correlation({"a": torch.ones(8, 4) / 2, "b": torch.ones(8, 4) / 2})
    assert all(math.isnan(v) for v in collapsed["a->b"].values())


@pytest.mark.slow
def test_hypermodal_run_end_to_end_and_resumes_exactly(compose, tmp_path):
    cfg = compose(*SMALL, "trainer.max_steps=3", "eval.enabled=false")
    stopped = pretrain(cfg, run_dir=tmp_path / "resumed")
    assert (stopped.status, stopped.step) == ("stopped", 3)
    resumed = pretrain(compose(*SMALL), run_dir=tmp_path / "resumed")
    straight = pretrain(compose(*SMALL), run_dir=tmp_path / "straight")
    assert resumed.step == straight.step == 8
    loss = lambda r: {x["step"]: x["loss"] for x in RunDir(r.run_dir).read_metrics()}  # noqa: E731
    assert loss(resumed) == loss(straight)
    metrics = json.loads((straight.run_dir / "eval.json").read_text())
    pairs = [f"{a}->{b}" for a in MODALITIES for b in MODALITIES if a != b]
    assert sorted(metrics["retrieval"]) == sorted(pairs)
    assert all(set(r) == {"R@1", "R@5", "R@10", "median_rank"} for r in metrics["retrieval"].values())
    assert sorted(metrics["energy_retrieval_r"]) == sorted(pairs)
    assert set(metrics["zero_shot"]) == set(MODALITIES) and set(metrics["modality_dropout"]) == set("12345")
    assert metrics["representation"]["chance_R@1"] == 1 / 64
    for png in ("retrieval.png", "transfer.png", "training_curves.png"):
        assert (straight.run_dir / "plots" / png).stat().st_size > 10_000
    row = summary_row(RunDir(straight.run_dir))  # experiments/compare.py's table
    assert row["model"] == "hypermodal" and row["retrieval_mean_R@1"] == metrics["representation"]["mean_R@1"]
    # the columns an image run fills too: its image modality's probe, the FLOPs of a step (JIN Table 3's columns)
    assert row["linear_probe"] == metrics["representation"]["linear_probe/image"]
    assert row["gflops_per_step"] == metrics["cost"]["flops_per_step"] / 1e9 > 0
    assert "retrieval_min_R@1" in markdown([row]) and "nll_per_dim" not in markdown([row])
    # every modality scored by the probe and k-NN, pretrained and at the random initialization, as an image run is
    scores = {f"{kind}/{m}" for kind in ("linear_probe", "knn") for m in MODALITIES}
    assert scores <= set(metrics["representation"]) and set(metrics["representation"]["random_init"]) == scores
    assert row["knn"] == metrics["representation"]["knn/image"]
    assert row["probe_random_init"] == metrics["representation"]["random_init"]["linear_probe/image"]
    assert row["knn_random_init"] == metrics["representation"]["random_init"]["knn/image"]
    # each score's margin over the random initialization on the same 64 scenes, with its paired standard error
    margin = metrics["representation"]["margin"]
    assert set(margin) == {"scenes"} | scores | {f"{s}_se" for s in scores} and margin["scenes"] == 64
    for s in scores:
        expected = metrics["representation"][s] - metrics["representation"]["random_init"][s]
        assert margin[s] == pytest.approx(expected, abs=1e-6) and margin[f"{s}_se"] >= 0
    assert (row["probe_margin"], row["probe_margin_se"]) == (margin["linear_probe/image"],
                                                             margin["linear_probe/image_se"])


@pytest.mark.parametrize("overrides", [SMALL, []])  # a hypermodal run, the default image run
def test_a_k_nn_k_the_run_can_search_passes_the_preflight_of_fewer_images(compose, overrides):
    """The preflight evaluates on eval.preflight.probe_train_size (32) images: it cuts k with them, and the run's own
    k is checked against the run's own images (pretrain: check_knn_bank)."""
    from prob_jepa.eval import probe_problems
    from prob_jepa.preflight import preflight_config

    small = preflight_config(compose(*overrides, "eval.knn_k=40"))
    assert small.eval.knn_k == small.eval.probe_train_size == 32 and probe_problems(small.eval) == []


def test_the_random_init_reference_is_the_model_training_starts_from(compose, tmp_path):
    """``representation.random_init`` scores the weights the trainer builds before step 1, not another draw."""
    from prob_jepa.data import build_datasets
    from prob_jepa.distributed import DistInfo
    from prob_jepa.hypermodal.evaluate import random_init_model
    from prob_jepa.train import Trainer

    cfg = compose(*SMALL, "eval.enabled=false")
    train_set, = build_datasets(cfg.data, ("train",))
    torch.manual_seed(123)  # whatever ran before: the reference seeds itself
    reference = random_init_model(cfg, torch.device("cpu")).state_dict()
    start = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), RunDir(tmp_path), train_set).model.state_dict()
    assert reference.keys() == start.keys()
    assert all(torch.equal(reference[k], start[k]) for k in start)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["hypermodal_curriculum", "hypermodal_m3"])
def test_hypermodal_presets_train(compose, tmp_path, preset):
    overrides = [o for o in SMALL if not o.startswith("experiment=")]
    result = pretrain(compose(f"experiment={preset}", *overrides, "eval.enabled=false"), run_dir=tmp_path)
    records = RunDir(result.run_dir).read_metrics()
    assert result.status == "completed" and len(records) == 8
    if preset == "hypermodal_m3":
        assert all("jepa/m3" in r and "moe_balance" in r for r in records)
    else:  # single-modality steps first, then cross-modal, then full
        assert "jepa/cross" not in records[0] and "energy" not in records[0]
        assert "jepa/cross" in records[-1] and "jepa/joint" in records[-1]


@pytest.mark.parametrize("overrides, named", [
    (["hypermodal.curriculum=[[single,0.5],[crosss,1.0]]"], "unknown phase 'crosss'"),
    (["hypermodal.curriculum=[[full,0.5],[single,1.0]]", "hypermodal.objectives.within=0"], "'single' has no loss"),
    (["trainer.batch_size=4", "trainer.micro_batch_size=1"], "batch norm needs at least 2"),
    (["eval.enabled=true", "eval.probe_train_size=20", "eval.knn_k=30"],
     r"eval\.knn_k=30 .* eval\.probe_train_size=20"),
    (["eval.enabled=true", "eval.knn_k=200"], r"eval\.knn_k=200 must be at most the 128 images"),  # probe size null
    (["eval.enabled=true", "eval.knn_temperature=0"], r"eval\.knn_temperature=0 must be a finite number > 0"),
    (["eval.enabled=true", "eval.batch_size=0"], r"eval\.batch_size=0 must be a positive number of images"),
    (["eval.enabled=true", "eval.batch_size=null"], r"eval\.batch_size=None must be a positive number of images"),
    (["data.modalities=[]"], r"data\.modalities=\[\] must list distinct modalities, at least one"),
    (["data.modalities=[audio,audio]"], r"data\.modalities=\['audio', 'audio'\] must list distinct"),
    (["data.modalities=[audio]", "hypermodal.objectives.within=0"], r"hypermodal\.objectives\.within=0 with "),
    (["data.modalities=[image]", "hypermodal.m3.enabled=true"], r"hypermodal\.m3\.enabled=true with data\.mod"),
])
def test_hypermodal_settings_that_fail_late_fail_before_step_1(overrides, named, tmp_path):
    """A curriculum phase is reached after some steps; it is checked before the first."""
    from prob_jepa.config import ConfigError

    with pytest.raises(ConfigError, match=named):
        pretrain(compose_config(CONF, [*SMALL, "eval.enabled=false", *overrides]), run_dir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_hierarchical_image_backbone_is_composed_with_its_model_or_rejected_by_name(compose):
    """experiment=hypermodal_shapes puts model.* (JIN's encoder, with its spatial bias) in the image modality;
    every other combination names the keys that would not be read."""
    cfg = compose("model=jin_tiny", "experiment=hypermodal_shapes")
    assert cfg.hypermodal.image.backbone == cfg.model.name == "jin_tiny"
    assert cfg.hypermodal.predictor == cfg.model.predictor  # the predictor is model.predictor
    image = build_hypermodal(cfg).context_encoder.encoder("image")
    assert isinstance(image, HierarchicalModalityEncoder) and image.backbone.levels == 2
    assert all(stage.spatial_bias is not None for stage in image.backbone.stages)  # JIN eq. 7-8 at every level
    assert compose("experiment=hypermodal_shapes") == cfg  # jin_tiny is the default
    with pytest.raises(ConfigError, match=r"model\.\* is not read.*experiment=hypermodal_shapes"):
        build_hypermodal(compose(*SMALL, "model=jin_tiny"))
    with pytest.raises(ConfigError, match=r"hypermodal\.image\.backbone=jin_tiny needs model=jin_tiny"):
        build_hypermodal(compose(*SMALL, "hypermodal.image.backbone=jin_tiny"))
    with pytest.raises(ConfigError, match=r"model\.predictor\.levels=2.*must be 1"):
        build_hypermodal(compose("experiment=hypermodal_shapes", "model.predictor.levels=2"))
    for levels in ("1", "[0.5]", "[]", "[1,1]", "[2]", "[[0]]"):
        with pytest.raises(ConfigError, match=r"hypermodal\.image\.levels=.*a list of distinct levels.*\(0 … 1\)"):
            build_hypermodal(compose("experiment=hypermodal_shapes", f"hypermodal.image.levels={levels}"))
    with pytest.raises(ConfigError, match=r"hypermodal\.image\.levels=\[0, 1\] needs JIN's image encoder"):
        build_hypermodal(compose(*SMALL, "hypermodal.image.levels=[0,1]"))
    # the predictor of hypermodal_shapes is model.predictor: its errors name the keys a user sets
    with pytest.raises(ConfigError, match=r"set model\.predictor\.moe_experts > 0"):
        build_hypermodal(compose("experiment=hypermodal_shapes", "hypermodal.m3.enabled=true"))
    with pytest.raises(ConfigError, match=r"model\.predictor\.moe_top_k=3 must be between 1 and"):
        build_hypermodal(compose("experiment=hypermodal_shapes", "model.predictor.moe_experts=2",
                                 "model.predictor.moe_top_k=3"))
    # SIGReg reads the coarsest level's norm: it trains even when the shared space takes only level 0
    model = build_hypermodal(compose("experiment=hypermodal_shapes", "model.cross_scale=false",
                                     "hypermodal.image.levels=[0]"))
    norms = model.context_encoder.encoder("image").backbone.norms
    assert norms[0].weight.requires_grad and norms[1].weight.requires_grad


HIERARCHICAL = [  # jin_tiny, shrunk, as the image encoder beside text (experiment=hypermodal_shapes)
    "experiment=hypermodal_shapes", *[o for o in SMALL[1:] if not o.startswith("hypermodal.predictor.")],
    *[o for o in shrunk_model("jin_tiny") if not o.startswith(("mask.", "data.marker", "data.train_size",
                                                                 "data.val_size"))],
    "data.modalities=[image,text]", "model.predictor.levels=1", "mask.image.0.num_targets=2",
    "mask.image.0.target_size=2",
]


def test_frozen_scores_mark_each_item_right_as_their_scores_count_it(compose):
    """A hypermodal run's per-item rights (``representation.margin`` pairs them) are its probe's and k-NN's own,
    item by item, and their means are the scores, for features the probe reads well and features it reads badly."""
    from prob_jepa.eval.representation import knn_predict, linear_probe
    from prob_jepa.hypermodal.evaluate import frozen_scores

    e = compose().eval
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(30)
    centres = 2 * torch.randn(4, 8, generator=g)
    features = lambda noise: centres[y] + noise * torch.randn(120, 8, generator=g)  # noqa: E731
    for noise in (0.5, 3.0):
        train, val = features(noise), features(noise)
        scores, right = frozen_scores({"image": train}, y, {"image": val}, y, e)
        assert set(right) == set(scores) == {"linear_probe/image", "knn/image"}
        probe = linear_probe(train, y, val, y, max_iter=e.probe_max_iter).logits.argmax(1) == y
        knn = knn_predict(train, y, val, k=e.knn_k, temperature=e.knn_temperature) == y
        assert torch.equal(right["linear_probe/image"], probe) and torch.equal(right["knn/image"], knn)
        for score, is_right in right.items():
            assert is_right.float().mean().item() == pytest.approx(scores[score], abs=1e-6)
        if noise == 3.0:  # the two differ: a right of one under the other's name fails
            assert not torch.equal(probe, knn)


@pytest.mark.slow
def test_a_one_modality_run_trains_and_is_scored_against_its_random_initialization(compose, tmp_path):
    """The image alone through the hierarchical encoder and the shared space (the image JEPA as the one-modality case
    of the hypermodal model): no alignment, no retrieval, the probe and k-NN against the random initialization."""
    result = pretrain(compose(*HIERARCHICAL, "data.modalities=[image]", "trainer.max_steps=3"), run_dir=tmp_path)
    metrics = result.metrics
    assert (result.status, result.step) == ("stopped", 3)
    scores = {f"{kind}/{m}" for kind in ("linear_probe", "knn") for m in ("image", "image/encoder")}
    assert set(metrics["representation"]) == scores | {"random_init", "margin"}
    assert "retrieval" not in metrics and "energy" not in metrics
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["training_curves.png"]
    assert not any(k in r for r in RunDir(tmp_path).read_metrics() for k in ("energy", "infonce", "jepa/cross"))
    # compare.py's columns read the shared space's image token where there is one, not the encoder's level
    margin, row = metrics["representation"]["margin"], summary_row(RunDir(tmp_path))
    assert (row["probe_margin"], row["probe_margin_se"]) == (margin["linear_probe/image"],
                                                             margin["linear_probe/image_se"])
    assert row["linear_probe"] == metrics["representation"]["linear_probe/image"]

def test_model_level_weights_share_an_image_prediction_between_its_levels(compose, scenes):
    """JIN eq. 9's level weights in the hypermodal model: with hypermodal.image.levels=[0,1] the image's JEPA term
    is Σ_l w_l · loss_l / Σ_l w_l — linear in the normalized weights, not the mean over the 4 + 1 tokens of a unit;
    with the coarsest level alone the weights change nothing; weights without a positive sum are refused by name."""
    x = batch(scenes, 4, ["image", "text"])

    def image_term(*overrides: str) -> torch.Tensor:
        cfg = compose(*HIERARCHICAL, *overrides)
        torch.manual_seed(0)
        model = build_hypermodal(cfg).eval()
        masks = masks_for(model, x, cfg)
        return loss_of(model, cfg, x, masks, plan_tasks(["image"], "single", step=0)).terms["jepa/within"]

    levels = "hypermodal.image.levels=[0,1]"
    only0, only1 = image_term(levels, "model.level_weights=[1.0,0.0]"), image_term(levels, "model.level_weights=[0,1]")
    assert abs(only0 - only1) > 1e-3 * only0.abs()
    torch.testing.assert_close(image_term(levels, "model.level_weights=[3.0,1.0]"), 0.75 * only0 + 0.25 * only1)
    assert torch.equal(image_term("model.level_weights=[1.0,0.5]"), image_term("model.level_weights=[0.2,3.0]"))
    for weights, levels_ in (("[1.0,0.0]", "null"), ("[0.0,0.0]", "[0,1]")):
        with pytest.raises(ConfigError, match=r"model\.level_weights=.*sum over hypermodal\.image\.levels="):
            build_hypermodal(compose(*HIERARCHICAL, f"model.level_weights={weights}",
                                     f"hypermodal.image.levels={levels_}"))
    for weights in ("[1.0]", "null", "[-1.0,2.0]", "[nan,1]", "[inf,1]", "[a,1]"):
        with pytest.raises(ConfigError, match=r"model\.level_weights=.* must give a finite weight >= 0 for each of "):
            build_hypermodal(compose(*HIERARCHICAL, f"model.level_weights={weights}", "hypermodal.image.levels=[0,1]"))


def test_a_hypermodal_mask_that_leaves_no_context_fails_before_step_1(compose):
    from prob_jepa.distributed import DistInfo
    from prob_jepa.hypermodal.planner import HypermodalPlanner

    model, cfg = small_model(compose, "mask.text.0.num_targets=20")
    with pytest.raises(ConfigError, match=r"mask\.text\.0: 20 target blocks .* leave no context"):
        HypermodalPlanner(cfg, model, DistInfo(0, 1, 0, torch.device("cpu")), micro=8, accum=1, total_steps=1)


def test_a_hypermodal_run_saved_before_recipes_and_the_heads_list_still_loads(compose, tmp_path):
    """Its config.yaml has no recipe, hypermodal.image.backbone, .image.levels, .predictor.drop_path_rate,
    .objectives.energy_loss, .energy_norm_weight or .within_targets, and its checkpoint holds the head at head.* (now
    heads.0.*)."""
    from omegaconf import OmegaConf

    from prob_jepa.checkpoint import save_checkpoint
    from prob_jepa.run_io import load_run

    model, cfg = small_model(compose)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["recipe"], old["hypermodal"]["image"]["backbone"], old["hypermodal"]["image"]["levels"]
    del old["hypermodal"]["predictor"]["drop_path_rate"]
    del old["hypermodal"]["objectives"]["energy_loss"], old["hypermodal"]["objectives"]["energy_norm_weight"]
    del old["hypermodal"]["within_targets"]
    run = RunDir(tmp_path)
    run.create()
    OmegaConf.save(OmegaConf.create(old), run.config)
    state = {k.replace("heads.0.", "head.", 1): v for k, v in model.state_dict().items()}
    assert any(k.startswith("head.") for k in state)
    save_checkpoint(run.checkpoint, {"model": state})
    loaded, loaded_cfg = load_run(tmp_path, "cpu")
    assert loaded_cfg.recipe == "hypermodal" and loaded_cfg.hypermodal.image.backbone is None
    assert loaded_cfg.hypermodal.image.levels is None and loaded_cfg.hypermodal.within_targets == "shared"
    objectives = loaded_cfg.hypermodal.objectives
    assert (objectives.energy_loss, objectives.energy_norm_weight) == ("hinge", 0.0)  # what it trained with
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_recipe_without_its_config_nodes_fails_naming_them(compose, tmp_path):
    from prob_jepa.recipes import recipe_of

    with pytest.raises(ConfigError, match=r"recipe=hypermodal reads hypermodal\.\*.*experiment=hypermodal_\*"):
        recipe_of(compose("recipe=hypermodal"))
    with pytest.raises(ConfigError, match=r"recipe=image reads model\.\*, which"):
        recipe_of(compose("experiment=hypermodal_flat", "recipe=image"))
    with pytest.raises(ConfigError, match=r"recipe='video'; valid: image, hypermodal"):
        recipe_of(compose("recipe=video"))
    with pytest.raises(ConfigError, match=r"recipe=hypermodal reads"):  # before config.yaml is written
        pretrain(compose("recipe=hypermodal"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_hierarchy_terms_score_each_hierarchical_modality_and_average():
    """The cross-scale, budget and SIGReg terms score every hierarchical modality of the step on its own and average
    them: one modality's surplus α cannot pay for another's deficit, and SIGReg tests each modality (a mixture can
    look Gaussian when no part does); with one hierarchy each term is that hierarchy's value itself."""
    from types import SimpleNamespace

    from prob_jepa.model import alpha_logs, budget_term, cross_scale_term, sigreg_term
    from jin.encoder import Level

    g = torch.Generator().manual_seed(0)
    image = [Level(torch.randn(2, 3, 4, 5, generator=g), None, torch.tensor([1.0, 1.0])),
             Level(torch.randn(2, 3, 1, 7, generator=g), None, torch.tensor([1.0, 1.0]))]
    audio = [Level(torch.randn(2, 6, 4, 5, generator=g), None, torch.tensor([0.8, 0.8])),
             Level(torch.randn(2, 6, 1, 7, generator=g), None, torch.tensor([0.4, 0.4]))]
    scores = {3: torch.tensor(1.0), 6: torch.tensor(3.0)}  # a planted cross-scale loss per hierarchy (by its units)
    model = SimpleNamespace(cross_scale=lambda features: scores[features[0].shape[1]],
                            sigreg=lambda tokens: tokens.shape[0] * torch.tensor(1.0))
    both, alone = Predictions([], {}, hierarchies=[image, audio]), Predictions([], {}, hierarchies=[image])
    budget = budget_term([0.9, 0.7])
    # image (0.1² + 0.3²) = 0.1, audio (0.1² + 0.3²) = 0.1: 0.1 each, not 0 as the mean α (0.9, 0.7) would score
    torch.testing.assert_close(budget(model, both), torch.tensor(0.1))
    assert float(cross_scale_term(model, both)) == 2.0 and float(cross_scale_term(model, alone)) == 1.0
    assert float(sigreg_term(model, both)) == (2 * 3 + 2 * 6) / 2  # each hierarchy's own tokens, then the mean
    torch.testing.assert_close(alpha_logs(both), {"alpha/level0": torch.tensor(0.9), "alpha/level1": torch.tensor(0.7)})
    assert all(term(model, Predictions([], {})) is None for term in (cross_scale_term, sigreg_term, budget))


@pytest.mark.parametrize("overrides, named", [
    (["hypermodal.hierarchy.modalities=[text]"], r"hypermodal\.hierarchy\.modalities=\['text'\]: distinct modalities "
                                                 r"of \['audio', 'video', 'points'\].*text has none"),
    (["hypermodal.hierarchy.modalities=[audio,audio]"], r"distinct modalities"),
    (["data.modalities=[image,audio]", "hypermodal.hierarchy.modalities=[video]"],
     r"lists \['video'\], which hypermodal\.modalities \(\['image', 'audio'\]\) does not"),
    (["hypermodal.hierarchy.modalities=[audio]", "hypermodal.hierarchy.depths=[1]"],
     r"hypermodal\.hierarchy\.depths=\[1\]: one block count ≥ 1 for each of model=jin_tiny's 2 levels"),
    (["hypermodal.hierarchy.modalities=[audio]", "hypermodal.hierarchy.grid=12"],
     r"hypermodal\.hierarchy\.grid=12: a multiple of 2 .* that divides audio's \(32, 32\)"),
    (["hypermodal.hierarchy.modalities=[video]", "hypermodal.video.tubelet=[3,4]"],
     r"hypermodal\.video\.tubelet\[0\]=3 frames × 1 time step\(s\) .* must divide data\.video_frames=4"),
    (["hypermodal.hierarchy.modalities=[video]", "hypermodal.video.tubelet=[1,4]", "hypermodal.video.temporal_levels=3"],
     r"hypermodal\.video\.temporal_levels=3: how many of model=jin_tiny's 2 levels .* 1 … 2"),
    (["hypermodal.hierarchy.modalities=[video]", "hypermodal.video.temporal_levels=2"],
     r"hypermodal\.video\.tubelet\[0\]=4 frames × 2 time step\(s\) \(2\^\(hypermodal\.video\.temporal_levels-1\)\) "
     r"must divide data\.video_frames=4"),
    (["hypermodal.points.voxel_levels=2"], r"hypermodal\.points\.voxel_levels=2 shapes JIN's point hierarchy, and "
                                           r"hypermodal\.hierarchy\.modalities \(\[\]\) has no points"),
    (["hypermodal.hierarchy.modalities=[video]", "hypermodal.video.tubelet=[0,4]"],
     r"hypermodal\.video\.tubelet\[0\]=0: frames per tubelet, a positive integer"),
    (["hypermodal.hierarchy.modalities=[points]", "hypermodal.points.voxel_levels=0"],
     r"hypermodal\.points\.voxel_levels=0: how many of model=jin_tiny's 2 levels of the points hierarchy"),
])
def test_a_modality_hierarchy_that_cannot_be_built_is_rejected_by_name(overrides, named, compose):
    with pytest.raises(ConfigError, match=named):
        build_hypermodal(compose("experiment=hypermodal_shapes", *overrides))


def test_a_modality_hierarchy_needs_jin_s_model_and_an_old_config_had_none(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"hypermodal\.hierarchy\.modalities=\['audio'\] take JIN's hierarchy from "
                                          r"model\.\*.*experiment=hypermodal_shapes"):
        build_hypermodal(compose(*SMALL, "hypermodal.hierarchy.modalities=[audio]"))
    cfg = compose("experiment=hypermodal_shapes")
    del cfg.hypermodal.hierarchy  # a run saved before modalities other than the image had a hierarchy
    del cfg.hypermodal.ablation  # and before JIN Table 3 had multimodal rows
    del cfg.hypermodal.shared_blocks  # and before late fusion
    del cfg.hypermodal.points.voxel_levels  # and before voxels
    run = RunDir(tmp_path)
    run.save_config(cfg)
    assert list(run.load_config().hypermodal.hierarchy.modalities) == []
    assert run.load_config().hypermodal.shared_blocks is True and run.load_config().hypermodal.points.voxel_levels == 1
    assert model_label(run.load_config()) == "hypermodal+jin_tiny"  # compare.py's model column


def test_the_model_column_names_the_modalities_with_a_hierarchy(compose):
    assert model_label(compose("experiment=hypermodal_shapes")) == "hypermodal+jin_tiny"
    assert (model_label(compose("experiment=hypermodal_hierarchies"))
            == "hypermodal+jin_tiny+audio,video[2 time steps],points")
    assert (model_label(compose("experiment=hypermodal_hierarchies", "hypermodal.points.voxel_levels=2"))
            == "hypermodal+jin_tiny+audio,video[2 time steps],points[2 heights]")
    assert model_label(compose("experiment=hypermodal_flat")) == "hypermodal"
    assert (model_label(compose("experiment=hypermodal_shapes", "hypermodal.within_targets=levels"))
            == "hypermodal+jin_tiny [within: levels]")


def test_the_point_hierarchy_s_target_blocks_hide_pillars_that_hold_points(compose, scenes):
    """In ``experiment=hypermodal_hierarchies`` most pillar units of a cloud are empty; the step's target blocks hide
    units that hold points (the context keeps the rest), not empty space whose token is the same in every cloud."""
    from prob_jepa.distributed import DistInfo
    from prob_jepa.hypermodal.planner import HypermodalPlanner

    cfg = compose("experiment=hypermodal_hierarchies", "hypermodal.modality_dropout=0")
    torch.manual_seed(0)
    model = build_hypermodal(cfg).eval()
    planner = HypermodalPlanner(cfg, model, DistInfo(0, 1, 0, torch.device("cpu")), micro=8, accum=1, total_steps=1)
    inputs = batch(scenes, 8, ["image", "points"])
    content = model.context_encoder.encoder("points").unit_content(inputs["points"])  # [8, 64]
    assert 0.2 < (content > 0).float().mean() < 0.6  # most units are empty
    targets = planner((inputs, None), step=0, micro=0)["masks"]["points"][0].targets.flatten(1)
    assert (content.gather(1, targets) > 0).all()


LEVELS = [*HIERARCHICAL, "hypermodal.within_targets=levels"]


@pytest.mark.parametrize("predict", ["1", "null"])  # the coarsest level (jin_tiny's default), both levels
def test_a_within_prediction_at_the_levels_is_the_image_jepa_s(compose, scenes, predict):
    """hypermodal.within_targets=levels: beside another modality, the image's within-modality JEPA term is the image
    JEPA's loss (the image recipe's level terms, JIN eq. 9, on the same model and masks: the same number up to
    float rounding, its weight shared between the levels), and the shared space is left out of it (the shared blocks
    get no gradient from it)."""
    from prob_jepa.masks import image_inputs
    from prob_jepa.model import image_terms

    cfg = compose(*LEVELS, f"model.predictor.levels={predict}", "model.level_weights=[0.3,0.6]")
    torch.manual_seed(0)
    model = build_hypermodal(cfg).eval()
    with torch.no_grad():  # the target encoder as after training: not the context encoder
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = batch(scenes, 4, ["image"])
    masks = masks_for(model, x, cfg)
    task = plan_tasks(["image"], "single", step=0)
    hyper = loss_of(model, cfg, x, masks, task)
    image = TrainingStep(model, image_terms(cfg, model))(**image_inputs(x["image"], [masks["image"]]))
    levels = model.predict_levels
    assert levels == ([1] if predict == "1" else [0, 1]) and len(model.heads) == 1 + len(levels)
    assert set(image.terms) >= {f"jepa/level{l}" for l in levels}
    # the image JEPA weighs level l by model.level_weights[l]; the hypermodal term shares one weight between them
    expected = sum(0.6 if l == 1 else 0.3 for l in levels)
    # (Σ_l share_l · loss_l) · Σ_l w_l against Σ_l w_l · loss_l / Σ_l w_l: equal up to float32 rounding
    torch.testing.assert_close(hyper.terms["jepa/within"] * expected, image.terms["jepa"], rtol=1e-6, atol=0)
    hyper.terms["jepa/within"].backward()
    assert all(p.grad is None for p in model.context_encoder.stage.parameters())
    assert all(p.grad is None for p in [*model.predictor.tokens["shared"].parameters(), *model.heads[0].parameters()])
    image_part = [*model.predictor.tokens["image"].parameters(), *model.predictor.stage.parameters()]
    assert all(p.grad is not None for p in image_part if p.requires_grad)
    assert set(hyper.targets) == {"image"} and hyper.targets["image"].shape[-1] == cfg.model.dims[0]


def test_within_targets_at_the_levels_leave_cross_tasks_in_the_shared_space(compose, scenes):
    """Beside another modality the image's within task reads its levels, the text's its shared-space tokens, and
    cross-modal tasks and the alignment the shared space (its blocks get a gradient); every trainable parameter of
    the task's paths trains."""
    cfg = compose(*LEVELS)
    torch.manual_seed(0)
    model = build_hypermodal(cfg).train()
    x = batch(scenes, 4, ["image", "text"])
    masks = masks_for(model, x, cfg)
    out = loss_of(model, cfg, x, masks, plan_tasks(["image", "text"], "cross", step=0))
    assert {"jepa/within", "jepa/cross", "energy", "infonce"} <= set(out.terms)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and list(model.predictor.tokens) == ["shared", "image"]
    # each modality's within prediction counts once, however many levels the image's is made of
    cfg = compose(*LEVELS, "model.predictor.levels=null", "model.level_weights=[0.3,0.6]")
    torch.manual_seed(0)
    model = build_hypermodal(cfg).eval()
    within = {m: loss_of(model, cfg, x, masks, plan_tasks([m], "single", step=0)).terms["jepa/within"]
              for m in ("image", "text")}
    both = loss_of(model, cfg, x, masks, plan_tasks(["image", "text"], "single", step=0)).terms["jepa/within"]
    torch.testing.assert_close(both, (within["image"] + within["text"]) / 2)


def test_one_predictor_pass_predicts_the_levels_and_the_shared_space_as_a_pass_each(compose, scenes):
    """hypermodal.within_targets=levels beside another modality: the image's levels and the shared space's tasks are
    parts of one predictor pass (TaskTokens), kept apart by the attention mask — each part's cond is what a pass of
    that part alone gives, and moving one part's tokens leaves the other's cond unchanged to the last bit."""
    from prob_jepa.predictor import SHARED

    cfg = compose(*LEVELS, "model.predictor.levels=null")
    torch.manual_seed(0)
    model = build_hypermodal(cfg).eval()
    x = batch(scenes, 4, ["image", "text"])
    masks = masks_for(model, x, cfg)
    tasks = [t for t in plan_tasks(["image", "text"], "cross", step=0) if t.target != "image" or t.kind != "within"]
    with torch.no_grad():
        own = {m: model.context_encoder.encode(m, x[m], masks[m].context) for m in x}
        ctx = {m: model.context_encoder.share(m, t) for m, t in own.items()}
        coords = {m: model.target_encoder.share(m, model.target_encoder.encode(m, x[m])).coords for m in x}
        parts = {SHARED: model.shared_inputs(ctx, coords, masks, tasks),
                 "image": model.level_inputs("image", own["image"], masks["image"])}
        joint = model.predictor(parts).cond
        assert list(joint) == [SHARED, "image"] and len(joint["image"]) == 2 and len(joint[SHARED]) == len(tasks)
        for name, args in parts.items():
            alone = model.predictor({name: args}).cond[name]
            for a, b in zip(joint[name], alone, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        seen, where = parts["image"]
        moved = model.predictor({**parts, "image": ([(f + 1.0, c) for f, c in seen], where)}).cond
        assert all(torch.equal(a, b) for a, b in zip(joint[SHARED], moved[SHARED], strict=True))
        assert not torch.allclose(joint["image"][-1], moved["image"][-1])
    assert len(model.predictor.stage.blocks) == cfg.model.predictor.depth  # one predictor: one set of blocks


def test_one_pass_needs_one_spatial_bias(compose):
    """The levels' spatial bias is model.*'s and the shared space's hypermodal.*'s: in one pass they must agree."""
    for override, named in [("hypermodal.spatial_bias=false", r"model\.spatial_bias=True and "
                             r"hypermodal\.spatial_bias=False must agree"),
                            ("hypermodal.bias_hidden=8", r"model\.bias_hidden=16 and hypermodal\.bias_hidden=8")]:
        with pytest.raises(ConfigError, match=named):
            build_hypermodal(compose(*LEVELS, override))
        build_hypermodal(compose(*HIERARCHICAL, override))  # the shared space's alone: its own


def test_a_checkpoint_of_before_the_predictor_s_parts_loads(compose):
    """Hypermodal runs written before the predictor's sequence had parts hold its embeddings at predictor.tokens.*:
    they load under predictor.tokens.shared.*, every tensor where it was."""
    torch.manual_seed(0)
    trained = build_hypermodal(compose(*SMALL))
    old = {k.replace("predictor.tokens.shared.", "predictor.tokens."): v for k, v in trained.state_dict().items()}
    assert "predictor.tokens.query_embed.weight" in old
    torch.manual_seed(1)
    fresh = build_hypermodal(compose(*SMALL))
    fresh.load_state_dict(old)  # strict
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_a_level_predictor_beside_the_shared_one_is_refused_by_name(compose):
    """Runs of hypermodal.within_targets=levels with several modalities written before the one predictor pass hold
    two predictors (level_predictors.image.*, predictor.*), which are not one: loading one says so instead of
    listing missing and unexpected keys."""
    torch.manual_seed(0)
    model = build_hypermodal(compose(*LEVELS))
    old = dict(model.state_dict())
    old.update({f"level_predictors.image.{k[len('predictor.'):]}": v for k, v in old.items()
                if k.startswith("predictor.")})
    with pytest.raises(ValueError, match=r"a predictor for the levels of image beside the shared-space predictor"):
        model.load_state_dict(old)


@pytest.mark.parametrize("targets", ["shared", "levels"])
def test_a_step_without_predictions_trains_the_alignment_and_the_hierarchy(compose, scenes, targets):
    """A phase may plan no prediction (e.g. every JEPA objective at 0): the step still aligns the modalities and
    keeps the hierarchy's terms (cross-scale, SIGReg), and the predictor gets no gradient."""
    cfg = compose(*HIERARCHICAL, f"hypermodal.within_targets={targets}", "model.sigreg_weight=0.1")
    torch.manual_seed(0)
    model = build_hypermodal(cfg).train()
    x = batch(scenes, 4, ["image", "text"])
    out = loss_of(model, cfg, x, masks_for(model, x, cfg), [])
    assert {"energy", "infonce", "cross_scale", "sigreg"} <= set(out.terms) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.predictor.parameters())
    assert any(p.grad is not None for p in model.cross_scale.parameters())


def test_a_one_modality_checkpoint_with_the_shared_space_of_before_is_left_to_its_hook(compose):
    """The names of a one-modality run at its levels of before 1f0ad1c (an untrained shared predictor at
    predictor.* beside the level predictor) are not refused as a level predictor beside a shared one: the load hook
    drops that shared space first (test above), and a resume is refused for the optimizer state it holds."""
    from prob_jepa.jepa import legacy_names

    model = build_hypermodal(compose(*LEVELS, "data.modalities=[image]"))
    names = ["proj.weight", "predictor.stage.blocks.0.attn.qkv.weight",
             "level_predictors.image.stage.blocks.0.attn.qkv.weight"]
    assert legacy_names(model, names) == {}


def test_within_targets_are_checked_by_name(compose):
    with pytest.raises(ConfigError, match=r"hypermodal\.within_targets='tokens'; valid: shared, levels"):
        build_hypermodal(compose(*HIERARCHICAL, "hypermodal.within_targets=tokens"))
    with pytest.raises(ConfigError, match=r"within_targets=levels predicts .* \(hypermodal\.image\.backbone=null\)"):
        build_hypermodal(compose(*SMALL, "hypermodal.within_targets=levels"))
    # with the shared space's targets the image JEPA's predictor levels are refused; at the levels they are read
    with pytest.raises(ConfigError, match=r"model\.predictor\.levels=null: with hypermodal\.within_targets=shared"):
        build_hypermodal(compose(*HIERARCHICAL, "model.predictor.levels=null"))
    assert build_hypermodal(compose(*LEVELS, "model.predictor.levels=null")).predict_levels == [0, 1]
    # the image's shared-space level (0) weighed, the predicted one (1) not: refused, as the image JEPA refuses it
    with pytest.raises(ConfigError, match=r"model\.level_weights=\[1\.0, 0\.0\] weighs the predicted levels \[1\] "):
        build_hypermodal(compose(*LEVELS, "hypermodal.image.levels=[0]", "model.level_weights=[1.0,0.0]"))
    with pytest.raises(ConfigError, match=r"model\.predictor\.levels=null predicts level\(s\) \[0\] of the video "
                                          r"hierarchy, which have several time steps \(hypermodal\.video\.temporal"):
        build_hypermodal(compose(*LEVELS, "model.predictor.levels=null", "data.modalities=[image,video]",
                                 "hypermodal.hierarchy.modalities=[video]", "hypermodal.video.temporal_levels=2",
                                 "hypermodal.video.tubelet=[1,4]"))


@pytest.mark.parametrize("predict", ["1", "null"])
def test_the_image_alone_at_its_levels_is_the_image_jepa(compose, scenes, predict):
    """data.modalities=[image] with hypermodal.within_targets=levels builds no shared space: from the same seed it is
    the image recipe's model (build_model of the same config) — the same parameter and buffer names and values to the
    last bit — and on the same masks every loss term is the image recipe's (the JEPA term weighed by
    hypermodal.objectives.within = the predicted levels' weights)."""
    from prob_jepa.masks import image_inputs
    from prob_jepa.model import build_model, image_terms

    weights = [0.3, 0.6]
    predicted = weights[1:] if predict == "1" else weights
    cfg = compose(*LEVELS, "data.modalities=[image]", f"model.predictor.levels={predict}",
                  f"model.level_weights={weights}", f"hypermodal.objectives.within={sum(predicted)}",
                  "model.sigreg_weight=0.1")
    torch.manual_seed(0)
    model = build_hypermodal(cfg).eval()
    torch.manual_seed(0)
    jepa = build_model(cfg).eval()
    state, expected = model.state_dict(), jepa.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in jepa.named_parameters()]
    assert not model.context_encoder.shared_space and list(model.predictor.tokens) == ["image"] and model.proj is None
    with torch.no_grad():  # the target encoders as after training: not their context encoders
        for p, q in zip(model.target_encoder.parameters(), jepa.target_encoder.parameters(), strict=True):
            p.add_(0.05 * torch.randn_like(p))
            q.copy_(p)
    x = batch(scenes, 4, ["image"])
    masks = masks_for(model, x, cfg)
    torch.manual_seed(1)  # SIGReg draws its directions
    hyper = loss_of(model, cfg, x, masks, plan_tasks(["image"], "single", step=0))
    torch.manual_seed(1)
    image = TrainingStep(jepa, image_terms(cfg, jepa))(**image_inputs(x["image"], [masks["image"]]))
    assert {"cross_scale", "budget", "sigreg"} <= set(image.terms)
    for term in ("cross_scale", "budget", "sigreg"):
        torch.testing.assert_close(hyper.terms[term], image.terms[term], rtol=0, atol=0)
    torch.testing.assert_close(hyper.terms["jepa/within"] * sum(predicted), image.terms["jepa"], rtol=0, atol=0)
    torch.testing.assert_close(hyper.loss, image.loss)


def test_a_model_without_a_shared_space_refuses_what_needs_one(compose):
    """No second modality joins it, and shared-space image levels are refused by name."""
    torch.manual_seed(0)
    model = build_hypermodal(compose(*LEVELS, "data.modalities=[image]"))
    with pytest.raises(ValueError, match=r"modality 'text': this model has no shared space for it to meet image"):
        model.add_modality("text", model.context_encoder.encoder("image"))
    with pytest.raises(ConfigError, match=r"hypermodal\.image\.levels=\[0, 1\] puts image levels in the shared space, "
                                          r"and this run has none"):
        build_hypermodal(compose(*LEVELS, "data.modalities=[image]", "hypermodal.image.levels=[0,1]"))
    for row in ("ablation=late_fusion", "hypermodal.shared_blocks=false"):
        with pytest.raises(ConfigError, match=r"these rows change the shared space, and this run has none"):
            build_hypermodal(compose(*LEVELS, "data.modalities=[image]", row))


def test_a_model_without_a_shared_space_takes_what_the_image_jepa_takes(compose, tmp_path):
    """What only the shared space constrains is not asked of it: level weights that leave the coarsest level at 0
    (the image JEPA trains them) and a micro-batch of one image (no alignment's batch norm)."""
    model = build_hypermodal(compose(*LEVELS, "data.modalities=[image]", "model.predictor.levels=null",
                                     "model.level_weights=[1,0]"))
    assert model.level_shares == [1.0, 0.0]
    cfg = compose(*LEVELS, "data.modalities=[image]", "trainer.micro_batch_size=1", "trainer.batch_size=2",
                  "trainer.max_steps=1", "eval.enabled=false")
    assert pretrain(cfg, run_dir=tmp_path).step == 1
    with pytest.raises(ConfigError, match=r"a hypermodal micro-batch of 1 image\(s\) per rank"):
        pretrain(compose(*LEVELS, "trainer.micro_batch_size=1", "trainer.batch_size=2", "trainer.max_steps=1",
                         "eval.enabled=false"), run_dir=tmp_path / "two")


def test_a_checkpoint_of_the_image_alone_with_a_shared_space_loads_without_it(compose, monkeypatch):
    """Runs of one modality at its levels written before such a model dropped its shared space (1f0ad1c) hold one
    that no loss trained — shared blocks, projections, a shared predictor at predictor.* and head at heads.0 — beside
    the level predictor at level_predictors.image.*: they load into today's model with every encoder, predictor and
    level head weight where it was (the level predictor is today's predictor, the level heads moved down one)."""
    from prob_jepa.hypermodal import build as hypermodal_build

    cfg = compose(*LEVELS, "data.modalities=[image]", "model.predictor.levels=null")
    with monkeypatch.context() as patch:  # the shared space of the model as it was built then
        patch.setattr(hypermodal_build, "has_shared_space", lambda cfg: True)
        torch.manual_seed(1)
        shared = build_hypermodal(cfg)
    torch.manual_seed(2)
    level_predictor = build_hypermodal(cfg).state_dict()  # its predictor stands for the level predictor of then
    before = {k.replace("predictor.tokens.shared.", "predictor.tokens."): v for k, v in shared.state_dict().items()
              if not k.startswith("predictor.tokens.image.")}
    before.update({level_predictor_name(k): v for k, v in level_predictor.items() if k.startswith("predictor.")})
    assert {"predictor.tokens.query_embed.weight", "level_predictors.image.tokens.level_embed"} <= set(before)
    assert shared.context_encoder.shared_space and len(shared.heads) == 3
    torch.manual_seed(0)
    model = build_hypermodal(cfg)
    model.load_state_dict(before)
    for key, value in model.state_dict().items():  # heads.i is the old heads.(i+1)
        if key.startswith("predictor."):
            assert torch.equal(value, level_predictor[key]), key
            continue
        index = key.split(".")[1] if key.startswith("heads.") else None
        source = f"heads.{int(index) + 1}.{key.split('.', 2)[2]}" if index is not None else key
        assert torch.equal(value, before[source]), key


@pytest.mark.slow
def test_a_one_modality_run_at_the_levels_is_scored_on_its_encoder(compose, tmp_path):
    """The one-modality case with the image JEPA's targets trains end to end and is scored, pretrained and at its
    random initialization, on the encoder's coarsest level (what the image JEPA probes; it has no shared space), which
    compare.py's probe and k-NN columns read."""
    cfg = compose(*LEVELS, "data.modalities=[image]", "trainer.max_steps=3")
    result = pretrain(cfg, run_dir=tmp_path)
    assert (result.status, result.step) == ("stopped", 3)
    scores = {"linear_probe/image/encoder", "knn/image/encoder"}
    representation = result.metrics["representation"]
    assert set(representation) == scores | {"random_init", "margin"} and set(representation["random_init"]) == scores
    assert {r["jepa/within"] > 0 for r in RunDir(tmp_path).read_metrics()} == {True}
    row = summary_row(RunDir(tmp_path))
    assert (row["linear_probe"], row["knn_random_init"]) == (representation["linear_probe/image/encoder"],
                                                             representation["random_init"]["knn/image/encoder"])
    assert (row["probe_margin"], row["probe_margin_se"]) == (representation["margin"]["linear_probe/image/encoder"],
                                                             representation["margin"]["linear_probe/image/encoder_se"])
