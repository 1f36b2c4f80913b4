"""A finished run, reused: load_run, experiments/evaluate.py, experiments/export.py + jin.load_encoder."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMALL_EVAL
from prob_jepa.run_dir import RunDir
from prob_jepa import load_run
from prob_jepa.train import Trainer, pretrain

sys.path.insert(0, str(ROOT / "experiments"))
import evaluate as evaluate_script  # noqa: E402
import export as export_script  # noqa: E402
import feature_factors as feature_factors_script  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run and the model object as training left it."""
    from conftest import TINY, CONF
    from prob_jepa.config import compose_config

    kept = {}
    full_model = Trainer.full_model

    def keep(self):
        kept["model"] = full_model(self)
        return kept["model"]

    Trainer.full_model = keep
    try:
        path = tmp_path_factory.mktemp("run")
        result = pretrain(compose_config(CONF, [*TINY, *SMALL_EVAL, "trainer.max_steps=3"]), run_dir=path)
    finally:
        Trainer.full_model = full_model
    return result, kept["model"]


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_load_run_gives_the_model_at_the_end_of_training(trained):
    result, model = trained
    loaded, cfg = load_run(result.run_dir, device="cpu")
    assert cfg == RunDir(result.run_dir).load_config() and not loaded.training
    loaded, model = loaded.level_jepa("image"), model.level_jepa("image")
    torch.testing.assert_close(loaded.features(images()), model.features(images()), rtol=0, atol=0)
    with torch.no_grad():
        cond = loaded.predict(images(2), *_masks(loaded))[1][-1]
        assert loaded.heads[-1].sample(cond.flatten(0, 2), 3).shape[:2] == (3, cond.shape[:3].numel())


def _masks(model):
    from prob_jepa.masks import MaskCollator

    masks = MaskCollator(grid=model.context_encoder.unit_grid, seed=0, num_targets=2, target_scale=[0.15, 0.2],
                         target_aspect=[0.75, 1.5], context_scale=[0.85, 1.0], context_aspect=[1.0, 1.0],
                         min_keep=2)(2, 0)
    return masks.context, masks.targets


def test_load_run_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a trained run directory"):
        load_run(tmp_path)


def test_evaluate_rewrites_eval_json_with_new_settings_and_the_same_model(trained):
    result, _ = trained
    run = RunDir(result.run_dir)
    before = run.read_eval()
    assert before["eval_config"]["num_samples"] == 16
    after = evaluate_script.main([str(run.path), "eval.num_samples=4"])
    written = json.loads(run.eval.read_text())
    assert written["eval_config"]["num_samples"] == 4 == after["eval_config"]["num_samples"]
    assert written["overrides"] == ["eval.num_samples=4"]
    assert written["representation"] == before["representation"]  # the same weights, the same probe
    assert run.load_config().eval.num_samples == 16  # config.yaml still says what was trained


def test_a_run_saved_before_a_data_key_existed_still_evaluates(trained, tmp_path):
    """``data.scene.hue`` / ``value`` / ``background`` / ``layout`` came after runs had been saved, and the colour
    defaults changed since: a run without them gets the values that drew its images (``LEGACY_DATA``), not
    today's defaults, for ``evaluate.py`` and ``feature_factors.py`` alike."""
    import shutil

    from omegaconf import OmegaConf

    old = tmp_path / "old_run"
    shutil.copytree(trained[0].run_dir, old)
    cfg = OmegaConf.load(old / "config.yaml")
    for key in ("hue", "value", "background", "layout"):
        del cfg.data.scene[key]
    OmegaConf.save(cfg, old / "config.yaml")
    assert "hue" not in RunDir(old).load_config().data.scene
    filled = evaluate_script.with_current_defaults(RunDir(old).load_config()).data.scene
    assert (filled.hue, filled.value, filled.background, filled.layout) == ([0.0, 1.0], [0.55, 1.0], [0.15, 0.5], "single")
    legacy = OmegaConf.load(trained[0].run_dir / "config.yaml")
    legacy.data.scene.update(hue=[0.0, 1.0], value=[0.55, 1.0], background=[0.15, 0.5])
    assert OmegaConf.to_container(filled) == OmegaConf.to_container(legacy.data.scene)  # nothing else changed
    representation = evaluate_script.main([str(old)])["representation"]
    assert set(representation) == {"pretrained", "random_init", "margin"}
    assert set(representation["margin"]) == {"images", "linear_probe", "linear_probe_se", "knn", "knn_se"}
    factors = feature_factors_script.main([str(old)])
    assert set(factors["pretrained"]["r2"]) == {"radius", "cx", "cy", "theta", "hue_sin", "hue_cos", "value",
                                                 "background_r", "background_g", "background_b", "texture"}
    assert 0 < factors["random_init"]["top5_variance_share"] <= 1
    drivers = factors["energy_and_errors"]  # read from the run's own evaluation
    assert set(drivers["factors"]) == set(factors["pretrained"]["r2"])
    assert drivers["energy_vs_correct"] == pytest.approx(RunDir(old).read_eval()["uncertainty"]["energy_correct_pearson_r"])


