"""The embedded ``shapes`` world: procedural, seeded, labelled, no download.

Each image shows one large labelled shape (8 classes of equal area, random
colour, size, position and a small rotation) over a background of random colour;
shape and background carry independent blocky colour texture whose strength is
drawn per image, plus pixel noise (:class:`Scene` sets how much of each, and the
optional background ramp and distractor blobs), and a square
*marker* at a fixed place whose colour is drawn from two colours with known
weights, independently of everything else. The marker's colour cannot be
predicted from the rest of the image, so when the marker is masked the true
distribution of its embedding has exactly two modes with known weights: the
*ambiguity pairs* (:func:`ambiguity_pairs`) render the
same scene with each colour, giving those two modes.

This module is the world's one generator: :func:`draw_scenes` draws a scene's factors,
:func:`paint` draws it as pixels and :func:`object_mask` says where its object is; the
paired multimodal world (:mod:`prob_jepa.data.multimodal`) renders its image, video and
point clouds with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch.utils.data import Dataset

from ..config import ConfigError, is_count, is_finite_number

CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
MEAN, STD = 0.5, 0.25  # images are normalized as (x - MEAN) / STD


@dataclass(frozen=True)
class Marker:
    """A ``size``-pixel square at ``(x, y)`` (top-left, pixels) coloured ``colors[k]`` with probability ``weights[k]``."""

    size: int
    x: int
    y: int
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    weights: tuple[float, float]

    @classmethod
    def from_config(cls, cfg) -> "Marker":
        colors = tuple(tuple(float(v) for v in c) for c in cfg["colors"])
        weights = tuple(float(w) for w in cfg["weights"])
        if len(colors) != 2 or len(weights) != 2 or abs(sum(weights) - 1) > 1e-6:
            raise ConfigError(f"data.marker needs two colours and two weights summing to 1, got {colors}, {weights}")
        if not is_count(cfg["size"]):
            raise ConfigError(f"data.marker.size={cfg['size']!r} must be a positive number of pixels (its side)")
        for key in ("x", "y"):
            if not is_count(cfg[key], low=0):
                raise ConfigError(f"data.marker.{key}={cfg[key]!r} must be a whole number of pixels >= 0")
        return cls(int(cfg["size"]), int(cfg["x"]), int(cfg["y"]), colors, weights)

    def units(self, unit_px: int, image_size: int) -> list[int]:
        """Row-major indices of the mask units (``unit_px`` pixels each, ``image_size / unit_px`` per row) it covers."""
        per_row = image_size // unit_px
        rows = range(self.y // unit_px, math.ceil((self.y + self.size) / unit_px))
        cols = range(self.x // unit_px, math.ceil((self.x + self.size) / unit_px))
        return [r * per_row + c for r in rows for c in cols]


@dataclass(frozen=True)
class Scene:
    """How a scene is drawn (``data.scene``; the defaults live in ``experiments/conf/data/shapes.yaml``).

    radius: range of the labelled shape's radius, a fraction of the image side.
    distractors: small random blobs. noise: pixel-noise std. gradient: background ramp strength.
    hue, value: ranges of the labelled shape's hue (a fraction of the colour wheel) and brightness.
    background: range of each background colour channel ([0, 1] intensity units).
    layout: what the class is (:data:`LAYOUTS`). ``single``: one labelled shape of :data:`CLASSES`.
        ``parts``: four part shapes of :data:`PARTS`, one in each cell of a 2 × 2 grid; the class is their
        arrangement (:data:`ARRANGEMENTS`), so every class shows the same parts with the same areas and only
        where each part sits relative to the others tells the classes apart.
    texture: range of each image's texture std — shape and background are covered with independent
        blocky colour noise (``texture_block`` pixels per block) whose std is drawn per image from this
        range ([0, 1] intensity units). Texture is detail that no context can predict: a JEPA learns to
        ignore it, while it dominates the pooled statistics a random encoder reads. Its per-image strength
        makes some images harder than others, so there is something for uncertainty to detect.
    occluder: range of each image's occluder side, a fraction of the image side (``[0, 0]``: none). The
        occluder is a square of random colour blocks (``texture_block`` pixels each, every channel uniform in
        [0, 1]) centred within half a radius of the object's centre, drawn over everything but the marker: it
        hides part of what the class is read from behind pixels no context can predict (README, "The head
        comparison": what it does to the energy). Its draws follow every other draw of the scene's pixels and
        are skipped when the range is ``[0, 0]``, so a scene without one is the scene drawn before it existed.
    decoy: the probability that a scene holds a decoy — a second object of another class (radius drawn from
        ``decoy_radius``, anywhere it fits, its own tilt, a colour of any hue as the distractors have, the same
        texture) over the labelled one. Where it lies is not predictable from the rest of the scene,
        and it is what a probe may mistake for the class. Its draws follow the occluder's and are skipped at 0.
    decoys: the most decoys a scene with decoys holds; each count from 1 to ``decoys`` is equally likely
        (``decoy=0.75, decoys=3``: 0, 1, 2 or 3 decoys, a quarter of the scenes each). Each decoy is drawn as
        above, its class, size and place its own. At 1 the count is not drawn, so ``decoys=1`` is the world
        drawn before this key existed.
    """

    radius: tuple[float, float]
    distractors: int
    noise: float
    gradient: float
    texture: tuple[float, float]
    texture_block: int
    hue: tuple[float, float]
    value: tuple[float, float]
    background: tuple[float, float]
    layout: str = "single"
    occluder: tuple[float, float] = (0.0, 0.0)
    decoy: float = 0.0
    decoy_radius: tuple[float, float] = (0.15, 0.2)
    decoys: int = 1

    @classmethod
    def from_config(cls, cfg) -> "Scene":
        """The scene of a ``data.scene`` config node; every key is read, a missing one is an error."""
        lo, hi = (float(r) for r in cfg["radius"])
        if not 0 < lo <= hi or hi * EXTENT > 0.5:
            bound = f"{0.5 / EXTENT:.3f}"
            raise ConfigError(f"data.scene.radius must satisfy 0 < lo <= hi <= {bound} (the shape fits), got {[lo, hi]}")
        t_lo, t_hi = (float(t) for t in cfg["texture"])
        if not 0 <= t_lo <= t_hi:
            raise ConfigError(f"data.scene.texture must be a range 0 <= lo <= hi, got {[t_lo, t_hi]}")
        if int(cfg["texture_block"]) < 1:
            raise ConfigError(f"data.scene.texture_block must be a positive number of pixels, got {cfg['texture_block']}")
        ranges = {}
        for key in ("hue", "value", "background"):
            r_lo, r_hi = (float(r) for r in cfg[key])
            if not 0 <= r_lo <= r_hi <= 1:
                raise ConfigError(f"data.scene.{key} must be a range 0 <= lo <= hi <= 1, got {[r_lo, r_hi]}")
            ranges[key] = (r_lo, r_hi)
        o_lo, o_hi = (float(o) for o in cfg["occluder"])
        if not 0 <= o_lo <= o_hi <= 1:
            raise ConfigError(
                f"data.scene.occluder must be a range 0 <= lo <= hi <= 1 (of the image side), got {[o_lo, o_hi]}"
            )
        d_lo, d_hi = (float(r) for r in cfg["decoy_radius"])
        if not 0 <= float(cfg["decoy"]) <= 1 or not 0 < d_lo <= d_hi or d_hi * EXTENT > 0.5:
            raise ConfigError(
                f"data.scene.decoy must be a probability and data.scene.decoy_radius a range 0 < lo <= hi <= "
                f"{0.5 / EXTENT:.3f}, got {cfg['decoy']} and {[d_lo, d_hi]}"
            )
        if not is_count(cfg["distractors"], low=0):
            raise ConfigError(f"data.scene.distractors must be a whole number >= 0 (small blobs per scene), got "
                              f"{cfg['distractors']!r}")
        if not (is_finite_number(cfg["noise"]) and cfg["noise"] >= 0):
            raise ConfigError(f"data.scene.noise must be a finite pixel-noise std >= 0, got {cfg['noise']!r}")
        if not is_count(cfg["decoys"]):
            raise ConfigError(f"data.scene.decoys must be a whole number >= 1 (the most decoys), got {cfg['decoys']!r}")
        if cfg["layout"] not in LAYOUTS:
            raise ConfigError(f"data.scene.layout must be one of {', '.join(LAYOUTS)}, got {cfg['layout']!r}")
        return cls(
            (lo, hi), int(cfg["distractors"]), float(cfg["noise"]), float(cfg["gradient"]), (t_lo, t_hi),
            int(cfg["texture_block"]), **ranges, layout=str(cfg["layout"]), occluder=(o_lo, o_hi),
            decoy=float(cfg["decoy"]), decoy_radius=(d_lo, d_hi), decoys=int(cfg["decoys"]),
        )


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-masks of every class in shape-normalized coordinates: ``[n, H, W]`` → ``[len(CLASSES), n, H, W]``."""
    rho, phi = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    return torch.stack(
        [
            rho <= 1.0,  # circle
            torch.maximum(au, av) <= 0.8,  # square
            (v >= -0.5) & (math.sqrt(3) * au + v <= 1.0),  # triangle
            au / 0.6 + av <= 1.0,  # diamond
            ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),  # cross
            (rho <= 1.0) & (rho >= 0.55),  # ring
            rho <= 0.6 + 0.4 * torch.cos(5 * phi),  # star
            (au <= 1.0) & (av <= 0.35),  # bar
        ]
    )


