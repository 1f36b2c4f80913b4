"""The paired multimodal ``shapes`` world: one seeded scene, five modalities, no download.

Each scene is a set of latent factors — the image world's
(:func:`shapes.draw_scenes`: class ``label``, centre ``cx, cy``, ``radius``,
rotation ``theta``, colour ``hue``, background) and a video ``motion``
direction — rendered as an ``image``, an ``audio`` clip (log-mel), a ``text``
caption (BPE tokens), a short ``video`` and a 3-D ``points`` cloud. Item ``i``
of every modality is the same scene, so cross-modal retrieval has a ground
truth. The factors are drawn from the dataset's seed alone; each modality's
nuisance (pixel noise, caption wording, point samples, …) has its own seeded
stream, so the tensors of one modality do not depend on which others are built.

How the factors show in each modality:

- image / video: painted by :func:`shapes.paint`, the image world's own renderer,
  as ``data.scene`` says (``paired_shapes.yaml``: one shape of any hue over a
  plain dark background with pixel noise); the video moves it by
  :data:`VIDEO_STEP` per frame along ``motion``.
- audio: tone 1's pitch is the class (8 log-spaced notes), its onset the
  horizontal position and its duration the radius; tone 2's pitch is the hue
  and its onset the vertical position.
- text: "a large red star in the top left" — size, colour name, class and a
  3×3 position grid, with a few templates and synonyms.
- points: uniform samples of the object (:func:`shapes.object_mask`) extruded to a slab of half-height
  ``radius`` around z = 0.5, stored in farthest-point order (the sampling runs once per cloud, here).

Positions and sizes are described *relative to their range*: ``cx`` lies in
``[EXTENT·radius, 1 − EXTENT·radius]`` (the shape fits), and "left", an early
onset, etc. refer to the first third of that range.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from jin.encoders import farthest_point_order

from .shapes import (
    CLASSES, EXTENT, Scene, check_split_sizes, class_names, draw_scenes, normalize, object_mask, paint, to_uint8,
)

MODALITIES = ("image", "audio", "text", "video", "points")

TOKENIZER_PATH = Path(__file__).parent / "assets" / "shapes_bpe.json"
PAD_TOKEN = "<pad>"

CHUNK = 512  # scenes rendered at once (bounds memory)
VIDEO_STEP = 0.03  # how far the shape moves per video frame, a fraction of the image side
TONE1_HZ = (330.0, 1650.0)  # class k's note: log-spaced between these
TONE2_HZ = (2000.0, 6000.0)  # hue 0 → 1: log-spaced between these
RAMP = 0.02  # attack and release of the tones, a fraction of the clip (10 ms at the default spec)
# log(mel power + 1e-5) has about this mean and std over scenes at the default spec; log_mel maps it to ≈ 0, 1.
LOG_MEL_SHIFT, LOG_MEL_SCALE = -1.8, 2.1

COLOR_HUES = {  # colour name → its hue in degrees; a hue is named after the nearest one
    "red": 0, "orange": 30, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "purple": 280, "pink": 320,
}
SIZE_WORDS = (("small", "little"), ("large", "big"))
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")
TEMPLATES = (
    "a {size} {color} {shape} in the {where}",
    "there is a {size} {color} {shape} in the {where}",
    "in the {where}, a {size} {color} {shape}",
    "the {where} holds a {color} {shape}, {size}",
)


@dataclass(frozen=True)
class MultimodalSpec:
    """Sizes of every modality: pixels, audio STFT / mel parameters, tokens, frames and points."""

    image_size: int = 32
    sample_rate: int = 16000
    n_mels: int = 32
    audio_frames: int = 32
    n_fft: int = 512
    hop: int = 256
    text_length: int = 16
    video_frames: int = 4
    video_size: int = 32
    num_points: int = 256

    @property
    def audio_samples(self) -> int:
        """Waveform length giving ``audio_frames`` STFT frames without padding."""
        return self.n_fft + (self.audio_frames - 1) * self.hop

    @classmethod
    def from_config(cls, cfg) -> "MultimodalSpec":
        """The spec from the ``data`` config's keys of the same names (missing keys keep their defaults)."""
        return cls(**{f.name: int(cfg.get(f.name, f.default)) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------- factors


def draw_paired_scenes(n: int, g: torch.Generator, scene: Scene) -> dict[str, torch.Tensor]:
    """The factors of ``n`` scenes (:func:`shapes.draw_scenes`) plus a video ``motion`` direction (an angle;
    x = cos, y = sin, image axes), ``[n]``."""
    f = draw_scenes(n, g, scene)
    return {**f, "motion": torch.rand(n, generator=g) * 2 * math.pi}


def relative_position(c: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Where ``c`` lies in its range ``[EXTENT·radius, 1 − EXTENT·radius]``, in [0, 1] (``[n]`` → ``[n]``)."""
    margin = EXTENT * radius
    return ((c - margin) / (1 - 2 * margin).clamp_min(1e-6)).clamp(0, 1)


def color_name(hue: float) -> str:
    """The name of the nearest of the 8 :data:`COLOR_HUES` (circular distance)."""
    return min(COLOR_HUES, key=lambda name: abs((hue * 360 - COLOR_HUES[name] + 180) % 360 - 180))


# ---------------------------------------------------------------------------------------------- video


def video_centres(f: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
    """Shape centres ``[n, T, 2]``: from ``(cx, cy)`` along ``motion`` by :data:`VIDEO_STEP` a frame, clamped so the
    shape stays inside the image."""
    t = torch.arange(frames, dtype=torch.float32)[None, :, None] * VIDEO_STEP
    direction = torch.stack([torch.cos(f["motion"]), torch.sin(f["motion"])], -1)[:, None]
    start = torch.stack([f["cx"], f["cy"]], -1)[:, None]
    margin = (EXTENT * f["radius"])[:, None, None]
    return torch.minimum(torch.maximum(start + t * direction, margin), 1 - margin)


def render_video(f: dict[str, torch.Tensor], scene: Scene, spec: MultimodalSpec, g: torch.Generator) -> torch.Tensor:
    """Videos of scenes ``f`` → uint8 ``[n, T, 3, V, V]``: every frame painted as the image is
    (:func:`shapes.paint`), with the object moved along ``motion`` and fresh nuisance in every frame."""
    n, T = len(f["label"]), spec.video_frames
    per_frame = {k: v.repeat_interleave(T, 0) for k, v in f.items()}
    frames, _ = paint(per_frame, g, spec.video_size, scene, video_centres(f, T).flatten(0, 1))
    return to_uint8(frames).view(n, T, 3, spec.video_size, spec.video_size)


# ---------------------------------------------------------------------------------------------- audio


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, peak 1, ``[n_fft // 2 + 1, n_mels]``.

    Filter ``m`` rises from mel point ``m`` to ``m + 1`` and falls to ``m + 2`` of
    ``n_mels + 2`` points evenly spaced in mel between ``f_min`` and ``f_max``
    (default: Nyquist); between the first and last centre the filters sum to 1.
    """
    hz_to_mel = lambda f: 2595.0 * torch.log10(1.0 + f / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    f_max = sample_rate / 2 if f_max is None else f_max
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min)), hz_to_mel(torch.tensor(f_max)), n_mels + 2))
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)[:, None]
    rising = (freqs - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - freqs) / (edges[2:] - edges[1:-1])
    return torch.minimum(rising, falling).clamp_min(0)