def test_energy_and_error_drivers_pair_each_factor_with_the_evaluated_images():
    """The evaluation's per-image energies are of the first validation images: a factor equal to the energy
    there (and anything after) has r = 1 with it, a factor equal to correctness r = 1 with that."""
    g = torch.Generator().manual_seed(0)
    energy, correct = torch.randn(40, generator=g, dtype=torch.float64), (torch.rand(40, generator=g) < 0.6).double()
    rest = torch.randn(25, generator=g, dtype=torch.float64)
    out = feature_factors_script.energy_and_error_drivers(
        {"energy_like": torch.cat([energy, rest]), "error_like": torch.cat([correct, rest])}, energy, correct
    )
    assert out["factors"]["energy_like"]["energy"] == pytest.approx(1.0)
    assert out["factors"]["error_like"]["correct"] == pytest.approx(1.0)
    assert out["factors"]["energy_like"]["correct"] == pytest.approx(out["energy_vs_correct"])


def test_scene_factors_are_those_the_world_varies():
    """A world with a fixed texture strength and a decoy in some scenes: the texture is left out (no variance:
    R² would divide by zero), the decoy and the occluder's side are read where drawn."""
    from dataclasses import replace

    from prob_jepa.data.shapes import Marker, Scene, ShapesDataset

    marker = Marker(size=8, x=0, y=0, colors=((1.0, 0.1, 0.1), (0.1, 0.3, 1.0)), weights=(0.7, 0.3))
    scene = Scene(radius=(0.3, 0.38), distractors=0, noise=0.0, gradient=0.0, texture=(0.2, 0.2), texture_block=4,
                  hue=(0.5, 0.7), value=(0.8, 1.0), background=(0.2, 0.3), decoy=0.5)
    factors = feature_factors_script.scalar_factors(ShapesDataset(32, 32, 0, marker, scene))
    assert "texture" not in factors and "occluder" not in factors and set(factors["decoy"].tolist()) == {0.0, 1.0}
    occluded = feature_factors_script.scalar_factors(
        ShapesDataset(32, 32, 0, marker, replace(scene, occluder=(0.1, 0.4))))
    assert "occluder" in occluded and all(f.std() > 0 for f in occluded.values())


def test_evaluate_rejects_an_unknown_key_with_the_valid_ones(trained):
    with pytest.raises(SystemExit, match="num_samples"):
        evaluate_script.main([str(trained[0].run_dir), "eval.num_sample=4"])