def _unit_areas(resolution: int = 601) -> torch.Tensor:
    """Area of every class at unit radius ``[len(CLASSES)]`` (grid estimate on [-1.5, 1.5]²)."""
    c = torch.linspace(-1.5, 1.5, resolution)
    v, u = torch.meshgrid(c, c, indexing="ij")
    return _shape_masks(u[None], v[None])[:, 0].float().mean((1, 2)) * 9.0


# Every class is drawn with the same area for a given radius, so the amount of foreground colour (what a
# linear read-out of pooled pixel statistics sees first) says nothing about the class; only the geometry does.
EQUAL_AREA = 2.0
AREA_SCALE = torch.sqrt(EQUAL_AREA / _unit_areas())
EXTENT = 1.3  # the largest |u|, |v| of any class after area scaling (diamond: 1.29)

LAYOUTS = ("single", "parts")
PARTS = ("circle", "square", "triangle", "cross")  # the four part shapes of the parts layout
CELLS = ((-1, -1), (1, -1), (-1, 1), (1, 1))  # the parts layout's cells, row-major: (x, y) of each centre, y down


def _arrangements() -> torch.Tensor:
    """The 8 classes of the parts layout: ``[8, 4]``, the index into :data:`PARTS` drawn in each cell (cells
    row-major: top left, top right, bottom left, bottom right). Class 0 puts part k in cell k; the others are
    its images under the 8 symmetries of the square (rotations by 90° and reflections), so every part sits in
    every cell in exactly two classes and any two classes differ in at least two cells."""
    symmetries = [lambda x, y: (x, y), lambda x, y: (-y, x), lambda x, y: (-x, -y), lambda x, y: (y, -x)]
    symmetries += [lambda x, y, f=f: f(-x, y) for f in symmetries]
    return torch.tensor([[CELLS.index(g(*c)) for c in CELLS] for g in symmetries]).argsort(1)