def log_mel(
    wave: torch.Tensor, sample_rate: int = 16000, n_fft: int = 512, hop: int = 256, n_mels: int = 32
) -> torch.Tensor:
    """Standardized log-mel spectrogram: ``wave [..., samples]`` → ``[..., n_mels, frames]``.

    Hann-window STFT without padding (``frames = 1 + (samples − n_fft) // hop``),
    power ``|X|²``, :func:`mel_filterbank`, then ``(log(mel + 1e-5) − LOG_MEL_SHIFT) / LOG_MEL_SCALE``.
    """
    window = torch.hann_window(n_fft)
    flat = wave.reshape(-1, wave.shape[-1])
    spec = torch.stft(flat, n_fft, hop, window=window, center=False, return_complex=True)  # [b, freq, frames]
    power = spec.real**2 + spec.imag**2
    mel = torch.einsum("bft,fm->bmt", power, mel_filterbank(n_fft, n_mels, sample_rate))
    out = (torch.log(mel + 1e-5) - LOG_MEL_SHIFT) / LOG_MEL_SCALE
    return out.view(*wave.shape[:-1], n_mels, out.shape[-1])


def _tone(
    samples: int, sample_rate: int, freq: torch.Tensor, onset: torch.Tensor, duration: torch.Tensor, longest: float
) -> torch.Tensor:
    """Sines ``[n, samples]`` at ``freq [n]`` Hz from ``onset`` for ``duration`` (``[n]``, fractions of the clip),
    with raised-cosine attack and release of :data:`RAMP`; each is computed on a window of ``longest`` (the longest
    duration) and added at its onset."""
    width = math.ceil(longest * samples)
    t = torch.arange(width, dtype=torch.float32) / samples  # time since onset, in clips
    rise = (t / RAMP).clamp(max=1)
    fall = ((duration[:, None] - t) / RAMP).clamp(0, 1)
    envelope = 0.5 - 0.5 * torch.cos(math.pi * torch.minimum(rise, fall))
    window = envelope * torch.sin((2 * math.pi * samples / sample_rate) * freq[:, None] * t)
    start = (onset * samples).long()[:, None] + torch.arange(width)
    return torch.zeros(len(freq), samples).scatter_(1, start, window)


