"""Masks of every modality: per modality a list of mask specs (V-JEPA's convention), each a sampler that draws
context and target mask units from the modality's unit geometry — I-JEPA's multi-block masks on a square grid of
units (``kind: multiblock``, :class:`MaskCollator`) or blocks of the units nearest a random centre under a weighted
L∞ distance of their coordinates (``kind: blocks``, :class:`CoordinateBlocks`). Vectorized, seeded per draw."""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from jin import HierarchicalEncoder

from .config import ConfigError, is_count, is_finite_number
from .distributed import DistInfo
from .step import Task

EMPTY_DISTANCE = 1e3  # added to an empty unit's distance: beyond every weighted L∞ distance of coordinates in [0, 1]


class Masks(NamedTuple):
    """Index sets of one batch, in mask units (a unit is a token or a group of tokens of its modality:
    :meth:`~jin.encoders.ModalityEncoder.unit_tokens`; on a grid, row-major).

    context: ``[B, Kc]`` int64, sorted, disjoint from every target block.
    targets: ``[B, M, Kt]`` int64, one row of ``Kt`` units per target block.
    """

    context: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> "Masks":
        return Masks(self.context.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))

    def rows(self, start: int, stop: int) -> "Masks":
        """The masks of inputs ``start … stop − 1``."""
        return Masks(self.context[start:stop], self.targets[start:stop])


class MaskUnits(NamedTuple):
    """A modality's mask units in one batch — what a mask spec draws from; it depends on the data only.

    coords: ``[B, U, 3]`` unit coordinates in ``[0, 1]``. weights: per-axis weights of the L∞ distance between
    units (0 ignores an axis: a clip's time for a tube). grid: units per side when the ``U`` units tile a square
    grid row-major (``None``: they do not). content: ``[B, U]`` share of each unit that holds content (``None``:
    every unit does).
    """

    coords: torch.Tensor
    weights: Sequence[float]
    grid: int | None = None
    content: torch.Tensor | None = None


class MaskSpec(Protocol):
    """One entry of a modality's mask list: ``sample`` draws :class:`Masks` of static sizes — ``num_context``
    context units, ``num_targets`` blocks of ``num_target_units`` units — from one generator."""

    num_targets: int
    num_target_units: int
    num_context: int

    def sample(self, units: MaskUnits, generator: torch.Generator) -> Masks: ...


