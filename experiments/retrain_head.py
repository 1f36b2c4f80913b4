"""Heads trained from scratch on a finished run's frozen predictor outputs, scored as the run scores its own head.

    python experiments/retrain_head.py RUN_DIR [key=value ...]   (defaults: experiments/conf/retrain_head.yaml)

The run's encoders and predictor stay as trained. The predictor's ``cond`` and the target encoder's targets at the
masked tokens of the first ``train_images`` training images (the coarsest predicted level, the evaluation's masks:
:func:`~prob_jepa.eval.heads.collect_rows`) train each head by its own loss; the run's evaluation then scores it on
the same validation rows and ambiguity pairs as the run's head in ``eval.json``: NLL, coverage after the sample
temperature, and the share of samples for the hidden marker nearer a mode than the midpoint (on-mode) and in the
minority mode (true weight 0.3). A head costs minutes here instead of a JEPA run, and every head sees the same
``cond``: whether a head's samples miss the modes because of the head or because of what the predictor gives it
is one command (README, "The head comparison"). The first row is the run's own head, trained with the JEPA: for a
run evaluated on the CPU its NLL is ``eval.json``'s (the same rows: the run's config with the keys added since and
the overrides of its last ``experiments/evaluate.py``), and so are its sample-based numbers for a run evaluated at
d764a69 or later (the evaluation seeds its head samples and records the seed as ``head.sample_seed``; the tool says
when a run's eval.json predates it). Every
head is built from its options before any row is collected, so a rejected option costs no time.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from prob_jepa.config import is_count, load_head_trials  # noqa: E402
from prob_jepa.data import build_datasets  # noqa: E402
from prob_jepa.eval import evaluation_sets, with_validation  # noqa: E402
from prob_jepa.eval.ambiguity import ambiguity_metrics  # noqa: E402
from prob_jepa.eval.heads import EVAL_DRAWS, Rows, collect_rows, head_metrics  # noqa: E402
from prob_jepa.eval.summary import head_label, head_presets, write_results  # noqa: E402
from prob_jepa.masks import ImageMasks  # noqa: E402
from prob_jepa.model import build_trial_head  # noqa: E402
from prob_jepa.run_dir import RunDir  # noqa: E402
from prob_jepa.run_io import load_run, override  # noqa: E402
from prob_jepa.synthetic import train_head  # noqa: E402

from evaluate import with_current_defaults  # noqa: E402  (experiments/, the script's folder)

CONF = Path(__file__).resolve().parent / "conf"
FORMATS = {"lr": ".0e", "nll_per_dim": ".3f", "cov50": ".2f", "cov80": ".2f", "cov95": ".2f",
           "sample_temperature": ".2f", "on_mode": ".3f", "minority_share": ".3f", "axis_position": ".2f",
           "train_s": ".0f"}


class RowSampler:
    """Training rows drawn with replacement, as :func:`~prob_jepa.synthetic.train_head` draws a task's."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def sample(self, n: int, generator: torch.Generator) -> tuple[None, torch.Tensor, torch.Tensor]:
        i = torch.randint(len(self.rows), (n,), generator=generator)
        return None, self.rows.cond[i], self.rows.target[i]


def load_config(overrides: list[str]):
    """``experiments/conf/retrain_head.yaml`` with ``key=value`` overrides.

    Raises:
        ValueError: before any head trains — as :func:`~prob_jepa.config.load_head_trials`, or ``train_images`` /
            ``batch_size`` not a positive integer.
    """
    cfg = load_head_trials(CONF / "retrain_head.yaml", overrides, CONF)
    for key in ("train_images", "batch_size"):
        if not is_count(cfg[key]):
            raise ValueError(f"{key}={cfg[key]!r}: a positive integer")
    return cfg