def synthesize_audio(
    f: dict[str, torch.Tensor], spec: MultimodalSpec, g: torch.Generator, radius: tuple[float, float]
) -> torch.Tensor:
    """Waveforms ``[n, samples]`` of scenes ``f`` whose radii lie in ``radius`` (``Scene.radius``); times are
    fractions of the clip.

    Tone 1: class k's note (log-spaced over :data:`TONE1_HZ`), onset 0–0.4 from the
    relative x position, 0.2–0.35 long from the relative radius.
    Tone 2: hue → pitch (log-spaced over :data:`TONE2_HZ`), onset 0–0.5 from the
    relative y position, 0.3 long. Plus white noise of std 0.01.
    """
    n, samples, sr = len(f["label"]), spec.audio_samples, spec.sample_rate
    (lo1, hi1), (lo2, hi2) = TONE1_HZ, TONE2_HZ
    size = (f["radius"] - radius[0]) / max(radius[1] - radius[0], 1e-6)
    pitch1 = lo1 * (hi1 / lo1) ** (f["label"] / (len(CLASSES) - 1))
    tone1 = _tone(samples, sr, pitch1, 0.4 * relative_position(f["cx"], f["radius"]), 0.2 + 0.15 * size, 0.35)
    pitch2 = lo2 * (hi2 / lo2) ** f["hue"]
    tone2 = _tone(samples, sr, pitch2, 0.5 * relative_position(f["cy"], f["radius"]), torch.full((n,), 0.3), 0.3)
    return 0.5 * tone1 + 0.3 * tone2 + 0.01 * torch.randn(n, samples, generator=g)


