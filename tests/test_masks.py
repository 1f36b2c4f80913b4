"""The I-JEPA multi-block mask collator."""
from __future__ import annotations

import pytest
import torch

from prob_jepa.masks import MaskCollator


def collator(**kw) -> MaskCollator:
    return MaskCollator(grid=kw.pop("grid", 8), seed=kw.pop("seed", 0), **kw)


def test_shapes_and_dtypes():
    m = collator()(32, draw=0)
    assert m.context.dtype == m.targets.dtype == torch.int64
    assert m.context.shape[0] == 32 and m.targets.shape[:2] == (32, 4)
    assert m.context.min() >= 0 and m.context.max() < 64 and m.targets.max() < 64


def test_context_is_disjoint_from_every_target_block():
    m = collator()(64, draw=3)
    for ctx, tgt in zip(m.context, m.targets):
        assert not set(ctx.tolist()) & set(tgt.flatten().tolist())


def test_context_indices_are_unique_sorted_and_at_least_min_keep():
    m = collator(min_keep=6)(64, draw=5)
    assert m.context.shape[1] >= 6
    assert (m.context.diff(dim=1) > 0).all()


def test_target_blocks_are_rectangles_of_one_size():
    m = collator()(16, draw=7)
    rows, cols = m.targets // 8, m.targets % 8
    h = rows.amax(-1) - rows.amin(-1) + 1
    w = cols.amax(-1) - cols.amin(-1) + 1
    assert (h * w == m.targets.shape[-1]).all()  # a full h×w rectangle
    assert len(set(h.flatten().tolist())) == 1 and len(set(w.flatten().tolist())) == 1


def test_a_draw_is_a_pure_function_of_seed_and_draw_index():
    a, b, c = collator()(16, 11), collator()(16, 11), collator()(16, 12)
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)
    assert not torch.equal(collator(seed=1)(16, 11).targets, a.targets)


def test_block_corners_are_uniform_and_reach_the_last_row_and_column():
    """ijepa #59/#60: blocks must reach the last row/column and corners must not be centre-biased."""
    c = collator()
    g = torch.Generator().manual_seed(0)
    h, w = 2, 3
    top, left = c.block_corners(g, (40_000,), h, w)
    assert top.max() == 8 - h and left.max() == 8 - w and top.min() == 0 and left.min() == 0
    counts = torch.bincount(top * (8 - w + 1) + left, minlength=(8 - h + 1) * (8 - w + 1)).float()
    expected = counts.sum() / len(counts)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 80, f"corner distribution is not uniform (chi2={chi2:.1f} over {len(counts) - 1} dof)"
    m = c(2048, draw=1)
    covered = torch.zeros(64)
    covered[m.targets.flatten()] = 1
    assert covered.view(8, 8)[-1].all() and covered.view(8, 8)[:, -1].all()


def test_context_subset_is_not_biased_to_the_top_rows():
    m = collator()(4096, draw=2)
    rows = (m.context // 8).float()
    assert abs(rows.mean().item() - 3.5) < 0.25


def test_impossible_min_keep_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="min_keep"):
        collator(grid=4, min_keep=15)(8, draw=0)


def test_rows_selects_rows():
    m = collator()(8, draw=0)
    part = m.rows(2, 5)
    assert torch.equal(part.context, m.context[2:5]) and torch.equal(part.targets, m.targets[2:5])


def test_hide_makes_one_target_block_and_the_rest_context():
    from prob_jepa.masks import hide

    context, targets = hide(torch.tensor([[5, 1], [0, 3]]), 6)
    assert context.tolist() == [[0, 2, 3, 4], [1, 2, 4, 5]]
    assert targets.tolist() == [[[5, 1]], [[0, 3]]]


def test_token_counts_are_static_per_run():
    """One compiled graph per run (issue 17): every draw has the same context and target counts."""
    c = collator()
    shapes = {(tuple(m.context.shape[1:]), tuple(m.targets.shape[1:])) for m in (c(16, d) for d in range(200))}
    assert shapes == {((c.num_context,), (4, c.num_target_units))}
    assert c.num_target_units == 12  # 8² · mean(0.15, 0.2) = 11.2 → 12, the nearest area with a 3×4 or 4×3 block
    assert collator(seed=5).num_context == c.num_context  # the counts depend on the geometry, not the seed


def test_both_block_orientations_occur_in_proportion_to_the_aspect_range():
    c = collator()
    tall = [bool((c(1, d).targets[0, 0] // 8).unique().numel() == 4) for d in range(600)]
    # aspect U[0.75, 1.5]: h/w = 4/3 is nearest above 1, so 2/3 of the draws are 4×3
    assert abs(sum(tall) / len(tall) - 2 / 3) < 0.06


def test_block_shapes_pick_the_nearest_area_that_the_aspect_range_allows():
    from prob_jepa.masks import block_shapes

    assert block_shapes(8, (0.15, 0.2), (0.75, 1.5)) == [(3, 4), (4, 3)]
    assert block_shapes(4, (0.25, 0.25), (1.0, 1.0)) == [(2, 2)]
    with pytest.raises(ValueError, match="aspect"):
        block_shapes(2, (0.5, 0.5), (3.0, 4.0))


def test_context_quantile_sets_the_static_context_count():
    default, ijepa_like = collator(), collator(context_quantile=1 / 65)
    assert (default.num_context, ijepa_like.num_context) == (19, 14)  # 8×8 grid, the default mask config
    masks = ijepa_like(64, 3)
    assert masks.context.shape == (64, 14)
    visible = torch.ones(64, 64, dtype=torch.bool)
    visible.scatter_(1, masks.targets.flatten(1), False)
    assert visible.gather(1, masks.context).all()  # still disjoint from every target block
    with pytest.raises(ValueError, match="mask.context_quantile"):
        collator(context_quantile=0.0)
