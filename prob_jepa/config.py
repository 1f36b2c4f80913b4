"""Config helpers: compose the Hydra config, and fail early on mistyped override keys."""
from __future__ import annotations

import argparse
import math
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_automatic_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"


class ConfigError(ValueError):
    """A configuration that cannot train and evaluate to the end; raised before step 1, naming its keys."""


def is_finite_number(value: object) -> bool:
    """``value`` is a finite int or float (not a bool, a string, None, NaN or ±inf): what a numeric config value
    must be before it is compared or summed."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object, low: int = 1) -> bool:
    """``value`` is an int (not a bool) ``>= low``: a number of steps, blocks, components or layers."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class ConfigKeyError(KeyError):
    """An override names a key the config does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


def compose_config(config_dir: str | Path, overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed config, as ``experiments/run.py`` would see it (without Hydra's run-time keys)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        return compose(config_name, overrides=list(overrides))


def group_options(config_dir: str | Path, group: str) -> list[str]:
    """The configs of the config group ``group`` under ``config_dir`` (``predictor``: every head), sorted as
    Hydra's ``glob(*)`` lists them."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def load_head_trials(file: str | Path, overrides: Sequence[str], config_dir: str | Path) -> DictConfig:
    """A config of heads trained outside the JEPA (``experiments/conf/heads_benchmark.yaml``,
    ``retrain_head.yaml``) with ``key=value`` overrides: ``heads`` (null: every head config in
    ``config_dir/predictor``; else a non-empty list of them), ``steps``, ``lr``, ``seed``, and
    ``per_head.<head>.<key>`` (a head's options, ``steps`` or ``lr``). ``heads`` comes back as the list of heads.

    Raises:
        ValueError: a top-level key the file does not have (``step=``, Hydra's ``+key=``), ``heads`` not a non-empty
            list of head configs of ``config_dir/predictor`` (or null), a ``per_head`` entry that is not a mapping or
            names no head config, a ``per_head`` entry on the command line for a head ``heads`` does not train, steps
            (top-level or a head's) that are not a positive integer, a learning rate that is not a finite positive
            number, or a seed that is not an integer; each names the key and the valid values.
    """
    base = OmegaConf.load(file)
    given = OmegaConf.from_dotlist(list(overrides))
    unknown = [str(key) for key in given if key not in base]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(map(str, base))} "
                         f"(write key=value, without '+'; per_head.<head>.<key> sets a head's options, steps or lr)")
    cfg = OmegaConf.merge(base, given)
    known = group_options(config_dir, "predictor")
    if cfg.heads is not None and (not OmegaConf.is_list(cfg.heads) or not cfg.heads):
        raise ValueError(f"heads={cfg.heads}: a non-empty list, e.g. heads=[mdn,flow], or null for every head; "
                         f"valid: {', '.join(known)}")
    cfg.heads = list(cfg.heads or known)
    for key, names in (("heads", list(cfg.heads)), ("per_head", list(cfg.per_head))):
        wrong = [str(n) for n in names if n not in known]
        if wrong:
            raise ValueError(f"{key}: {', '.join(wrong)}; valid: {', '.join(known)}")
    untrained = [str(h) for h in (given.per_head if "per_head" in given else {}) if h not in cfg.heads]
    if untrained:
        raise ValueError(f"per_head.{untrained[0]}: {untrained[0]} is not among heads={list(cfg.heads)}, so its "
                         f"options would be ignored; add it to heads or drop them")
    settings = [(h, o) for h, o in cfg.per_head.items() if o is not None]
    not_mappings = [h for h, o in settings if not OmegaConf.is_dict(o)]
    if not_mappings:
        raise ValueError(f"per_head.{not_mappings[0]}={cfg.per_head[not_mappings[0]]}: a head's settings are keys, "
                         f"e.g. per_head.{not_mappings[0]}.steps=500")
    for where, steps in [("steps", cfg.steps)] + [(f"per_head.{h}.steps", o.steps) for h, o in settings
                                                  if "steps" in o]:
        if not is_count(steps):
            raise ValueError(f"{where}={steps!r}: a positive number of training steps")
    for where, lr in [("lr", cfg.lr)] + [(f"per_head.{h}.lr", o.lr) for h, o in settings if "lr" in o]:
        if not (is_finite_number(lr) and lr > 0):
            raise ValueError(f"{where}={lr!r}: a finite learning rate > 0")
    if not (isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool)):
        raise ValueError(f"seed={cfg.seed!r}: an integer")
    return cfg


def check_argv(
    argv: Sequence[str], app_file: str | Path, config_path: str = "conf", config_name: str = "config"
) -> None:
    """Fail fast, listing the valid keys, when an override of the command line ``argv`` names a missing key.

    ``app_file``, ``config_path`` and ``config_name`` are those of the ``@hydra.main`` that will read
    ``argv``. Hydra's own argument parser splits flags from overrides, and ``--config-name``,
    ``--config-path`` and ``--config-dir`` choose the config as they will for Hydra. Under
    ``--multirun`` every job of the basic sweeper is checked (command-line sweeps and
    ``hydra.sweeper.params``), then the config Hydra composes before sweeping. A command line that
    composes passes; so does every other error, which Hydra reports in its own words: flags argparse
    rejects, ``--help`` / ``--info``, unknown group options, values of the wrong type.

    Raises:
        ConfigKeyError: naming the key, the job it is missing in, and the valid keys of its parent node.
    """
    args = _hydra_args(argv)
    if args is None or args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return
    name = args.config_name or config_name
    try:
        path = config_path if args.config_path is None else args.config_path
        loader = _config_loader(app_file, path, args.config_dir)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
        if args.multirun:
            _check_sweep(loader, name, overrides)
        else:
            _check(loader, name, overrides, RunMode.RUN)
    except ConfigKeyError:
        raise
    except Exception:  # Hydra meets the same error when it reads argv, and reports it in its own words
        return


