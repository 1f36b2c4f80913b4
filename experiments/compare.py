"""Compare runs: ``python experiments/compare.py RUN_DIR_OR_MULTIRUN_DIR... [--out DIR]``.

Prints one markdown table (also written as CSV) and draws the cross-run figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prob_jepa.eval import plots
from prob_jepa.eval.summary import find_runs, head_presets, summary_row, write_table

CONF = Path(__file__).resolve().parent / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them (e.g. a multirun dir)")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="where the table and figures go")
    args = parser.parse_args()

    try:
        runs = find_runs(args.runs)
    except FileNotFoundError as e:  # a path without eval.json: the message says which
        raise SystemExit(f"error: {e}") from None
    # a head's column names the options in which a run differs from the head's preset (flow(num_components=2))
    presets = head_presets(CONF)
    rows = [summary_row(r, presets) for r in runs]
    md, csv_path = write_table(rows, args.out)
    records = {r.path.name: r.read_metrics() for r in runs}
    # the figures of the image heads; hypermodal runs have their own plots/ (retrieval, transfer)
    with_heads = [(r, row) for r, row in zip(runs, rows) if r.plot_data.exists()]
    if with_heads:
        data = {r.path.name: r.read_plot_data() for r, _ in with_heads}
        figures = plots.all_figures(data, records, [row for _, row in with_heads], args.out)
    else:
        figures = [plots.training_curves(records, args.out / "training_curves.png")]
    print(md.read_text())
    print(f"table: {md}, {csv_path}")
    print("figures: " + ", ".join(str(f) for f in figures))


if __name__ == "__main__":
    main()
