"""Pre-train and evaluate: ``python experiments/run.py [predictor=flow] [model=jin_tiny] [key=value ...]``."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from hydra._internal.utils import get_args_parser  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from prob_jepa.config import ConfigError, ConfigKeyError, check_argv  # noqa: E402
from prob_jepa.train import pretrain  # noqa: E402


def sweep_job_name(num: int) -> str:
    """``<job number>_<swept key=value,...>``: a multirun job's folder names only what the sweep varies.

    Hydra's ``override_dirname`` lists every override and can exceed the file-name limit; the swept
    keys are those of ``hydra.sweeper.params`` (experiment presets) and the command line's sweeps.
    """
    hc = HydraConfig.get()
    parsed = OverridesParser.create().parse_overrides(get_args_parser().parse_args(sys.argv[1:]).overrides)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()} | set(hc.sweeper.get("params") or {})
    items = sorted(o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept)
    return f"{num}_{','.join(items).replace('/', '_')}" if items else str(num)


OmegaConf.register_new_resolver("sweep_job_name", sweep_job_name)


# Hydra's record of the command that trained the run (config, hydra.yaml, overrides.yaml). Hydra writes each
# attempt's record to hydra.output_subdir (conf/config.yaml) before the run starts; it becomes the run's record
# only if the run is accepted, so a refused resume leaves the record of the run that is there.
RECORD = ".hydra"


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    attempt = None if hc.output_subdir is None or hc.output_subdir == RECORD else run_dir / hc.output_subdir
    try:
        result = pretrain(cfg, run_dir=run_dir)
    except (ConfigError, FileExistsError) as e:  # before step 1: the message is the whole story, not the traceback
        if attempt is not None:
            shutil.rmtree(attempt, ignore_errors=True)
        sys.exit(f"error: {e}")
    finally:
        if attempt is not None and attempt.exists():  # accepted: trained, interrupted or failed while training
            shutil.rmtree(run_dir / RECORD, ignore_errors=True)
            attempt.replace(run_dir / RECORD)
    print(f"run directory: {result.run_dir}  (status: {result.status}, step {result.step})")
    if result.status == "interrupted":  # a non-zero exit, so a job scheduler does not count the run as done
        # the default run directory is named by the start time: "the same command" would start a new run
        again = shlex.join([*hc.overrides.task, f"hydra.run.dir={result.run_dir}"])
        sys.exit(f"interrupted at step {result.step}: {result.run_dir}/checkpoints/last.pt is saved; to continue it "
                 f"(under torchrun, through the same launcher):\n  python experiments/run.py {again}")
    if result.metrics:
        print(json.dumps(result.metrics.get("representation", {}), indent=2))


if __name__ == "__main__":
    try:
        check_argv(sys.argv[1:], __file__, config_path="conf", config_name="config")  # as in @hydra.main
    except ConfigKeyError as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 writes into the run directory
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    main()