def scores(head, model, run_cfg, rows: Rows, device: torch.device) -> dict:
    """The run's evaluation of ``head`` on the validation ``rows`` and the ambiguity pairs (``eval.json``'s
    ``head`` and ``multimodality`` numbers)."""
    e = run_cfg.eval
    torch.manual_seed(run_cfg.seed + EVAL_DRAWS)
    metrics, _ = head_metrics(head, rows, e)
    after = metrics["calibration"]["after"]["coverage"]
    row = {"nll_per_dim": metrics["likelihood"]["nll_per_dim"],
           **{f"cov{round(100 * float(level))}": value for level, value in after.items()},
           "sample_temperature": metrics["calibration"]["temperature"]}
    if "marker" in run_cfg.data:
        torch.manual_seed(run_cfg.seed + EVAL_DRAWS)
        ambiguity, _ = ambiguity_metrics(model, head, run_cfg.data, e.ambiguity_pairs, e.num_samples, device,
                                         seed=run_cfg.data.seed + EVAL_DRAWS)
        samples = ambiguity.get("samples", {})
        row.update(on_mode=samples.get("on_mode"), minority_share=samples.get("share_b"),
                   axis_position=samples.get("axis_position"))
    return row


def replay_note(evaluation: dict) -> str | None:
    """A warning when the run's ``eval.json`` (``evaluation``) predates seeded head samples (d764a69): its
    coverage, temperature, on-mode and minority share then followed other draws, and the first row re-scores them
    with the seed used since (the NLL is comparable either way)."""
    if evaluation and "sample_seed" not in evaluation.get("head", {}):
        return ("note: eval.json predates seeded head samples (evaluated before d764a69): the run's row has its NLL, "
                "not its sample-based numbers; python experiments/evaluate.py RUN_DIR re-evaluates it")
    return None


def configured_heads(cfg, presets: dict, dim: int, cond_dim: int) -> list[tuple[str, dict, object]]:
    """Each head of ``cfg.heads`` as ``(label, training settings {steps, lr}, head)``
    (:func:`~prob_jepa.model.build_trial_head`), all built before any row is collected.

    Raises:
        ValueError: a head rejects its options, naming the ``per_head.<head>.*`` keys.
    """
    heads = []
    for name in cfg.heads:
        options, training, head = build_trial_head(cfg, name, presets, dim, cond_dim)
        heads.append((head_label(options, presets), training, head))
    return heads


def main(argv: list[str]) -> list[dict]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    run = RunDir(argv[0])
    try:
        cfg = load_config(argv[1:])
        trained, run_cfg = load_run(run.path, "cpu")
        # as experiments/evaluate.py scores it: keys added since the run, and the overrides of its last evaluation
        evaluation = run.read_eval() if run.eval.exists() else {}
        run_cfg = override(with_current_defaults(run_cfg), evaluation.get("overrides", []))
        if run_cfg.recipe != "image":
            raise ValueError(f"{run.path} is a recipe={run_cfg.recipe} run; heads are retrained on image runs")
        model = trained.level_jepa("image")
        presets = head_presets(CONF)
        heads = configured_heads(cfg, presets, model.heads[-1].dim, model.heads[-1].cond_dim)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    note = replay_note(evaluation)
    if note:
        print(note, file=sys.stderr, flush=True)
    device = torch.device("cpu")
    e = run_cfg.eval
    bank_set, val_set = with_validation(*build_datasets(run_cfg.data, ("train_eval", "val")))
    _, val_set = evaluation_sets(bank_set, val_set, e)  # the validation images the run's evaluation scores
    masks = ImageMasks(run_cfg, model.context_encoder)
    train = collect_rows(model, bank_set, masks, cfg.train_images, e.batch_size, device)
    held_out = collect_rows(model, val_set, masks, e.head_images, e.batch_size, device)
    print(f"{len(train)} training rows, {len(held_out)} validation rows (D={train.target.shape[1]}, "
          f"C={train.cond.shape[1]})", file=sys.stderr, flush=True)

    reference = {"head": f"{head_label(run_cfg.predictor, presets)} (the run's)", "steps": None, "lr": None,
                 "train_s": None}
    results = [{**reference, **scores(model.heads[-1], model, run_cfg, held_out, device)}]
    for label, training, head in heads:
        tic = time.perf_counter()
        train_head(head, RowSampler(train), batch_size=cfg.batch_size, seed=cfg.seed, **training)
        row = {"head": label, **training, "train_s": time.perf_counter() - tic}
        results.append({**row, **scores(head, model, run_cfg, held_out, device)})
        print(f"{label:>28}: on-mode {results[-1].get('on_mode')} ({row['train_s']:.0f} s)", file=sys.stderr,
              flush=True)
    print(write_results(results, Path(cfg.out) if cfg.out else run.path / "retrained_heads", "retrained_heads",
                        FORMATS))
    return results

if __name__ == "__main__":
    main(sys.argv[1:])