def test_evaluate_refuses_impossible_eval_values_before_any_work(trained):
    run = RunDir(trained[0].run_dir)
    before = run.eval.read_text()
    with pytest.raises(SystemExit, match="eval.bank_images=0 must be at least 1; eval.map_block=8 must be between 1 and 7"):
        evaluate_script.main([str(run.path), "eval.map_block=8", "eval.bank_images=0"])
    with pytest.raises(SystemExit, match="eval.num_samples=1 must be at least 2"):
        evaluate_script.main([str(run.path), "eval.num_samples=1"])
    with pytest.raises(SystemExit, match=r"eval.scales=\[0.5, -2.0\] must be a list of positive factors"):
        evaluate_script.main([str(run.path), "eval.scales=[0.5,-2.0]"])
    with pytest.raises(SystemExit, match=r"eval.scales=2 must be a list of positive factors"):
        evaluate_script.main([str(run.path), "eval.scales=2"])
    with pytest.raises(SystemExit, match=r"eval.probe_train_size=0 must be at least 10 \(or null: every image\)"):
        evaluate_script.main([str(run.path), "eval.probe_train_size=0"])
    with pytest.raises(SystemExit, match=r"eval.probe_val_size=1 must be at least 2 \(or null: every image\)"):
        evaluate_script.main([str(run.path), "eval.probe_val_size=1"])
    # k-NN searched min(k, bank) neighbours while eval.json recorded k
    with pytest.raises(SystemExit, match=r"eval.knn_k=41 must be at most eval.probe_train_size=40"):
        evaluate_script.main([str(run.path), "eval.probe_train_size=40", "eval.knn_k=41"])
    with pytest.raises(SystemExit, match=r"eval.knn_k=0 must be a positive number of neighbours"):
        evaluate_script.main([str(run.path), "eval.knn_k=0"])
    # a negative k is not too many neighbours: the message named the probe size (the preflight's) as its bound
    with pytest.raises(SystemExit, match=r"eval.knn_k=-1 must be a positive number of neighbours$"):
        evaluate_script.main([str(run.path), "eval.probe_train_size=40", "eval.knn_k=-1"])
    # a 150 % interval was scored (coverage 1.0) and the batch size reached the DataLoader's own error
    with pytest.raises(SystemExit, match=r"eval.coverage_levels=\[0.5, 1.5\] must be a non-empty list of interval "
                                         r"levels in \(0, 1\), e.g. \[0.5, 0.8, 0.95\]"):
        evaluate_script.main([str(run.path), "eval.coverage_levels=[0.5,1.5]"])
    with pytest.raises(SystemExit, match=r"eval.batch_size=-1 must be a positive number of images"):
        evaluate_script.main([str(run.path), "eval.batch_size=-1"])
    with pytest.raises(SystemExit, match=r"eval.coverage_levels=\[\] must be a non-empty list"):
        evaluate_script.main([str(run.path), "eval.coverage_levels=[]"])
    # a negative number of validation scenes reached torch.cat's error, naming no key
    with pytest.raises(SystemExit, match=r"data.val_size=-1 must be a positive number of scenes"):
        evaluate_script.main([str(run.path), "data.val_size=-1"])
    # ... and without a probe size, beyond the training images there are (128)
    with pytest.raises(SystemExit, match=r"eval.knn_k=129 must be at most the 128 images k-NN searches"):
        evaluate_script.main([str(run.path), "eval.probe_train_size=null", "eval.knn_k=129"])
    # an unfitted probe read as an accuracy; votes exp(s / T) at T <= 0 are inf or reversed
    with pytest.raises(SystemExit, match=r"eval.probe_max_iter=0 must be a positive number of L-BFGS iterations; "
                                         r"eval.knn_temperature=-1 must be a finite number > 0"):
        evaluate_script.main([str(run.path), "eval.probe_max_iter=0", "eval.knn_temperature=-1"])
    # the model is the checkpoint's: a model / predictor / seed key would only rebuild the random-init reference
    for fixed in ("model.depths=[1,1]", "predictor=mdn", "seed=3"):
        with pytest.raises(SystemExit, match=re.escape(f"{fixed}: an evaluation may change eval.* and data.* keys")):
            evaluate_script.main([str(run.path), "eval.num_samples=4", fixed])
    # nor a data key the encoders were built for (a 32 px image set used to die in timm's patch embedding)
    for sized in ("data.image_size=32", "data.name=paired_shapes"):
        with pytest.raises(SystemExit, match=re.escape(f"{sized}: the checkpoint's encoders were built for")):
            evaluate_script.main([str(run.path), "data.val_size=64", sized])
    assert run.eval.read_text() == before


def test_exported_encoder_loads_without_hydra_and_gives_the_same_features(trained, tmp_path):
    result, model = trained
    out = tmp_path / "encoder.pt"
    export_script.main([str(result.run_dir), "--out", str(out)])
    expected = model.level_jepa("image").features(images())
    torch.save(images(), tmp_path / "images.pt")
    code = (  # a process in which Hydra and the training code cannot be imported
        "import sys, torch; sys.modules['hydra'] = sys.modules['omegaconf'] = sys.modules['prob_jepa'] = None\n"
        "import jin\n"
        f"enc = jin.load_encoder({str(out)!r})\n"
        f"x = torch.load({str(tmp_path / 'images.pt')!r})\n"
        f"torch.save(enc(x)[-1].features.mean(dim=(1, 2)), {str(tmp_path / 'features.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "features.pt"), expected, rtol=0, atol=0)


def test_readme_python_example_runs_on_a_trained_run(trained):
    """The README's 'Reuse a trained run' snippet, verbatim, on the tiny run with 2 random images."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reuse a trained run"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")].replace('"runs/mine"', repr(str(trained[0].run_dir)))
    scope = {"images": images(2)}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape == (2, 32) and scope["samples"].shape[0] == 16


def test_compare_finds_runs_behind_links(tmp_path):
    """A folder of links to runs (picked from several sweeps) is a set of runs, as a multirun folder is."""
    from prob_jepa.eval.summary import find_runs

    for name in ("a", "b"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "eval.json").write_text("{}")
    (tmp_path / "picked").mkdir()
    (tmp_path / "picked" / "b").symlink_to(tmp_path / "sweep" / "b", target_is_directory=True)
    assert [r.path.name for r in find_runs([tmp_path / "picked"])] == ["b"]
    assert [r.path.name for r in find_runs([tmp_path / "sweep"])] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="holds none"):
        find_runs([tmp_path / "picked" / "b" / "nothing"])