ARRANGEMENTS = _arrangements()
ARRANGEMENT_NAMES = tuple("/".join(PARTS[p][:3] for p in row) for row in ARRANGEMENTS.tolist())
PART_INDEX = torch.tensor([CLASSES.index(p) for p in PARTS])


def _part_masks(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Inside-masks ``[n, 4, ...]`` of the parts layout's four cells in object coordinates (``u``, ``v``
    ``[n, ...]`` in units of the scene radius; object extent :data:`EXTENT`): cell k holds part
    ``ARRANGEMENTS[label, k]`` at half the radius (equal areas)."""
    n = len(labels)
    cells = []
    for cell, (x, y) in enumerate(CELLS):
        shape = PART_INDEX[ARRANGEMENTS[labels, cell]]  # [n] indices into CLASSES
        scale = (0.5 * AREA_SCALE[shape]).view((n,) + (1,) * (u.ndim - 1))
        cu, cv = x * EXTENT / 2, y * EXTENT / 2
        cells.append(_shape_masks((u - cu) / scale, (v - cv) / scale)[shape, torch.arange(n)])
    return torch.stack(cells, 1)


def _uniform(g: torch.Generator, shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(shape, generator=g)


DISTRACTOR_COLOURS = ((0.0, 1.0), (0.55, 1.0))  # hue and brightness ranges of the distractor blobs


def _random_colors(
    g: torch.Generator, n: int, hue: tuple[float, float], value: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Saturated random colours ``[n, 3]`` in [0, 1], hue and brightness uniform in their ranges; also returns
    the hue and the brightness, ``[n]`` each."""
    h = _uniform(g, (n, 1), hue)
    k = torch.tensor([5.0, 3.0, 1.0])
    rgb = 1 - torch.clamp(torch.minimum((k + h * 6) % 6, 4 - (k + h * 6) % 6), 0, 1)
    v = _uniform(g, (n, 1), value)
    return rgb * v, h[:, 0], v[:, 0]