# ---------------------------------------------------------------------------------------------- text


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The byte-level BPE of the captions (default: the one in ``assets/``, made by experiments/train_tokenizer.py)."""
    return Tokenizer.from_file(str(TOKENIZER_PATH if path is None else path))


def captions(f: dict[str, torch.Tensor], g: torch.Generator, scene: Scene) -> list[str]:
    """One caption per scene, e.g. "a large red star in the top left" (the class named by
    :func:`shapes.class_names`); template and synonyms drawn from ``g``."""
    radius, names = scene.radius, class_names(scene.layout)
    n = len(f["label"])
    template = torch.randint(len(TEMPLATES), (n,), generator=g).tolist()
    synonym = torch.randint(2, (n,), generator=g).tolist()
    large = (f["radius"] >= (radius[0] + radius[1]) / 2).long().tolist()
    col = (relative_position(f["cx"], f["radius"]) * 3).long().clamp(max=2).tolist()
    row = (relative_position(f["cy"], f["radius"]) * 3).long().clamp(max=2).tolist()
    out = []
    for i, (label, hue) in enumerate(zip(f["label"].tolist(), f["hue"].tolist())):
        where = "centre" if (row[i], col[i]) == (1, 1) else f"{ROWS[row[i]]} {COLUMNS[col[i]]}"
        size = SIZE_WORDS[large[i]][synonym[i]]
        out.append(TEMPLATES[template[i]].format(size=size, color=color_name(hue), shape=names[label], where=where))
    return out


def tokenize(texts: Sequence[str], length: int, tokenizer: Tokenizer) -> torch.Tensor:
    """Token ids ``[len(texts), length]`` int64, padded with ``<pad>``; ValueError when a text is longer."""
    ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
    longest = max(ids, key=len, default=[])
    if len(longest) > length:
        caption = tokenizer.decode(longest)
        raise ValueError(f"the caption {caption!r} needs {len(longest)} tokens but text_length is {length}")
    out = torch.full((len(ids), length), tokenizer.token_to_id(PAD_TOKEN), dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


@functools.lru_cache(maxsize=1)
def _shipped_tokenizer() -> Tokenizer:
    return load_tokenizer()


def __getattr__(name: str) -> int:
    """``PAD_ID`` and ``VOCAB_SIZE`` of the shipped tokenizer, read from its file on first use (PEP 562), so this
    module imports before the file exists (experiments/train_tokenizer.py makes it)."""
    if name == "PAD_ID":
        return _shipped_tokenizer().token_to_id(PAD_TOKEN)
    if name == "VOCAB_SIZE":
        return _shipped_tokenizer().get_vocab_size()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- points


def sample_points(f: dict[str, torch.Tensor], num_points: int, scene: Scene, g: torch.Generator) -> torch.Tensor:
    """``num_points`` uniform points ``[n, P, 3]`` inside each scene's extruded object, in [0, 1]³ (with the
    ``parts`` layout a tilted corner may pass the image edge by a little, where the image clips the object).

    Candidates are drawn uniformly in the object's frame over the square of half-side
    ``EXTENT · radius`` that holds it; the first P inside (:func:`shapes.object_mask`, so
    the same object the image shows) are kept — they are i.i.d., so in random order — and
    mapped to (x, y) by the scene's centre and tilt. z is uniform in
    [0.5 − radius, 0.5 + radius].
    """
    n, candidates = len(f["label"]), 8 * num_points  # every object covers ≥ 29 % of its square (EQUAL_AREA / 2.6²)
    half = (EXTENT * f["radius"])[:, None]
    u, v = ((torch.rand(n, candidates, 2, generator=g) * 2 - 1) * half[..., None]).unbind(-1)
    inside = object_mask(u, v, f, scene.layout)  # [n, candidates]
    if int(inside.sum(1).min()) < num_points:
        raise RuntimeError("too few point candidates fell inside a shape")
    first = torch.sort((~inside).to(torch.uint8), dim=1, stable=True).indices[:, :num_points]
    u, v = u.gather(1, first), v.gather(1, first)
    cos, sin = torch.cos(f["theta"])[:, None], torch.sin(f["theta"])[:, None]
    x = f["cx"][:, None] + u * cos - v * sin
    y = f["cy"][:, None] + u * sin + v * cos
    z = 0.5 + f["radius"][:, None] * (2 * torch.rand(n, num_points, generator=g) - 1)
    return torch.stack([x, y, z], -1)


# ---------------------------------------------------------------------------------------------- dataset


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent seeded streams: 0 draws the factors, 1 + k the nuisance of ``MODALITIES[k]``."""
    return torch.Generator().manual_seed(seed * 100_003 + stream)


