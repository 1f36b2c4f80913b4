"""Hydra's command-line forms through the key pre-check of ``experiments/run.py``.

Each form either behaves as in plain Hydra (the pre-check passes it on: OK when Hydra composes it,
HYDRA when Hydra reports an error of its own) or fails before any work with the mistyped key and
the valid keys of its parent (:class:`Unknown`). ``plain`` holds the override lists that show what
plain Hydra does with the form: each composes for OK, the first fails for HYDRA and Unknown.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CONF, ROOT
from prob_jepa.config import ConfigKeyError, check_argv, compose_config

APP = ROOT / "experiments" / "run.py"
EXTRA = "{extra}"  # a config dir with predictor/mine.yaml (name, width), for --config-dir
OK, HYDRA = "ok", "hydra reports it"


@dataclass(frozen=True)
class Unknown:
    """The pre-check's error: names the key (and the job, under a sweep) and lists valid keys of its parent."""

    key: str
    valid: tuple[str, ...]
    job: str = ""


@dataclass(frozen=True)
class Form:
    argv: tuple[str, ...]
    expect: str | Unknown
    plain: tuple[tuple[str, ...], ...] = ()
    config_name: str = "config"


FORMS = [
    # flags with separate values, and flags Hydra handles without composing a job
    Form((), OK, ((),)),
    Form(("--cfg", "job"), OK, ((),)),
    Form(("--cfg", "hydra"), OK, ((),)),
    Form(("-c", "job", "--resolve"), OK, ((),)),
    Form(("--cfg", "job", "--package", "optim"), OK, ((),)),
    Form(("-c", "job", "-p", "trainer", "trainer.batch_size=8"), OK, (("trainer.batch_size=8",),)),
    Form(("--cfg", "job", "trainer.batchsize=8"), Unknown("trainer.batchsize", ("batch_size", "max_steps")),
         (("trainer.batchsize=8",),)),
    Form(("--config-name", "config"), OK, ((),)),
    Form(("-cn", "config", "optim.betas.1=0.95"), OK, (("optim.betas.1=0.95",),)),
    Form(("--config-name=config",), OK, ((),)),
    Form(("-cn", "heads_benchmark", "steps=5"), OK, (("steps=5",),), "heads_benchmark"),
    Form(("-cn", "heads_benchmark", "trainer.batch_size=8"), Unknown("trainer.batch_size", ("batch_size", "steps")),
         (("trainer.batch_size=8",),), "heads_benchmark"),
    Form(("-cn", "no_such_config"), HYDRA, ((),), "no_such_config"),
    Form(("--config-path", "conf", "seed=1"), OK, (("seed=1",),)),
    Form(("-cp", str(CONF), "trainer.batchsize=8"), Unknown("trainer.batchsize", ("batch_size",)),
         (("trainer.batchsize=8",),)),
    Form(("--config-path", "no_such_dir"), HYDRA),
    Form(("--config-dir", EXTRA, "predictor=mine", "predictor.width=4"), OK,
         ((f"hydra.searchpath=[file://{EXTRA}]", "predictor=mine", "predictor.width=4"),)),
    Form(("-cd", EXTRA, "predictor=mine", "predictor.widht=4"), Unknown("predictor.widht", ("name", "width")),
         ((f"hydra.searchpath=[file://{EXTRA}]", "predictor=mine", "predictor.widht=4"),)),
    Form(("--config-dir", "/no/such/dir"), HYDRA),
    Form(("--info",), OK),
    Form(("--info", "defaults", "predictor=flow"), OK, (("predictor=flow",),)),
    Form(("--help",), OK),
    Form(("--hydra-help",), OK),
    Form(("--version",), OK),
    Form(("--bogus-flag",), HYDRA),
    Form(("--cfg", "bogus"), HYDRA),
    Form(("seed=1", "--cfg", "job", "trainer.device=cpu"), HYDRA),  # argparse: overrides after a flag are unrecognized
    Form(("-m", "--cfg", "job", "seed=0,1"), HYDRA),  # only one of --multirun, --cfg, --info
    # list elements
    Form(("optim.betas.1=0.95",), OK, (("optim.betas.1=0.95",),)),
    Form(("optim.betas.5=1",), Unknown("optim.betas.5", ("0", "1")), (("optim.betas.5=1",),)),
    # add, force add, delete
    Form(("+trainer.tag=x",), OK, (("+trainer.tag=x",),)),
    Form(("+trainer.batch_size=8",), HYDRA, (("+trainer.batch_size=8",),)),
    Form(("++trainer.batch_size=8", "++trainer.tag=x"), OK, (("++trainer.batch_size=8", "++trainer.tag=x"),)),
    Form(("~trainer.compile",), OK, (("~trainer.compile",),)),
    Form(("~trainer.compyle",), Unknown("trainer.compyle", ("compile", "device")), (("~trainer.compyle",),)),
    # quoted values
    Form(('trainer.device="cpu"',), OK, (('trainer.device="cpu"',),)),
    Form(("data.name='a b, c'", 'trainer.device="x,y"'), OK, (("data.name='a b, c'", 'trainer.device="x,y"'),)),
    # sweeps
    Form(("seed=0,1",), HYDRA, (("seed=0,1",),)),
    Form(("seed=range(0,3)",), HYDRA, (("seed=range(0,3)",),)),
    Form(("-m", "seed=0,1"), OK, (("seed=0",), ("seed=1",))),
    Form(("--multirun", "seed=range(0,3)"), OK, (("seed=0",), ("seed=2",))),
    Form(("-m", "predictor=flow,mdn"), OK, (("predictor=flow",), ("predictor=mdn",))),
    Form(("-m", "predictor=choice(flow,mdn)", "seed=0,1"), OK, (("predictor=flow", "seed=1"),)),
    Form(("-m", "trainer.batchsize=8,16"), Unknown("trainer.batchsize", ("batch_size",), "trainer.batchsize=8"),
         (("trainer.batchsize=8",),)),
    Form(("-m", "hydra.run.dir=a,b"), HYDRA),
    # group selections, and keys checked against each choice of a swept group
    Form(("predictor=flow", "model=vit_tiny"), OK, (("predictor=flow", "model=vit_tiny"),)),
    Form(("predictor.num_bins=8", "predictor=flow"), OK, (("predictor.num_bins=8", "predictor=flow"),)),
    Form(("predictor=gaussian_process",), HYDRA, (("predictor=gaussian_process",),)),
    Form(("experiment=compare_heads",), OK, (("experiment=compare_heads",),)),
    Form(("+experiment=compare_heads",), HYDRA, (("+experiment=compare_heads",),)),
    Form(("-m", "experiment=compare_heads"), OK,
         (("experiment=compare_heads", "predictor=mdn"), ("experiment=compare_heads", "predictor=diffusion"))),
    Form(("-m", "experiment=sweep_flow_layers", "predictor.num_bins=8"), OK,
         (("experiment=sweep_flow_layers", "predictor.num_bins=8", "predictor.num_layers=8"),)),
    Form(("-m", "predictor=flow,mdn", "predictor.num_bins=8"),
         Unknown("predictor.num_bins", ("num_components",), "predictor=mdn"),
         (("predictor=mdn", "predictor.num_bins=8"),)),
    Form(("-m", "experiment=compare_heads", "predictor.num_bins=8"),  # glob(*): the heads in alphabetical order
         Unknown("predictor.num_bins", ("num_components", "context_dim"), "predictor=autoregressive"),
         (("experiment=compare_heads", "predictor=autoregressive", "predictor.num_bins=8"),)),
    # every job has the key, but Hydra first composes the config with predictor at its default
    Form(("-m", "predictor=mdn,autoregressive", "predictor.num_components=8"),
         Unknown("predictor.num_components", ("point_loss",), "before sweeping"),
         (("predictor.num_components=8",),)),
    Form(("-m", "predictor=mdn,autoregressive", "++predictor.num_components=8"), OK,
         (("++predictor.num_components=8",), ("predictor=autoregressive", "++predictor.num_components=8"))),
    # Hydra's own keys and groups, nested keys
    Form(("hydra.run.dir=/tmp/x", "hydra/job_logging=disabled"), OK,
         (("hydra.run.dir=/tmp/x", "hydra/job_logging=disabled"),)),
    Form(("hydra.run.dri=/tmp/x",), Unknown("hydra.run.dri", ("dir",)), (("hydra.run.dri=/tmp/x",),)),
    Form(("model.predictor.levels=1",), OK, (("model.predictor.levels=1",),)),
    Form(("model=vit_tiny", "model.predictor.level=1"), Unknown("model.predictor.level", ("levels", "depth")),
         (("model=vit_tiny", "model.predictor.level=1"),)),
    Form(("seed.x=1",), Unknown("seed.x", ()), (("seed.x=1",),)),
]