def mask_generator(seed: int, draw: int, *keys: int) -> torch.Generator:
    """The generator of draw ``draw`` under ``seed`` and further ``keys`` (a spec's index in its modality's list, the
    modality's index); trailing zero keys are dropped, so spec 0 of the image draws as before specs had an index."""
    keys = list(keys)
    while keys and keys[-1] == 0:
        keys.pop()
    state = np.random.SeedSequence([seed, draw, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class MaskCollator:
    """Multi-block masking of I-JEPA (``kind: multiblock``): one large context block, M target blocks, no overlap,
    on a square grid of mask units.

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

    Randomness comes only from the generator: ``collator(batch_size, draw)`` (the generator of
    :func:`mask_generator` for ``seed`` and ``draw``) is a pure function, so a batch can be replayed and a resumed
    run continues exactly; :meth:`sample` is the :class:`MaskSpec` form (units of this grid, any generator).

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
        seed: base seed (of ``collator(batch_size, draw)``).
        key: the config key of these options, named by errors (``mask.image.0``).

    Raises:
        ValueError: ``context_quantile`` not a number in (0, 1], ``num_targets`` or ``min_keep`` not a positive
            count, a scale range not two numbers in (0, 1] or reversed, an aspect range not two positive numbers or
            reversed (each a :class:`~prob_jepa.config.ConfigError` naming ``key``), no
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
        key: str = "mask",
    ):
        if not (is_finite_number(context_quantile) and 0 < context_quantile <= 1):
            raise ConfigError(f"{key}.context_quantile={context_quantile!r} must lie in (0, 1]")
        counts = (("num_targets", num_targets, "target blocks"), ("min_keep", min_keep, "context units"))
        for name, value, what in counts:
            if not is_count(value):
                raise ConfigError(f"{key}.{name}={value!r} must be a positive number of {what}")
        for name, bounds, top in (("target_scale", target_scale, 1.0), ("context_scale", context_scale, 1.0),
                                  ("target_aspect", target_aspect, math.inf),
                                  ("context_aspect", context_aspect, math.inf)):
            if not is_range(bounds, top):
                shown = f"[{', '.join(map(str, bounds))}]" if isinstance(bounds, (list, tuple)) else repr(bounds)
                raise ConfigError(f"{key}.{name}={shown} must be a range [low, high] with 0 < low <= high"
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
        return mask_generator(self.seed, draw)

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
        return self.draw(batch_size, self.generator(draw))

    def sample(self, units: MaskUnits, generator: torch.Generator) -> Masks:
        """:class:`MaskSpec`: masks of ``units`` (their ``grid`` must be this collator's).

        Raises:
            ValueError: the units do not tile this grid.
        """
        if units.grid != self.grid:
            raise ValueError(f"multi-block masks on a {self.grid}×{self.grid} grid of units drawn for units of grid "
                             f"{units.grid}")
        return self.draw(units.coords.shape[0], generator)

    def draw(self, batch_size: int, g: torch.Generator) -> Masks:
        """Masks of ``batch_size`` images from generator ``g``.

        Raises:
            ValueError: some image cannot keep ``K_c`` context units after :attr:`max_redraws` redraws.
        """
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


def is_range(bounds: object, top: float) -> bool:
    """``bounds`` is ``[low, high]``: two finite numbers with ``0 < low <= high <= top``."""
    return (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(is_finite_number(b) for b in bounds)
            and 0 < bounds[0] <= bounds[1] <= top)


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


def coordinate_block_masks(
    coords: torch.Tensor,
    weights: Sequence[float],
    num_targets: int,
    target_size: int,
    generator: torch.Generator,
    content: torch.Tensor | None = None,
) -> Masks:
    """I-JEPA's multi-block masking for tokens that only have coordinates.

    Each of the ``M`` target blocks is the ``Kt`` tokens nearest to a random centre token
    under the weighted L∞ distance ``max_k w_k |c_k − c'_k|`` — a square patch of an
    image, a time-frequency rectangle of a spectrogram (A-JEPA), a span of text
    (``w = (1, 0, 0)``), a tube through a clip (``w = (1, 1, 0)`` on ``(x, y, t)``, V-JEPA)
    or a ball-like patch of a point cloud. The context is every other token, less a random
    few when blocks overlap, so that its size ``N − M·Kt`` is the same for every sample.
    Vectorized over the batch and the blocks.

    With ``content``, blocks hide what the input holds: centres are drawn among the tokens
    with content (> 0), and a block is the ``Kt`` tokens with content nearest its centre,
    empty ones only when fewer hold content (a point cloud's hierarchy over pillars, most
    of them empty, would otherwise hide empty space and predict the empty token).

    Args:
        coords: ``[B, N, 3]`` token coordinates.
        weights: per-axis distance weights (0 ignores an axis).
        content: ``[B, N]`` share of each token that holds content; ``None``: every token does, drawn as before
            this argument existed (a ``content`` of ones hides the same kind of blocks from other draws).
    Returns:
        :class:`Masks` with context ``[B, N − M·Kt]`` (sorted) and targets ``[B, M, Kt]``.
    Raises:
        ValueError: blocks that leave no context; ``content`` of another shape than ``[B, N]``.
    """
    B, N, _ = coords.shape
    if num_targets * target_size >= N:
        raise ValueError(f"{num_targets} target blocks of {target_size} tokens leave no context among {N} tokens")
    if content is not None and content.shape != (B, N):
        raise ValueError(f"content of shape {list(content.shape)} for {B} inputs of {N} tokens: [B, N] = [{B}, {N}]")
    coords = coords.double().cpu()  # float64: the tie-breaking jitter below must not round away
    if content is None:
        centre = torch.randint(N, (B, num_targets), generator=generator)
    else:
        empty = content.cpu() <= 0
        chance = (~empty | empty.all(1, keepdim=True)).double()  # an input without content: any token
        centre = torch.multinomial(chance, num_targets, replacement=True, generator=generator)
    c = coords.gather(1, centre[..., None].expand(-1, -1, 3))  # [B, M, 3]
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    dist = ((coords[:, None] - c[:, :, None]).abs() * w).amax(-1)  # [B, M, N]
    # Random order among equidistant tokens, the same for tokens that differ only along an ignored axis
    # (a tube's frames), so a block of k·frames tokens is k whole tubes.
    seen = coords * (w > 0)
    direction = torch.rand(B, num_targets, 1, 3, generator=generator, dtype=torch.float64)
    jitter = ((seen[:, None] * direction).sum(-1) * 1e3).frac()
    dist = dist + 1e-6 * jitter
    if content is not None:
        dist = dist + EMPTY_DISTANCE * empty[:, None].double()  # every token with content is nearer
    targets = dist.topk(target_size, dim=-1, largest=False).indices
    hidden = torch.zeros(B, N).scatter_(1, targets.flatten(1), 1.0)
    score = torch.rand(B, N, generator=generator) + 2 * hidden  # hidden tokens rank last
    context = score.topk(N - num_targets * target_size, dim=1, largest=False).indices.sort(1).values
    return Masks(context, targets)


class CoordinateBlocks:
    """Blocks of the units nearest random centres (``kind: blocks``) from any modality's unit coordinates:
    :func:`coordinate_block_masks` with the static sizes ``num_targets`` blocks of ``target_size`` units and a
    context of every other unit (``U − M·Kt``).

    Args:
        num_units: ``U``, the modality's mask units.
        num_targets, target_size: ``M`` blocks of ``Kt`` units.
        key: the config key of these options, named by errors.

    Raises:
        ConfigError: ``num_targets`` or ``target_size`` not a positive count, or blocks that leave no context.
    """

    def __init__(self, num_units: int, num_targets: int, target_size: int, key: str = "mask"):
        for name, value in (("num_targets", num_targets), ("target_size", target_size)):
            if not is_count(value):
                raise ConfigError(f"{key}.{name}={value!r} must be a positive number of "
                                  + ("target blocks" if name == "num_targets" else "mask units per block"))
        if num_targets * target_size >= num_units:
            raise ConfigError(f"{key}: {num_targets} target blocks (num_targets) of {target_size} mask units "
                              f"(target_size) leave no context among the modality's {num_units} mask units")
        self.num_targets, self.num_target_units = num_targets, target_size
        self.num_context = num_units - num_targets * target_size

    def sample(self, units: MaskUnits, generator: torch.Generator) -> Masks:
        return coordinate_block_masks(units.coords, units.weights, self.num_targets, self.num_target_units,
                                      generator, units.content)


MASK_KINDS: dict[str, type] = {"multiblock": MaskCollator, "blocks": CoordinateBlocks}


def spec_options(kind: str) -> dict[str, inspect.Parameter]:
    """The options a spec of ``kind`` takes in a config (its constructor's parameters less the geometry and the key)."""
    params = inspect.signature(MASK_KINDS[kind].__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "key", "seed", "grid", "num_units")}


def build_mask_specs(specs, key: str, num_units: int, grid: int | None, seed: int = 0) -> list[MaskSpec]:
    """The mask specs of one modality's config list (``mask.<modality>``), in order.

    Args:
        specs: a list of mappings, each with ``kind`` (a key of :data:`MASK_KINDS`) and that kind's options (an
            option with a default may be left out: :func:`complete_mask_specs` writes it into the run's config).
        key: the config key of the list (``mask.image``); errors name ``{key}.{i}.<option>``.
        num_units, grid: the modality's mask units, and units per side when they tile a square grid (``None``:
            they do not, and ``multiblock`` cannot draw them).
        seed: the run's seed (``MaskCollator(batch_size, draw)``).

    Raises:
        ConfigError: not a non-empty list; an entry without a known ``kind``; options the kind does not take or
            lacks (naming the valid ones); ``multiblock`` for units without a grid; a value the kind rejects.
    """
    if not (OmegaConf.is_list(specs) or isinstance(specs, (list, tuple))) or len(specs) == 0:
        raise ConfigError(f"{key}={specs!r} must be a non-empty list of mask specs, e.g. [{{kind: blocks, "
                          f"num_targets: 4, target_size: 4}}]; kinds: {', '.join(MASK_KINDS)}")
    built = []
    for i, spec in enumerate(specs):
        at = f"{key}.{i}"
        options = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
        kind = options.get("kind") if isinstance(options, dict) else options
        if not isinstance(kind, str) or kind not in MASK_KINDS:
            raise ConfigError(f"{at}.kind={kind!r}; valid: {', '.join(MASK_KINDS)}")
        options = {k: v for k, v in options.items() if k != "kind"}
        valid = spec_options(kind)
        unknown = sorted(set(options) - set(valid))
        missing = [n for n, p in valid.items() if p.default is inspect.Parameter.empty and n not in options]
        if unknown or missing:
            raise ConfigError(f"{at}: kind {kind} " + (f"takes no option(s) {unknown}" if unknown else
                                                       f"needs option(s) {missing}")
                              + f"; valid: {', '.join(valid)}")
        if kind == "multiblock" and grid is None:
            raise ConfigError(f"{at}.kind=multiblock needs mask units on a square grid, which this modality's "
                              f"encoder does not have; valid here: blocks")
        geometry = {"grid": grid, "seed": seed} if kind == "multiblock" else {"num_units": num_units}
        try:
            built.append(MASK_KINDS[kind](**geometry, key=at, **options))
        except ConfigError:  # already names its option
            raise
        except (TypeError, ValueError) as e:  # e.g. no block of the aspect range fits the grid
            raise ConfigError(f"{at}: {e}") from e
    return built


def complete_mask_specs(cfg: DictConfig) -> DictConfig:
    """Write the default of every option a mask spec of ``cfg.mask`` leaves out into ``cfg`` (in place; returns it),
    so that the run's ``config.yaml`` holds every number its masks were drawn with. Entries that are not specs of a
    known kind are left for :func:`build_mask_specs` to refuse by name."""
    mask = cfg.get("mask")
    if mask is None:
        return cfg
    with open_dict(cfg):
        for specs in mask.values():
            if not OmegaConf.is_list(specs):
                continue
            for spec in specs:
                if not OmegaConf.is_dict(spec) or not isinstance(spec.get("kind"), str) or spec.kind not in MASK_KINDS:
                    continue
                for name, param in spec_options(spec.kind).items():
                    if name not in spec and param.default is not inspect.Parameter.empty:
                        default = param.default
                        spec[name] = list(default) if isinstance(default, tuple) else default
    return cfg


class ImageMasks:
    """The image JEPA's masks: the specs of ``mask.image`` on the grid of mask units of its image encoder ``encoder``
    (a :class:`~jin.HierarchicalEncoder`; the units' centres, distance in x and y). ``masks(batch_size, draw)`` is
    draw ``draw`` of every spec, spec ``s`` from :func:`mask_generator` of (``cfg.seed``, ``draw``, ``s``): a pure
    function of its arguments.

    Raises:
        ConfigError: ``mask`` has entries for modalities other than ``image`` (this recipe would not read them), or
            ``mask.image`` is not a valid list of specs (:func:`build_mask_specs`).
    """

    def __init__(self, cfg: DictConfig, encoder: HierarchicalEncoder):
        other = [k for k in cfg.mask if k != "image"]
        if other or "image" not in cfg.mask:
            raise ConfigError(f"mask has entries for {other or 'no image'}: the image recipe reads mask.image only "
                              f"(a list of mask specs); leave the others out")
        self.specs = build_mask_specs(cfg.mask.image, "mask.image", encoder.num_units, encoder.unit_grid,
                                      seed=cfg.seed)
        self.seed, self.grid = cfg.seed, encoder.unit_grid
        # [U, 3]: the top-level token of each unit
        self.centres = encoder.coords(encoder.levels - 1)[0, :, 0].detach().cpu()

    def __call__(self, batch_size: int, draw: int) -> list[Masks]:
        """One :class:`Masks` per spec for ``batch_size`` images, on the CPU.

        Raises:
            ValueError: a multi-block spec gave up redrawing (naming ``mask.image.<index>``).
        """
        units = MaskUnits(self.centres.expand(batch_size, -1, -1), (1.0, 1.0, 0.0), self.grid)
        masks = []
        for s, spec in enumerate(self.specs):
            try:
                masks.append(spec.sample(units, mask_generator(self.seed, draw, s)))
            except ValueError as e:  # a multi-block draw that gave up redrawing
                raise ValueError(f"mask.image.{s}: {e}") from e
        return masks


IMAGE_TASK = Task(("image",), "image", "within")


def image_inputs(images: torch.Tensor, masks: Sequence[Masks]) -> dict:
    """The keyword inputs of :meth:`~prob_jepa.jepa.JEPA.forward` that predict ``images [B, C, H, W]`` from their
    own context, one mask set per :class:`Masks` (the image JEPA's step): ``{"inputs": {"image": images}, "masks":
    {"image": [Masks, …]}, "tasks": [the image from the image]}``."""
    return {"inputs": {"image": images}, "masks": {"image": list(masks)}, "tasks": [IMAGE_TASK]}


class ImagePlanner:
    """The image JEPA's :class:`~prob_jepa.step.StepPlanner`: every step one :class:`Masks` per spec of
    ``mask.image`` (:class:`ImageMasks`), which the model (:class:`~prob_jepa.jepa.JEPA` of the one modality
    ``image``) predicts in turn: one within-modality task, the image from its own context.

    Draw ``step · accum + micro`` is one global micro-batch of masks (``micro × world size`` images), of which each
    rank takes its own rows: the masks do not depend on the number of ranks a global batch is split over.

    Raises:
        ConfigError: as :class:`ImageMasks`.
    """

    def __init__(self, cfg: DictConfig, model, info: DistInfo, micro: int, accum: int, total_steps: int):
        self.masks = ImageMasks(cfg, model.level_jepa("image").context_encoder)
        self.info, self.micro, self.accum, self.total_steps = info, micro, accum, total_steps

    def check(self, max_draws: int = 2000) -> None:
        """Every step's masks can be drawn: all draws up to ``max_draws``, else that many spread evenly over the
        run, are drawn now.

        Raises:
            ConfigError: naming the ``mask.image`` keys and the step whose draw fails.
        """
        draws = self.total_steps * self.accum
        for draw in sorted({int(i) for i in torch.linspace(0, draws - 1, min(draws, max_draws)).tolist()}):
            try:
                self.masks(self.micro * self.info.world_size, draw)
            except ValueError as e:
                step = draw // self.accum + 1
                raise ConfigError(f"the masks of step {step} cannot be drawn: {e}") from e

    def __call__(self, batch, step: int, micro: int) -> dict:
        """``{"inputs": {"image": [B, C, H, W]}, "masks": {"image": [Masks per spec]}, "tasks": [the image from its
        own context]}`` on the training device (the keyword inputs of :meth:`~prob_jepa.jepa.JEPA.forward`)."""
        images, _ = batch
        start = self.info.rank * self.micro
        masks = [m.rows(start, start + self.micro).to(self.info.device)
                 for m in self.masks(self.micro * self.info.world_size, step * self.accum + micro)]
        return image_inputs(images.to(self.info.device, non_blocking=True), masks)