class PairedShapes(Dataset):
    """``size`` seeded scenes in every modality of ``modalities``; yields ``({modality: tensor}, label)``.

    The scenes are those of the image world (:func:`shapes.draw_scenes`, drawn as ``scene`` says) and
    the image is :func:`shapes.paint`'s, so one generator renders the world for every modality.
    Per item: ``image [3, S, S]`` and ``video [T, 3, V, V]`` normalized float (shapes.normalize),
    ``audio [n_mels, frames]`` log-mel float, ``text [text_length]`` int64 token ids,
    ``points [P, 3]`` float in [0, 1]³ in farthest-point order (:func:`~jin.encoders.farthest_point_order`: the
    first k are the k farthest-point samples, the point encoder's patch centres). ``factors`` holds the latent
    factors (``[size]`` each, colours ``[size, 3]``), ``captions`` the caption strings.

    Raises:
        ValueError: an unknown modality.
    """

    def __init__(self, size: int, seed: int, scene: Scene, spec: MultimodalSpec = MultimodalSpec(),
                 modalities: Sequence[str] = MODALITIES):
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; valid: {', '.join(MODALITIES)}")
        self.spec, self.modalities, self.scene = spec, tuple(modalities), scene
        self.classes = class_names(scene.layout)
        self.factors = draw_paired_scenes(size, _generator(seed, 0), scene)
        self.captions = captions(self.factors, _generator(seed, 1 + MODALITIES.index("text")), scene)
        self.data = {m: self._build(m, _generator(seed, 1 + MODALITIES.index(m))) for m in self.modalities}

    def _build(self, modality: str, g: torch.Generator) -> torch.Tensor:
        """One modality of every scene, stored compactly (uint8 pixels), rendered :data:`CHUNK` scenes at a time."""
        if modality == "text":
            return tokenize(self.captions, self.spec.text_length, _shipped_tokenizer())
        spec, scene, parts = self.spec, self.scene, []
        for s in range(0, len(self), CHUNK):
            f = {k: v[s : s + CHUNK] for k, v in self.factors.items()}
            if modality == "image":
                parts.append(to_uint8(paint(f, g, spec.image_size, scene)[0]))
            elif modality == "video":
                parts.append(render_video(f, scene, spec, g))
            elif modality == "audio":
                wave = synthesize_audio(f, spec, g, scene.radius)
                parts.append(log_mel(wave, spec.sample_rate, spec.n_fft, spec.hop, spec.n_mels))
            else:  # points
                parts.append(farthest_point_order(sample_points(f, spec.num_points, scene, g)))
        return torch.cat(parts)

    def __len__(self) -> int:
        return len(self.factors["label"])

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        item = {m: self.data[m][i] for m in self.modalities}
        for m in ("image", "video"):
            if m in item:
                item[m] = normalize(item[m])
        return item, int(self.factors["label"][i])


def build_paired_shapes(cfg, splits: Sequence[str] = ("train", "val")) -> tuple[PairedShapes, ...]:
    """Datasets of ``data=paired_shapes``: disjoint seeds per split; ``train_eval`` is ``train``.

    Raises:
        ConfigError: an invalid ``data.scene`` (:meth:`Scene.from_config`), ``data.train_size`` or ``data.val_size``.
    """
    check_split_sizes(cfg)
    spec, modalities, scene = MultimodalSpec.from_config(cfg), tuple(cfg.modalities), Scene.from_config(cfg.scene)
    made: dict[str, PairedShapes] = {}
    for s in splits:
        key = "train" if s == "train_eval" else s
        if key not in made:
            size = {"train": cfg.train_size, "val": cfg.val_size}[key]
            made[key] = PairedShapes(size, cfg.seed * 2 + (key == "val"), scene, spec, modalities)
    return tuple(made[s if s != "train_eval" else "train"] for s in splits)
