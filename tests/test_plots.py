"""Figures a person can read: what each line and legend entry of a cross-run figure stands for."""
from __future__ import annotations

from pathlib import Path

import matplotlib.colors as mcolors

from prob_jepa.eval import plots


def test_training_curves_give_each_run_a_colour_and_each_modality_a_line_style(monkeypatch, tmp_path):
    """Mixed image and hypermodal runs (``compare.py`` over a Table 3 sweep and its multimodal rows): one colour
    per run however many runs, one line style per modality, and one legend that names both."""
    image = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "feature_std": 0.9, "effective_rank": 30.0} for s in (10, 20)]
    hypermodal = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, **{f"{k}/{m}": 0.5 for k in ("feature_std", "effective_rank")
                                                            for m in ("audio", "image", "video")}} for s in (10, 20)]
    runs = {f"image_{i}": image for i in range(11)} | {"hypermodal": hypermodal}  # more runs than one palette
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    plots.training_curves(runs, tmp_path / "curves.png")
    (fig,) = figures
    loss, _, feature_std, _ = fig.axes
    assert len({mcolors.to_hex(line.get_color()) for line in loss.lines}) == len(runs)
    hypermodal_colour = loss.lines[-1].get_color()
    styles = [line.get_linestyle() for line in feature_std.lines if line.get_color() == hypermodal_colour]
    assert len(styles) == 3 and len(set(styles)) == 3
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*runs, "audio", "image", "video"]


def test_a_legend_beside_the_panels_stays_in_the_saved_picture(tmp_path):
    import matplotlib.image as mpimg

    runs = {"a": [{"step": 1, "loss": 1.0, "lr": 1.0, "feature_std": 1.0, "effective_rank": 1.0}],
            "a long run name that reaches far": [{"step": 1, "loss": 2.0, "lr": 1.0, "feature_std": 1.0,
                                                  "effective_rank": 1.0}]}
    path = plots.training_curves(runs, tmp_path / "curves.png")
    width = mpimg.imread(Path(path)).shape[1]
    assert width > 4 * 4.0 * 110  # four 4-inch panels at 110 dpi, and the legend beyond them