def _hydra_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """``argv`` as Hydra's argument parser reads it, or None where argparse exits (Hydra then prints why)."""
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        try:
            return get_args_parser().parse_args(list(argv))
        except SystemExit:
            return None


def _config_loader(app_file: str | Path, config_path: str, config_dir: str | None) -> ConfigLoaderImpl:
    """Hydra's config loader with the search path ``hydra._internal.utils._run_hydra`` builds."""
    search_path = create_automatic_config_search_path(str(app_file), None, config_path)
    if config_dir is not None:
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}", SearchPathQuery(provider="schema"))
    return ConfigLoaderImpl(config_search_path=search_path)


def _check_sweep(loader: ConfigLoaderImpl, config_name: str, overrides: list[Override]) -> None:
    """Check the jobs of the sweep (one per distinct :func:`_shape`), then the config Hydra composes before sweeping."""
    checked = set()
    for job, swept in _sweep_jobs(loader, config_name, overrides):
        shape = tuple(_shape(loader, o) for o in job)
        if shape not in checked:
            checked.add(shape)
            _check(loader, config_name, job, RunMode.RUN, f" in the job {swept}" if swept else "")
    _check(loader, config_name, overrides, RunMode.MULTIRUN,
           " before sweeping: Hydra first composes the config with swept groups at their defaults (++ adds it there)")


def _sweep_jobs(
    loader: ConfigLoaderImpl, config_name: str, overrides: list[Override]
) -> list[tuple[list[Override], str]]:
    """Each job's overrides as Hydra's basic sweeper composes them, and its swept values; none for other sweepers."""
    hydra_overrides = [o.input_line for o in overrides if o.is_hydra_override()]
    selections = [o.input_line for o in overrides if o.is_hydra_override() or _selects_group(loader, o)]
    sweeper = loader.load_configuration(config_name, selections, RunMode.MULTIRUN).hydra.sweeper
    if sweeper._target_ != BASIC_SWEEPER:
        return []
    parse = OverridesParser.create(config_loader=loader).parse_overrides  # the loader lists a glob(*)'s configs
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
    task = parse(params + [o.input_line for o in overrides if not o.is_hydra_override()])  # as Hydra passes them
    swept = {o.get_key_element() for o in task if o.is_sweep_override()}
    return [(parse(hydra_overrides + job), ", ".join(line for line in job if line.split("=", 1)[0] in swept))
            for job in BasicSweeper.split_arguments(task, None)[0]]


def _shape(loader: ConfigLoaderImpl, override: Override) -> str:
    """What an override contributes to the keys of a job: a group selection or container value, else its key only."""
    if _selects_group(loader, override) or isinstance(override.value(), (dict, list)):
        return override.input_line
    return override.get_key_element()


def _check(
    loader: ConfigLoaderImpl, config_name: str, overrides: list[Override], mode: RunMode, where: str = ""
) -> None:
    """Where Hydra cannot compose ``overrides``, find the first value override whose key is missing.

    Hydra selects the groups first, then applies the other overrides in order; each key is looked up
    in the config composed from the groups and the overrides before it.

    Raises:
        ConfigKeyError: for that override.
        Exception: Hydra's own error where an earlier override fails for another reason.
    """
    if _composes(loader, config_name, overrides, mode):
        return
    groups = [o.input_line for o in overrides if _selects_group(loader, o)]
    settings = [o for o in overrides if not _selects_group(loader, o)]
    for i, o in enumerate(settings):
        if not (o.is_add() or o.is_force_add()):  # + and ++ may create keys; a value or ~ needs one
            cfg = loader.load_configuration(config_name, groups + [s.input_line for s in settings[:i]], mode)
            _require_key(cfg, o.key_or_group, where)


def _composes(loader: ConfigLoaderImpl, config_name: str, overrides: list[Override], mode: RunMode) -> bool:
    """Whether Hydra composes ``overrides`` in ``mode``."""
    try:
        loader.load_configuration(config_name, [o.input_line for o in overrides], mode)
    except Exception:  # the caller finds which override fails, if any fails on a key
        return False
    return True


def _selects_group(loader: ConfigLoaderImpl, override: Override) -> bool:
    """Whether Hydra reads ``override`` as a config-group selection (``predictor=flow``), as its defaults list does."""
    return not isinstance(override.value(), dict) and loader.repository.group_exists(override.key_or_group)


def _require_key(cfg: DictConfig, key: str, where: str) -> None:
    """Raise :class:`ConfigKeyError` unless every part of the dotted ``key`` exists in ``cfg`` (list items by index)."""
    node: object = OmegaConf.to_container(cfg, resolve=False)  # plain containers: the walk resolves nothing
    path = key.split(".")
    for i, part in enumerate(path):
        children = _children(node)
        if part not in children:
            parent = ".".join(path[:i]) or "<root>"
            if isinstance(node, str) and node.startswith("${") and node.endswith("}"):  # an interpolated node
                target = ".".join([node[2:-1], *path[i:]])
                raise ConfigKeyError(f"unknown config key '{key}'{where}: {parent} is {node} here; set {target}")
            raise ConfigKeyError(
                f"unknown config key '{key}'{where}: '{part}' is not in {parent}. "
                f"Valid keys of {parent}: {', '.join(children) or '(none: it is a value)'}"
            )
        node = children[part]


def _children(node: object) -> dict[str, object]:
    """A node's children by the names an override uses: a mapping's keys (sorted), a list's indices."""
    if isinstance(node, dict):
        return {str(k): node[k] for k in sorted(node, key=str)}
    if isinstance(node, list):
        return {str(i): v for i, v in enumerate(node)}
    return {}


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
