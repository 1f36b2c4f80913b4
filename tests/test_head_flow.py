"""Flow-head behaviour beyond the contract: the affine variant's scale, 1-D splines, a reproducible mean,
our bins-first spline coupling against nflows' own, the mixture of flows (a density, its samples, the modes),
old runs' one flow."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform
from omegaconf import OmegaConf

from conftest import CONF, HEAD_CONFIGS
from prob_jepa.config import ConfigError
from prob_jepa.eval.multimodality import axis_coordinates
from prob_jepa.eval.summary import head_label, head_presets
from prob_jepa.heads import build_head
from prob_jepa.heads.flow import _SplineCoupling
from prob_jepa.run_dir import RunDir
from prob_jepa.run_io import load_run
from prob_jepa.synthetic import TASKS, BimodalTask, cond_features, train_head
from prob_jepa.train import pretrain


ONE_FLOW = {"base_components": 1, "hold_steps": 0}  # over N(0, I), trained from step 1: the couplings alone are tested


def make(dim: int, cond_dim: int = 8, **overrides):
    torch.manual_seed(0)
    return build_head("flow", dim=dim, cond_dim=cond_dim, **{**HEAD_CONFIGS["flow"], **overrides})


def test_options_an_affine_flow_does_not_read_are_not_checked_and_zero_blocks_is_a_linear_conditioner():
    flow = make(4, transform="affine", tail_bound=0, num_bins=None, num_blocks=0)
    x, c = torch.randn(16, 4), torch.randn(16, 8)
    assert torch.isfinite(flow.log_prob(x, c)).all()
    with pytest.raises(ValueError, match="tail_bound=0: a finite number > 0"):
        make(4, transform="spline", tail_bound=0)


def test_affine_flow_fits_a_target_narrower_than_the_base():
    # nflows' own affine coupling scale is at most 1.001 (data → noise), so a stack of it cannot
    # put the NLL per dimension below the base's peak, 0.5·log(2π) ≈ 0.92 nats; N(0, 0.05²) has −1.58.
    head = make(dim=2, cond_dim=3, transform="affine", **ONE_FLOW)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = head.loss(torch.randn(256, 3, generator=g), 0.05 * torch.randn(256, 2, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * math.log(2 * math.pi) - 2.0, loss.item()


def test_one_dimensional_spline_flow_is_bimodal():
    task = BimodalTask(dim=1, cond_dim=8, weight=0.5, sigma=0.3)
    head = make(dim=1, **ONE_FLOW)
    train_head(head, task, steps=300, batch_size=256, lr=3e-3)
    c = torch.tensor([0.1])
    mode = task.centre(c)  # [1, 1]; the other mode is its negation, the trough is at 0
    with torch.no_grad():
        lp = head.log_prob(torch.cat([mode, -mode, torch.zeros(1, 1)]), cond_features(c, 8).expand(3, -1))
    assert (lp[:2] > lp[2] + 2.0).all(), lp


def test_mean_is_reproducible_and_leaves_the_global_rng_alone():
    head = make(dim=3, cond_dim=5)
    cond = torch.randn(4, 5)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = head.mean(cond)
    torch.testing.assert_close(torch.rand(3), expected)
    torch.testing.assert_close(head.mean(cond), first)


def test_spline_coupling_matches_nflows_inside_and_outside_the_tail_bound():
    torch.manual_seed(0)
    dim, ctx = 6, 4
    mask = (torch.arange(dim) >= dim // 2).float()

    def net(i: int, o: int) -> ResidualNet:
        return ResidualNet(i, o, 16, context_features=ctx, num_blocks=1)

    kw = dict(num_bins=5, tails="linear", tail_bound=2.0)
    ours, ref = _SplineCoupling(mask, net, **kw), PiecewiseRationalQuadraticCouplingTransform(mask, net, **kw)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref.load_state_dict(ours.state_dict())
    x, c = 2.0 * torch.randn(512, dim), torch.randn(512, ctx)  # about a third beyond ±2
    assert ((x.abs() > 2.0).float().mean() > 0.2).item()
    (y, lad), (y_ref, lad_ref) = ours(x, c), ref(x, c)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(lad, lad_ref)
    grads = torch.autograd.grad(y.square().sum() + lad.sum(), list(ours.parameters()))
    grads_ref = torch.autograd.grad(y_ref.square().sum() + lad_ref.sum(), list(ref.parameters()))
    for g, g_ref in zip(grads, grads_ref):  # the same math in another order: float32 rounding only
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    x_back, lad_inv = ours.inverse(y, c)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lad_inv, -lad, atol=1e-4, rtol=1e-4)


def test_a_mixture_of_flows_integrates_to_one_and_samples_its_own_density():
    """K = 2 in 1-D with planted weights (0.38 / 0.65 / 0.997 on the first component in the three rows) and planted
    components (means ≈ 1.5–2.4 and ≈ 0, std ≈ 1.1–1.3 and 0.35): ``exp(log_prob)`` integrates to 1 on a grid,
    and each row's samples follow the integral of its density (KS distance below 0.02 at 20000 draws, measured
    0.004–0.006; the first row's draws against the last row's density, 0.64)."""
    head = make(dim=1, cond_dim=3, num_components=2, tail_bound=3.0, **ONE_FLOW)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.1)
        head.flow._embedding_net[0].weight[:, -2:].normal_(std=3.0)  # the index: components apart
        first, last = head.weights[0], head.weights[-1]
        for p in (*first.parameters(), *last.parameters()):
            p.zero_()
        first.weight[0, 0] = 1.0  # logits ±SiLU(c_0)
        last.weight[:, 0] = torch.tensor([1.0, -1.0])
    cond = torch.randn(3, 3)
    cond[:, 0] = torch.tensor([-2.0, 0.5, 3.0])
    with torch.no_grad():
        weights = head._log_weights(cond).exp()
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.383, 0.651, 0.997]), atol=1e-3, rtol=0)
    assert_a_density_that_samples_itself(head, cond, half_width=25.0)


def assert_a_density_that_samples_itself(head, cond: torch.Tensor, half_width: float) -> None:
    """For each row of ``cond`` ``[R, C]`` of a 1-D head: ``exp(log_prob)`` integrates to 1 on
    ``[-half_width, half_width]`` and 20000 draws follow its integral (KS distance below 0.02)."""
    size = 20001
    grid, step = torch.linspace(-half_width, half_width, size)[:, None], 2 * half_width / (size - 1)
    with torch.no_grad():
        density = torch.stack([head.log_prob(grid, c.expand(len(grid), -1)).exp() for c in cond])  # [R, G]
        samples = head.sample(cond, 20000)[..., 0]  # [S, R]
    torch.testing.assert_close(density.sum(-1) * step, torch.ones(len(cond)), atol=1e-3, rtol=0)
    cdf = torch.cumsum(density, -1).double() * step
    for row in range(len(cond)):
        empirical = (samples[:, row, None] <= grid[:, 0]).double().mean(0)
        assert (empirical - cdf[row]).abs().max() < 0.02, row


def ambiguous_task_shares(head, steps: int) -> tuple[float, float]:
    """``head`` trained ``steps`` steps on the 64-D ``ambiguous`` task (seed 0, minority weight 0.3) under a 192-wide
    condition: the shares of its samples (64 for each of 256 rows) nearer a mode than the midpoint and nearer the
    minority mode."""
    task = TASKS["ambiguous"](dim=64, cond_dim=192, seed=0)
    assert task.weight == 0.7
    train_head(head, task, steps=steps, batch_size=256, lr=3e-3, seed=0)
    c, cond, _ = task.sample(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        samples = head.sample(cond, 64)
    mode = task.centre(c)
    x = axis_coordinates(samples, mode, -mode)
    return ((x < 0.25) | (x > 0.75)).double().mean().item(), (x < 0.5).double().mean().item()


def test_two_flows_put_their_samples_on_the_modes_after_short_training():
    """The 64-D ``ambiguous`` task (modes 5 σ apart, weights 0.7 / 0.3) under a condition as wide as the JEPA
    predictor's (192), 300 steps: a mixture of two flows (normal base, no hold) puts ≥ 0.75 of its samples nearer a
    mode than the midpoint, with the minority weight within 0.05 (measured on seeds 0–4: on-mode 0.83–0.87, minority
    share 0.31–0.33, truth 0.89 / 0.30; one flow, ``num_components=1``: 0.51; two flows whose index enters the
    context embedding at nn.Linear's default scale: 0.52, seed 0)."""
    on_mode, minority = ambiguous_task_shares(make(dim=64, cond_dim=192, num_components=2, **ONE_FLOW), steps=300)
    assert on_mode >= 0.75 and abs(minority - 0.3) < 0.05


def test_the_preset_flow_puts_its_samples_on_both_modes_in_their_weights():
    """The preset (``experiments/conf/predictor/flow.yaml``: a 4-Gaussian base set by the context, couplings held for
    300 steps) on the 64-D ``ambiguous`` task under a 192-wide condition, 600 steps: ≥ 0.8 of its samples nearer a
    mode than the midpoint and the minority share within 0.06 of 0.3 (measured on seeds 0–4: on-mode 0.862–0.878,
    minority share 0.324–0.337; at 400 steps 0.855–0.870 / 0.350–0.384). The base is what this guards: with a normal
    base the same run reads 0.52 on a mode (0.67 without the hold either); without the hold 0.880 / 0.317 (seed 0) —
    the hold is for the JEPA, whose couplings otherwise explain the second mode first (README, "The head
    comparison")."""
    assert (HEAD_CONFIGS["flow"]["base_components"], HEAD_CONFIGS["flow"]["hold_steps"]) == (4, 300)
    on_mode, minority = ambiguous_task_shares(make(dim=64, cond_dim=192), steps=600)
    assert on_mode >= 0.8 and abs(minority - 0.3) < 0.06


def test_a_flow_run_saved_before_num_components_loads_and_resumes_as_the_one_flow_it_was(compose, tiny_overrides,
                                                                                        tmp_path):
    """A run saved before the flow's ``num_components``, ``base_components`` and ``hold_steps`` (one flow over N(0, I),
    the preset until 2026-12-05) loads as that flow, is labelled by ``compare.py`` as differing from today's preset,
    resumes with the options it was trained with and refuses others by name."""
    run = RunDir(tmp_path / "run")
    flow = (*tiny_overrides, "predictor=flow", "predictor.base_components=1", "predictor.hold_steps=0",
            "eval.enabled=false")
    pretrain(compose(*flow, "trainer.max_steps=1"), run_dir=run.path)
    old = OmegaConf.load(run.config)
    for key in ("num_components", "base_components", "hold_steps"):
        del old.predictor[key]
    OmegaConf.save(old, run.config)
    model, trained = load_run(run.path)
    assert (trained.predictor.num_components, trained.predictor.base_components, trained.predictor.hold_steps) == \
        (1, 1, 0)
    assert model.heads[0].weights is None and not model.heads[0].held_parameters()
    assert head_label(run.load_config().predictor, head_presets(CONF)) == "flow(base_components=1,hold_steps=0)"
    with pytest.raises(ConfigError, match="predictor.num_components: 1 -> 2"):
        pretrain(compose(*flow, "trainer.max_steps=2", "predictor.num_components=2"), run_dir=run.path)
    with pytest.raises(ConfigError, match="predictor.base_components: 1 -> 4"):
        pretrain(compose(*tiny_overrides, "predictor=flow", "eval.enabled=false", "trainer.max_steps=2"),
                 run_dir=run.path)
    assert pretrain(compose(*flow, "trainer.max_steps=2"), run_dir=run.path).step == 2


def test_one_flow_samples_as_the_head_before_mixtures():
    """``num_components=1`` draws exactly what a plain nflows ``Flow.sample`` draws from the same seed, so a run saved
    before mixtures re-evaluates to the samples (on-mode, coverage, ``mean``) it recorded."""
    head = make(dim=4, cond_dim=3)
    assert head.num_components == 1
    cond = torch.randn(5, 3)
    torch.manual_seed(3)
    expected = head.flow.sample(6, context=cond).transpose(0, 1)
    torch.manual_seed(3)
    torch.testing.assert_close(head.sample(cond, 6), expected, rtol=0, atol=0)


def test_a_mixture_base_integrates_to_one_and_samples_its_own_density():
    """A flow whose base is a 3-Gaussian mixture set by the context (means, scales, weights of its random
    initialization, couplings trained to something other than the identity): ``exp(log_prob)`` integrates to 1 on a
    1-D grid and the samples follow its integral (KS distance below 0.02 at 20000 draws)."""
    head = make(dim=1, cond_dim=3, base_components=3, tail_bound=3.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.flow._transform.parameters():
            torch.nn.init.normal_(p, std=0.1)
        head.flow._distribution.net.weight.mul_(4.0)  # components well apart
    assert_a_density_that_samples_itself(head, torch.randn(3, 3), half_width=40.0)


def test_held_couplings_start_at_the_identity_and_stay_there_for_hold_steps_of_train_head():
    """``hold_steps=2``: the couplings start at the identity (the flow's log-density is the base's after the first,
    standardizing layer), are the head's held parameters, and do not move in ``train_head``'s first two steps while
    the rest of the head does; from the third they train. The held head's state dict loads into an unheld one."""
    head = make(dim=6, cond_dim=3, base_components=4, hold_steps=2)
    first, couplings = head.flow._transform._transforms[0], head.flow._transform._transforms[1:]
    x, cond = torch.randn(32, 6), torch.randn(32, 3)
    with torch.no_grad():
        context = head.flow._embedding_net(cond)
        z, logabsdet = first(x, context=context)
        base = head.flow._distribution.log_prob(z.flip(-1), context=context)  # one reverse permutation
        torch.testing.assert_close(head.log_prob(x, cond), base + logabsdet)
    held = [p for layer in couplings for p in layer.parameters()]
    assert {id(p) for p in head.held_parameters()} == {id(p) for p in held}
    assert make(dim=6, cond_dim=3, base_components=4, hold_steps=0).held_parameters() == []
    start = [p.detach().clone() for p in held]
    others = first.transform_net.final_layer.weight.detach().clone()
    task = TASKS["bimodal"](dim=6, cond_dim=3)

    def moved(steps: int) -> bool:
        copy = make(dim=6, cond_dim=3, base_components=4, hold_steps=2)
        train_head(copy, task, steps=steps, batch_size=64)
        return not all(torch.equal(p, p0) for p, p0 in zip(copy.held_parameters(), start))

    assert not moved(2) and moved(3)
    train_head(head, task, steps=2, batch_size=64)
    assert not torch.equal(first.transform_net.final_layer.weight, others)
    make(dim=6, cond_dim=3, base_components=4, hold_steps=0).load_state_dict(head.state_dict())


def test_a_head_saved_while_the_hold_counted_its_batches_loads():
    """Heads of fd10cd3 to 85b5553 kept the hold's count in an ``updates`` buffer; their state dicts still load."""
    head = make(dim=6, cond_dim=3, base_components=4, hold_steps=2)
    saved = {**head.state_dict(), "updates": torch.tensor(5)}
    make(dim=6, cond_dim=3, base_components=4, hold_steps=2).load_state_dict(saved)


@pytest.mark.parametrize("options, message", [
    ({"base_components": 0}, "base_components=0: a positive number of Gaussians"),
    ({"hold_steps": -1}, "hold_steps=-1: a number of optimizer steps >= 0"),
    ({"hold_steps": 1.5}, "hold_steps=1.5: a number of optimizer steps >= 0"),
])
def test_a_base_or_hold_that_cannot_be_built_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        make(dim=4, **options)


def test_a_hold_as_long_as_the_schedule_is_announced(compose, tiny_overrides, tmp_path):
    """The preset's 300 held steps in a run whose schedule is shorter: a warning says the held parameters never
    train; a hold shorter than the schedule says nothing."""
    flow = (*tiny_overrides, "predictor=flow", "eval.enabled=false", "trainer.max_steps=1")
    with pytest.warns(UserWarning, match=r"predictor.hold_steps=300 >= the schedule's \d+ optimizer steps"):
        pretrain(compose(*flow), run_dir=tmp_path / "long")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="predictor.hold_steps")
        pretrain(compose(*flow, "predictor.hold_steps=2"), run_dir=tmp_path / "short")


@pytest.mark.slow
def test_a_held_mixture_base_flow_trains_in_the_jepa_and_resumes_exactly(compose, tiny_overrides, tmp_path):
    """Through the real trainer and checkpoints (``weights_only``): a run stopped after 1 step and resumed to 3 ends
    with the same head and optimizer state as a run of 3 steps; the couplings held for 2 steps moved in the third."""
    flow = (*tiny_overrides, "predictor=flow", "predictor.base_components=3", "predictor.hold_steps=2",
            "eval.enabled=false")
    straight, resumed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed")
    pretrain(compose(*flow, "trainer.max_steps=3"), run_dir=straight.path)
    pretrain(compose(*flow, "trainer.max_steps=1"), run_dir=resumed.path)
    held_after_one = {k: v.clone() for k, v in load_run(resumed.path)[0].heads[0].state_dict().items()}
    pretrain(compose(*flow, "trainer.max_steps=3"), run_dir=resumed.path)
    a, b = load_run(straight.path)[0].heads[0].state_dict(), load_run(resumed.path)[0].heads[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizers = [torch.load(run.path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]
                  for run in (straight, resumed)]
    moments = [{(name, k): v for name, s in o["state"].items() for k, v in s.items()} for o in optimizers]
    assert moments[0] and moments[0].keys() == moments[1].keys()
    assert all(torch.equal(moments[0][k], moments[1][k]) for k in moments[0])
    groups = [g for g in optimizers[0]["param_groups"] if g.get("hold_steps")]
    assert [g["hold_steps"] for g in groups] == [2, 2] and all(g["lr"] > 0 for g in groups)
    coupling = "flow._transform._transforms.1.transform_net.final_layer.weight"
    assert not held_after_one[coupling].any() and a[coupling].any()  # at the identity (zero) until released
