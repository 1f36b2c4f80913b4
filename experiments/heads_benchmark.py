"""Every head on synthetic conditional densities whose conditional entropy is known.

    python experiments/heads_benchmark.py [key=value ...]     (defaults: experiments/conf/heads_benchmark.yaml)

For each head and task it prints the held-out NLL, the true conditional
entropy, the excess NLL (nats per dimension, ``E[log p − log q]`` on the
held-out samples, which equals NLL − entropy in expectation), mode coverage of
samples on the two-mode tasks (``bimodal``, ``ambiguous``: the smaller share of samples nearer either mode, and
the share nearer a mode than the midpoint, the head's and the true distribution's), and time per training step /
per sample / per log-prob row; the table is written as JSON and CSV.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from prob_jepa.config import is_count, load_head_trials  # noqa: E402
from prob_jepa.eval.multimodality import on_mode_share  # noqa: E402
from prob_jepa.eval.summary import head_presets, write_results  # noqa: E402
from prob_jepa.model import build_trial_head  # noqa: E402
from prob_jepa.synthetic import TASKS, BimodalTask, train_head  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"


def run_one(cfg, head_name: str, task_name: str, dim: int) -> dict:
    _, training, head = build_trial_head(cfg, head_name, head_presets(CONF), dim, cfg.cond_dim)
    steps, lr = training["steps"], training["lr"]
    task = TASKS[task_name](dim=dim, cond_dim=cfg.cond_dim, seed=cfg.seed)

    tic = time.perf_counter()
    train_head(head, task, steps=steps, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed)
    train_s = time.perf_counter() - tic

    c, cond, y = task.sample(cfg.test_size, torch.Generator().manual_seed(cfg.seed + 1))
    with torch.no_grad():
        tic = time.perf_counter()
        log_prob = head.log_prob(y, cond)
        log_prob_s = time.perf_counter() - tic
        rows = slice(0, cfg.timing_rows)
        tic = time.perf_counter()
        samples = head.sample(cond[rows], cfg.num_samples)
        sample_s = time.perf_counter() - tic
    # excess = E[log p − log q] (= NLL − H), estimated on the same samples: far less noisy than NLL − H
    nll, entropy = -log_prob.mean().item() / dim, task.entropy() / dim
    excess = (task.log_prob(y, c) - log_prob).mean().item() / dim
    row = {
        "head": head_name, "task": task_name, "dim": dim, "nll": nll, "entropy": entropy, "excess": excess,
        "mode_share": None, "on_mode": None, "on_mode_true": None, "train_ms_per_step": 1e3 * train_s / steps,
        "sample_ms": 1e3 * sample_s / (cfg.timing_rows * cfg.num_samples),
        "log_prob_ms": 1e3 * log_prob_s / cfg.test_size, "steps": steps,
    }
    if isinstance(task, BimodalTask):  # the smaller share of samples in either mode (0.5 = both equally)
        share = task.mode_of(samples, c[rows]).float().mean().item()
        mode = task.centre(c)
        row["mode_share"] = min(share, 1 - share)
        row["on_mode"] = on_mode_share(samples, mode[rows], -mode[rows])
        # the truth's share over every test row: the reference should not be the noisy part
        row["on_mode_true"] = on_mode_share(y[None], mode, -mode)
    return row


def load_config(overrides: list[str]):
    """``experiments/conf/heads_benchmark.yaml`` with ``key=value`` overrides (``per_head.<head>.<key>`` may add a
    head's options, ``steps`` or ``lr``).

    Raises:
        ValueError: before any head trains — a top-level key the file does not have (``step=``, Hydra's ``+key=``),
            a head without a config in ``experiments/conf/predictor``, a ``per_head`` entry for such a head or (on the
            command line) for a head ``heads`` does not train, a task
            not in :data:`~prob_jepa.synthetic.TASKS`, no head / task / dimension, steps (top-level or a head's),
            ``cond_dim``, ``batch_size``, ``test_size``, ``timing_rows`` or ``num_samples`` not a positive integer,
            or an option a head rejects (``per_head.<head>.*``); each names the valid values. ``heads`` comes back
            as the list of heads (null: every head config).
    """
    cfg = load_head_trials(CONF / "heads_benchmark.yaml", overrides, CONF)
    wrong = [str(n) for n in cfg.tasks if n not in TASKS]
    if wrong or not cfg.tasks:
        raise ValueError(f"tasks: {', '.join(wrong) or 'none'}; valid: {', '.join(TASKS)}")
    if not cfg.dims or not all(is_count(d) for d in cfg.dims):
        raise ValueError(f"dims={list(cfg.dims)}: a list of positive target dimensions")
    for key in ("cond_dim", "batch_size", "test_size", "timing_rows", "num_samples"):
        if not is_count(cfg[key]):
            raise ValueError(f"{key}={cfg[key]!r}: a positive integer")
    presets = head_presets(CONF)
    for name in cfg.heads:  # a rejected option is found before any head trains
        build_trial_head(cfg, name, presets, cfg.dims[0], cfg.cond_dim)
    return cfg


def main() -> None:
    try:
        cfg = load_config(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    rows = []
    for head_name in cfg.heads:
        for task_name in cfg.tasks:
            for dim in cfg.dims:
                rows.append(run_one(cfg, head_name, task_name, dim))
                r = rows[-1]
                print(f"{head_name:>14} {task_name:>15} D={dim:<3} excess {r['excess']:+.4f} nats/dim "
                      f"({r['train_ms_per_step'] * r['steps'] / 1e3:.1f} s)", file=sys.stderr, flush=True)
    formats = {"nll": ".4f", "entropy": ".4f", "excess": "+.4f", "mode_share": ".3f", "on_mode": ".3f",
               "on_mode_true": ".3f", "train_ms_per_step": ".2f", "sample_ms": ".4f", "log_prob_ms": ".4f"}
    print(write_results(rows, Path(cfg.out), "heads_benchmark", formats))


if __name__ == "__main__":
    main()
