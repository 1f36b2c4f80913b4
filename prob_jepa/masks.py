"""I-JEPA multi-block masks on the mask-unit grid, vectorized and seeded per draw."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from .config import ConfigError, is_count
from .distributed import DistInfo


@dataclass
class Masks:
    """Index sets of one batch, in mask units (row-major on the unit grid).

    context: ``[B, Kc]`` int64, sorted, disjoint from every target block.
    targets: ``[B, M, Kt]`` int64, one row of ``Kt`` units per target block.
    """

    context: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> "Masks":
        return Masks(self.context.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))

    def __getitem__(self, rows: slice) -> "Masks":
        return Masks(self.context[rows], self.targets[rows])


class MaskCollator:
    """Multi-block masking of I-JEPA: one large context block, M target blocks, no overlap.

    Token counts are **static per run** (one compiled graph serves every step):
    every target block has the same area, ``K_t`` = the integer area nearest
    ``G² · mean(target_scale)`` that an ``h × w`` block with ``h / w`` in
    ``target_aspect`` can have, and every image keeps the same number of
    context units, ``K_c`` = the ``context_quantile`` quantile of the visible
    units over a fixed calibration draw (at least ``min_keep``). Per batch the
    block *shape* is the area-``K_t`` shape nearest a drawn aspect ratio (log
    scale), so both orientations occur in proportion to ``target_aspect``; block
    *positions* are drawn per image, uniformly over every valid top-left corner —
    blocks reach the last row and column. The context is its block minus all
    target blocks; an image keeps a uniformly random subset of ``K_c`` of its
    visible units (never biased towards the top rows). Images with fewer than
    ``K_c`` visible units are redrawn (I-JEPA instead truncates to each batch's
    smallest context, so the count changes with every batch).

    Randomness comes only from ``draw``: ``collator(batch_size, draw)`` is a pure
    function, so a batch can be replayed and a resumed run continues exactly.

    Args:
        grid: mask units per side.
        num_targets: target blocks per image (I-JEPA: 4).
        target_scale, target_aspect: area fraction and aspect-ratio (h / w) ranges of a target block.
        context_scale, context_aspect: the same for the context block.
        min_keep: minimum number of context units.
        context_quantile: the quantile of visible units per image that sets ``K_c``, in (0, 1]. The
            default run keeps 0.1 (about 10 % of images redrawn); I-JEPA's truncation to each batch's
            smallest context is about the 1 / (B + 1) quantile (0.016 at a batch of 64: fewer context
            units, a harder task and a cheaper step).
        seed: base seed.

    Raises:
        ValueError: ``context_quantile`` outside (0, 1], ``num_targets`` below 1, a scale range outside (0, 1] or
            reversed, an aspect range not positive or reversed (each a :class:`~prob_jepa.config.ConfigError`), no
            block of ``target_aspect`` fits the grid, or (on a draw) some image cannot keep ``K_c`` context units
            after :attr:`max_redraws` redraws.

    References:
        Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding
        Predictive Architecture" (arXiv:2301.08243), Sec. 3 and Appendix C.
    """

    max_redraws = 100
    calibration_images = 4096

    def __init__(
        self,
        grid: int,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        context_aspect: tuple[float, float] = (1.0, 1.0),
        min_keep: int = 4,
        context_quantile: float = 0.1,
        seed: int = 0,
    ):
        if not 0 < context_quantile <= 1:
            raise ConfigError(f"mask.context_quantile={context_quantile} must lie in (0, 1]")
        if not is_count(num_targets):
            raise ConfigError(f"mask.num_targets={num_targets!r} must be a positive number of target blocks")
        for key, (low, high), top in (("target_scale", target_scale, 1.0), ("context_scale", context_scale, 1.0),
                                      ("target_aspect", target_aspect, math.inf),
                                      ("context_aspect", context_aspect, math.inf)):
            if not 0 < low <= high <= top:
                raise ConfigError(f"mask.{key}=[{low}, {high}] must be a range [low, high] with 0 < low <= high"
                                  + (" <= 1 (a share of the image)" if top == 1.0 else " (heights / widths)"))
        self.grid = grid
        self.num_targets = num_targets
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.context_scale, self.context_aspect = tuple(context_scale), tuple(context_aspect)
        self.min_keep = min_keep
        self.context_quantile = context_quantile
        self.seed = seed
        self.target_shapes = block_shapes(grid, self.target_scale, self.target_aspect)
        self.num_context = self.calibrate_context()

    @property
    def num_target_units(self) -> int:
        """Units per target block, ``K_t`` (the same in every draw)."""
        h, w = self.target_shapes[0]
        return h * w

    def calibrate_context(self) -> int:
        """``K_c``: the ``context_quantile`` quantile of visible units per image over a fixed draw of
        :attr:`calibration_images` images in batches of 64 (independent of ``seed``), at least ``min_keep``."""
        g = torch.Generator().manual_seed(0)
        visible = []
        for _ in range(self.calibration_images // 64):
            (th, tw), (ch, cw) = self.target_shape(g), self.block_size(g, self.context_scale, self.context_aspect)
            t_top, t_left = self.block_corners(g, (64, self.num_targets), th, tw)
            c_top, c_left = self.block_corners(g, (64,), ch, cw)
            visible.append(self._context(t_top, t_left, th, tw, c_top, c_left, ch, cw).flatten(1).sum(1))
        return max(self.min_keep, int(torch.cat(visible).float().quantile(self.context_quantile)))

    def target_shape(self, g: torch.Generator) -> tuple[int, int]:
        """The area-``K_t`` block shape whose aspect ratio is nearest (in log) one drawn uniformly from ``target_aspect``."""
        lo, hi = self.target_aspect
        ratio = lo + torch.rand(1, generator=g).item() * (hi - lo)
        return min(self.target_shapes, key=lambda hw: abs(math.log(hw[0] / hw[1] / ratio)))

    def generator(self, draw: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, draw]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def block_size(self, g: torch.Generator, scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[int, int]:
        """(h, w) of a block with area fraction in ``scale`` and aspect ratio h/w in ``aspect``."""
        s, a = torch.rand(2, generator=g).tolist()
        area = self.grid**2 * (scale[0] + s * (scale[1] - scale[0]))
        ratio = aspect[0] + a * (aspect[1] - aspect[0])
        h = min(self.grid, max(1, round(math.sqrt(area * ratio))))
        w = min(self.grid, max(1, round(math.sqrt(area / ratio))))
        return h, w

    def block_corners(self, g: torch.Generator, shape: tuple[int, ...], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform top-left corners, inclusive of the last valid row / column."""
        top = torch.randint(0, self.grid - h + 1, shape, generator=g)
        left = torch.randint(0, self.grid - w + 1, shape, generator=g)
        return top, left

    def block_mask(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[..., G, G]`` bool mask of blocks with the given corners."""
        r = torch.arange(self.grid)
        rows = (r >= top[..., None]) & (r < top[..., None] + h)
        cols = (r >= left[..., None]) & (r < left[..., None] + w)
        return rows[..., :, None] & cols[..., None, :]

    def block_indices(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[..., h*w]`` unit indices of blocks with the given corners."""
        rows = top[..., None] + torch.arange(h)
        cols = left[..., None] + torch.arange(w)
        return (rows[..., :, None] * self.grid + cols[..., None, :]).flatten(-2)

    def __call__(self, batch_size: int, draw: int) -> Masks:
        g = self.generator(draw)
        th, tw = self.target_shape(g)
        ch, cw = self.block_size(g, self.context_scale, self.context_aspect)
        M = self.num_targets

        t_top, t_left = self.block_corners(g, (batch_size, M), th, tw)
        c_top, c_left = self.block_corners(g, (batch_size,), ch, cw)
        visible = self._context(t_top, t_left, th, tw, c_top, c_left, ch, cw)
        for _ in range(self.max_redraws):
            bad = visible.flatten(1).sum(1) < self.num_context
            if not bad.any():
                break
            n = int(bad.sum())
            t_top[bad], t_left[bad] = self.block_corners(g, (n, M), th, tw)
            c_top[bad], c_left[bad] = self.block_corners(g, (n,), ch, cw)
            visible[bad] = self._context(t_top[bad], t_left[bad], th, tw, c_top[bad], c_left[bad], ch, cw)
        else:
            raise ValueError(
                f"MaskCollator: after {self.max_redraws} redraws some context still has fewer than "
                f"{self.num_context} of {self.grid}² units (min_keep={self.min_keep}; target blocks {th}×{tw} ×{M}, "
                f"context block {ch}×{cw}); lower num_targets, target_scale or min_keep, or use a finer unit grid"
            )

        # a uniformly random subset of K_c visible units per image
        visible = visible.flatten(1)
        score = torch.rand(visible.shape, generator=g).masked_fill(~visible, -1.0)
        context = score.topk(self.num_context, dim=1).indices.sort(dim=1).values
        targets = self.block_indices(t_top, t_left, th, tw)
        return Masks(context, targets)

    def _context(self, t_top, t_left, th, tw, c_top, c_left, ch, cw) -> torch.Tensor:
        targets = self.block_mask(t_top, t_left, th, tw).any(dim=1)
        return self.block_mask(c_top, c_left, ch, cw) & ~targets


def block_shapes(grid: int, scale: tuple[float, float], aspect: tuple[float, float]) -> list[tuple[int, int]]:
    """Every ``(h, w)`` of the one area nearest ``grid² · mean(scale)`` that has a shape with ``h / w`` in ``aspect``.

    Raises:
        ValueError: no block of that aspect range fits a ``grid × grid`` grid.
    """
    by_area: dict[int, list[tuple[int, int]]] = {}
    for h in range(1, grid + 1):
        for w in range(1, grid + 1):
            if aspect[0] - 1e-9 <= h / w <= aspect[1] + 1e-9:
                by_area.setdefault(h * w, []).append((h, w))
    if not by_area:
        raise ValueError(f"no block with aspect ratio h/w in {list(aspect)} fits a {grid}×{grid} grid of mask units")
    wanted = grid**2 * (scale[0] + scale[1]) / 2
    area = min(by_area, key=lambda a: (abs(a - wanted), a))
    return by_area[area]


def hide(hidden: torch.Tensor, num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target block per row and every other unit as context (the evaluations' fixed masks).

    Args:
        hidden: ``[B, K]`` int64 indices of the mask units to hide, distinct within a row.
        num_units: mask units per image.
    Returns:
        context ``[B, num_units − K]`` (ascending) and targets ``[B, 1, K]``, on ``hidden``'s device.
    """
    B, K = hidden.shape
    visible = torch.ones(B, num_units, dtype=torch.bool, device=hidden.device).scatter_(1, hidden, False)
    context = torch.arange(num_units, device=hidden.device).expand(B, num_units)[visible].view(B, num_units - K)
    return context, hidden[:, None]


class ImagePlanner:
    """The image JEPA's :class:`~prob_jepa.step.StepPlanner`: I-JEPA multi-block masks on the mask-unit grid.

    Draw ``step · accum + micro`` is one global micro-batch of masks (``micro × world size`` images, seeded by
    ``cfg.seed`` and the draw), of which each rank takes its own rows: the masks do not depend on the number of
    ranks a global batch is split over.
    """

    def __init__(self, cfg: DictConfig, model, info: DistInfo, micro: int, accum: int, total_steps: int):
        self.collator = MaskCollator(grid=model.context_encoder.unit_grid, seed=cfg.seed, **cfg.mask)
        self.info, self.micro, self.accum, self.total_steps = info, micro, accum, total_steps

    def check(self, max_draws: int = 2000) -> None:
        """Every step's masks can be drawn: all draws up to ``max_draws``, else that many spread evenly over the
        run, are drawn now.

        Raises:
            ConfigError: naming the ``mask.*`` keys and the step whose draw fails.
        """
        draws = self.total_steps * self.accum
        for draw in sorted({int(i) for i in torch.linspace(0, draws - 1, min(draws, max_draws)).tolist()}):
            try:
                self.collator(self.micro * self.info.world_size, draw)
            except ValueError as e:
                raise ConfigError(f"the masks of step {draw // self.accum + 1} cannot be drawn (mask.*): {e}") from e

    def __call__(self, batch, step: int, micro: int) -> dict[str, torch.Tensor]:
        """``{"images": [B, C, H, W], "context": [B, Kc], "targets": [B, M, Kt]}`` on the training device."""
        images, _ = batch
        rank = self.info.rank
        masks = self.collator(self.micro * self.info.world_size, step * self.accum + micro)
        masks = masks[rank * self.micro:(rank + 1) * self.micro].to(self.info.device)
        return {"images": images.to(self.info.device, non_blocking=True), "context": masks.context,
                "targets": masks.targets}