@pytest.fixture(scope="module")
def extra_conf(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("extra_conf")
    (root / "predictor").mkdir()
    (root / "predictor" / "mine.yaml").write_text("name: mine\nwidth: 3\n")
    return str(root)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: " ".join(f.argv) or "<none>")
def test_precheck_behaves_as_plain_hydra(form: Form, extra_conf: str):
    argv = [a.replace(EXTRA, extra_conf) for a in form.argv]
    plain = [[o.replace(EXTRA, extra_conf) for o in overrides] for overrides in form.plain]
    if form.expect == OK:
        check_argv(argv, APP)
        for overrides in plain:
            compose_config(CONF, overrides, form.config_name)
        return
    if plain:  # plain Hydra fails on this form too
        with pytest.raises(Exception):
            compose_config(CONF, plain[0], form.config_name)
    if form.expect == HYDRA:
        check_argv(argv, APP)
        return
    with pytest.raises(ConfigKeyError) as error:
        check_argv(argv, APP)
    message = str(error.value)
    assert f"unknown config key '{form.expect.key}'" in message
    assert form.expect.job in message.split(":")[0]
    valid = message.split("Valid keys of ")[1]
    assert all(k in valid.split(": ", 1)[1].split(", ") for k in form.expect.valid), message


@pytest.mark.parametrize("args, shown", [
    (("--cfg", "job"), "trainer:\n"),
    (("-cn", "config", "--cfg", "job", "optim.betas.1=0.95"), "- 0.95\n"),
])
def test_cfg_prints_the_config_without_training(args: tuple[str, ...], shown: str):
    proc = subprocess.run([sys.executable, str(APP), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shown in proc.stdout and "run directory:" not in proc.stdout


def test_mistyped_key_fails_before_the_run_directory(tmp_path: Path):
    run_dir = tmp_path / "run"
    argv = ["-cn", "config", "trainer.batchsize=8", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, str(APP), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "trainer.batchsize" in proc.stderr and "batch_size, checkpoint_every" in proc.stderr
    assert not run_dir.exists()


def test_a_key_under_an_interpolated_node_names_the_key_to_set():
    """hypermodal_shapes' predictor is ${model.predictor}: the precheck says which key a user means."""
    with pytest.raises(ConfigKeyError, match=r"hypermodal\.predictor is \$\{model\.predictor\} here; "
                                             r"set model\.predictor\.moe_experts"):
        check_argv(["experiment=hypermodal_shapes", "hypermodal.predictor.moe_experts=4"], APP)
    check_argv(["experiment=hypermodal_shapes", "model.predictor.moe_experts=4"], APP)