class Rendering(NamedTuple):
    """What :func:`render` draws: images ``[n, 3, H, W]`` uint8, labels ``[n]``, marker colour index ``[n]``,
    and the nuisance factors of every scene (``[n]`` each unless noted): ``radius`` (fraction of the image side),
    ``cx``, ``cy`` (centre, fractions), ``theta`` (tilt, radians), ``hue`` (fraction of the colour wheel),
    ``value`` (the shape's brightness), ``background`` (``[n, 3]`` RGB), ``texture`` (the texture std),
    ``occluder`` (the occluder's side, a fraction of the image side; 0 without one) and ``decoy`` (how many decoys
    the scene holds)."""

    images: torch.Tensor
    labels: torch.Tensor
    marker_choice: torch.Tensor
    factors: dict[str, torch.Tensor]


def blocky_noise(g: torch.Generator, n: int, size: int, block: int, draw=torch.randn) -> torch.Tensor:
    """Colour noise constant over ``block × block`` pixel blocks, each block's channels drawn by ``draw``
    (standard normal; ``torch.rand``: uniform in [0, 1]): ``[n, 3, size, size]``."""
    cells = -(-size // block)
    noise = draw(n, 3, cells, cells, generator=g)
    return noise.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :size, :size]


def _placement(g: torch.Generator, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where objects of ``radius [n]`` (fractions of the image side) sit: centres ``cx, cy [n]`` uniform where the
    object fits (``EXTENT · radius`` from every edge) and a tilt ``theta [n]`` within ±20° (radians)."""
    margin = EXTENT * radius
    cx = margin + (1 - 2 * margin) * torch.rand(len(radius), generator=g)
    cy = margin + (1 - 2 * margin) * torch.rand(len(radius), generator=g)
    theta = (torch.rand(len(radius), generator=g) - 0.5) * math.radians(40)
    return cx, cy, theta


def class_names(layout: str) -> tuple[str, ...]:
    """The names of the 8 classes of a :data:`LAYOUTS` entry: shapes (``single``) or part arrangements (``parts``)."""
    return CLASSES if layout == "single" else ARRANGEMENT_NAMES


def draw_scenes(n: int, g: torch.Generator, scene: Scene) -> dict[str, torch.Tensor]:
    """The latent factors of ``n`` scenes, drawn from ``g``: ``label`` (int64), ``radius`` (a fraction of the image
    side), centre ``cx``, ``cy`` (fractions; the object fits: ``EXTENT · radius`` from every edge), tilt ``theta``
    (±20°, radians), the object's ``color`` (``[n, 3]``, [0, 1]), ``hue`` and ``value`` (brightness) and the
    ``background`` colour (``[n, 3]``); ``[n]`` each unless noted. Every modality of the world renders these."""
    label = torch.randint(len(CLASSES), (n,), generator=g)
    radius = _uniform(g, (n,), scene.radius)
    cx, cy, theta = _placement(g, radius)
    color, hue, value = _random_colors(g, n, scene.hue, scene.value)
    background = _uniform(g, (n, 3), scene.background)
    return dict(label=label, radius=radius, cx=cx, cy=cy, theta=theta, color=color, hue=hue, value=value,
                background=background)


def object_mask(u: torch.Tensor, v: torch.Tensor, f: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """Whether points lie on the object of scenes ``f`` (:func:`draw_scenes`): ``u``, ``v`` ``[n, ...]`` in the
    object's frame (centred, untilted; fractions of the image side) → bool ``[n, ...]``."""
    n = len(u)
    per_scene = (n,) + (1,) * (u.ndim - 1)
    if layout == "single":
        scale = (f["radius"] * AREA_SCALE[f["label"]]).view(per_scene)
        return _shape_masks(u / scale, v / scale)[f["label"], torch.arange(n)]
    radius = f["radius"].view(per_scene)
    return _part_masks(u / radius, v / radius, f["label"]).any(1)


def paint(
    f: dict[str, torch.Tensor], g: torch.Generator, size: int, scene: Scene, centre: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw scenes ``f`` (:func:`draw_scenes`) as ``size``-pixel images, their nuisance drawn from ``g``.

    The background colour, ramp, distractor blobs, pixel noise and texture of :class:`Scene`, then the object
    (``scene.layout``) in its colour plus texture, centred at ``(cx, cy)`` or at ``centre [n, 2]``, a decoy
    over it and an occluder over both (where ``scene`` has them).

    Returns:
        images ``[n, 3, size, size]`` in [0, 1] intensity units, not yet clamped; the drawn nuisance of each
        image, ``[n]`` each: ``texture`` (the texture std), ``occluder`` (its side, a fraction of the image
        side; 0 without one) and ``decoy`` (how many decoys the scene holds).
    """
    n = len(f["label"])
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coord, coord, indexing="ij")
    grad_dir = torch.rand(n, generator=g) * 2 * math.pi
    k = scene.distractors
    blob_xy = torch.rand(n, k, 2, generator=g)
    blob_r = 0.04 + 0.04 * torch.rand(n, k, generator=g)
    blob_col = _random_colors(g, k * n, *DISTRACTOR_COLOURS)[0].view(n, k, 3)
    noise = scene.noise * torch.randn(n, 3, size, size, generator=g)
    amplitude = _uniform(g, (n,), scene.texture)[:, None, None, None]
    bg_texture = amplitude * blocky_noise(g, n, size, scene.texture_block)
    fg_texture = amplitude * blocky_noise(g, n, size, scene.texture_block)

    ramp = (xx * torch.cos(grad_dir)[:, None, None] + yy * torch.sin(grad_dir)[:, None, None]) * scene.gradient
    img = f["background"][:, :, None, None] + ramp[:, None] + noise + bg_texture
    for k in range(scene.distractors):
        d = (xx - blob_xy[:, k, 0, None, None]) ** 2 + (yy - blob_xy[:, k, 1, None, None]) ** 2
        inside = (d <= blob_r[:, k, None, None] ** 2)[:, None]
        img = torch.where(inside, blob_col[:, k, :, None, None], img)

    cx, cy = (f["cx"], f["cy"]) if centre is None else centre.unbind(-1)
    inside = object_mask(*_object_frame(xx, yy, cx, cy, f["theta"]), f, scene.layout)
    img = torch.where(inside[:, None], f["color"][:, :, None, None] + fg_texture, img)
    occluder = _draw_occluder(g, f, scene, size, xx, yy, cx, cy)
    decoys = _draw_decoys(g, f, scene, xx, yy)
    for pixels, colour in zip(decoys["pixels"].unbind(1), decoys["colours"].unbind(1)):
        img = torch.where(pixels[:, None], colour[:, :, None, None] + fg_texture, img)
    img = torch.where(occluder["pixels"][:, None], occluder["colours"], img)
    return img, {"texture": amplitude.flatten(), "occluder": occluder["side"], "decoy": decoys["count"]}


def _draw_occluder(g: torch.Generator, f: dict[str, torch.Tensor], scene: Scene, size: int, xx: torch.Tensor,
                   yy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> dict[str, torch.Tensor]:
    """The occluder of every scene (:class:`Scene`; no draws without one): its ``side [n]``, the ``pixels`` it
    covers ``[n, size, size]`` (bool) and its ``colours [n, 3, size, size]``."""
    n = len(cx)
    if scene.occluder[1] == 0:
        return {"side": torch.zeros(n), "pixels": torch.zeros(n, size, size, dtype=torch.bool), "colours": 0.0}
    side = _uniform(g, (n,), scene.occluder)
    offset = (torch.rand(n, 2, generator=g) - 0.5) * f["radius"][:, None]
    colours = blocky_noise(g, n, size, scene.texture_block, torch.rand)
    half = side[:, None, None] / 2
    pixels = ((xx - cx[:, None, None] - offset[:, 0, None, None]).abs() <= half) & (
        (yy - cy[:, None, None] - offset[:, 1, None, None]).abs() <= half
    )
    return {"side": side, "pixels": pixels, "colours": colours}


def _draw_decoys(g: torch.Generator, f: dict[str, torch.Tensor], scene: Scene, xx: torch.Tensor,
                 yy: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoys of every scene (:class:`Scene`; no draws at probability 0): how many it holds, ``count [n]``
    (0 .. ``scene.decoys``), the ``pixels`` each covers ``[n, k, H, W]`` (bool; none beyond the count) and their
    ``colours [n, k, 3]``, ``k = scene.decoys`` (0 at probability 0)."""
    n = len(f["label"])
    if scene.decoy == 0:
        return {"count": torch.zeros(n), "pixels": torch.zeros(n, 0, *xx.shape, dtype=torch.bool),
                "colours": torch.zeros(n, 0, 3)}
    present = torch.rand(n, generator=g) < scene.decoy
    pixels, colours = [], []
    for _ in range(scene.decoys):
        d = {"label": (f["label"] + torch.randint(1, len(CLASSES), (n,), generator=g)) % len(CLASSES),
             "radius": _uniform(g, (n,), scene.decoy_radius)}
        d_cx, d_cy, d_theta = _placement(g, d["radius"])
        colours.append(_random_colors(g, n, *DISTRACTOR_COLOURS)[0])
        pixels.append(object_mask(*_object_frame(xx, yy, d_cx, d_cy, d_theta), d, scene.layout))
    count = present.long()
    if scene.decoys > 1:
        count = count * torch.randint(1, scene.decoys + 1, (n,), generator=g)
    shown = torch.arange(scene.decoys) < count[:, None]  # [n, k]
    pixels = torch.stack(pixels, 1) & shown[:, :, None, None]
    return {"count": count.float(), "pixels": pixels, "colours": torch.stack(colours, 1)}


def _object_frame(
    xx: torch.Tensor, yy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres ``xx, yy [H, W]`` in the frame of objects centred at ``cx, cy [n]`` and tilted by ``theta [n]``
    (radians): ``u, v [n, H, W]``, fractions of the image side."""
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    return dx * cos + dy * sin, -dx * sin + dy * cos


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] intensity units (clamped here) → uint8 ``[..., 3, H, W]``."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def render(
    n: int, image_size: int, seed: int, marker: Marker, scene: Scene, marker_choice: int | None = None
) -> Rendering:
    """Render ``n`` scenes (see :class:`Rendering` for what comes back).

    Args:
        marker_choice: force every marker to colour 0 or 1 (ambiguity pairs);
            ``None`` draws it with ``marker.weights``. The scene itself does not
            depend on this argument.
    """
    g = torch.Generator().manual_seed(seed)
    f = draw_scenes(n, g, scene)
    img, nuisance = paint(f, g, image_size, scene)
    draws = torch.rand(n, generator=g)
    choice = (draws >= marker.weights[0]).long() if marker_choice is None else torch.full((n,), marker_choice)
    colors = torch.tensor(marker.colors)[choice]  # [n, 3]
    ys, xs = slice(marker.y, marker.y + marker.size), slice(marker.x, marker.x + marker.size)
    img[:, :, ys, xs] = colors[:, :, None, None]
    factors = {k: f[k] for k in ("radius", "cx", "cy", "theta", "hue", "value", "background")}
    return Rendering(to_uint8(img), f["label"], choice, {**factors, **nuisance})


class ShapesDataset(Dataset):
    """``num_images`` seeded scenes; yields ``(image [3, H, W] normalized float, label)``."""

    def __init__(
        self, num_images: int, image_size: int, seed: int, marker: Marker, scene: Scene, chunk: int = 1024
    ):
        self.classes = class_names(scene.layout)
        parts = [
            render(min(chunk, num_images - s), image_size, seed * 100_003 + s // chunk, marker, scene=scene)
            for s in range(0, num_images, chunk)
        ]
        self.images = torch.cat([p.images for p in parts])
        self.labels = torch.cat([p.labels for p in parts])
        self.marker_choice = torch.cat([p.marker_choice for p in parts])
        self.factors = {k: torch.cat([p.factors[k] for p in parts]) for k in parts[0].factors}  # Rendering.factors
        self.marker = marker

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return normalize(self.images[i]), int(self.labels[i])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` → float, ``(x / 255 − MEAN) / STD``."""
    return (images.float() / 255 - MEAN) / STD


@dataclass
class AmbiguityPairs:
    """The same ``n`` scenes with the marker in each colour.

    images: ``[2, n, 3, H, W]`` normalized (``images[k]`` has marker colour k),
    weights: the true probability of each colour, marker: the hidden region.
    """

    images: torch.Tensor
    weights: tuple[float, float]
    marker: Marker

    def marker_units(self, unit_px: int) -> list[int]:
        """Row-major indices of the mask units (``unit_px`` pixels each) covered by the marker."""
        return self.marker.units(unit_px, self.images.shape[-1])


def ambiguity_pairs(n: int, image_size: int, seed: int, marker: Marker, scene: Scene) -> AmbiguityPairs:
    """``n`` scenes rendered twice, identical except for the marker colour."""
    a = render(n, image_size, seed, marker, marker_choice=0, scene=scene).images
    b = render(n, image_size, seed, marker, marker_choice=1, scene=scene).images
    return AmbiguityPairs(normalize(torch.stack([a, b])), marker.weights, marker)


def check_split_sizes(cfg) -> None:
    """Raise :class:`ConfigError` unless ``data.train_size`` and ``data.val_size`` are positive numbers of scenes."""
    for key in ("train_size", "val_size"):
        if not is_count(cfg[key]):
            raise ConfigError(f"data.{key}={cfg[key]!r} must be a positive number of scenes")


def build_shapes(cfg, splits: Sequence[str] = ("train", "val")) -> tuple[ShapesDataset, ...]:
    """Datasets of ``data=shapes``: disjoint seeds per split; ``train_eval`` is ``train`` (there is no augmentation).

    Raises:
        ConfigError: an invalid ``data.scene`` (:meth:`Scene.from_config`), ``data.marker``, ``data.train_size`` or
            ``data.val_size``.
    """
    check_split_sizes(cfg)
    marker, scene = Marker.from_config(cfg.marker), Scene.from_config(cfg.scene)
    m = cfg.marker
    if not (0 <= m.x and 0 <= m.y and m.x + m.size <= cfg.image_size and m.y + m.size <= cfg.image_size):
        raise ConfigError(
            f"data.marker (x={m.x}, y={m.y}, size={m.size}) must lie inside the {cfg.image_size}-px image "
            f"(data.image_size): x + size and y + size at most {cfg.image_size}"
        )
    made: dict[str, ShapesDataset] = {}
    for s in splits:
        key = "train" if s == "train_eval" else s
        if key not in made:
            size = {"train": cfg.train_size, "val": cfg.val_size}[key]
            made[key] = ShapesDataset(size, cfg.image_size, cfg.seed * 2 + (key == "val"), marker, scene)
    return tuple(made["train" if s == "train_eval" else s] for s in splits)
