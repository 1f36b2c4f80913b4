"""The paired multimodal shapes world: every modality of item i shows the same scene."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import load_experiment, paired_scene
from jin.encoders import farthest_point_order
from prob_jepa.data import build_datasets
from prob_jepa.data.multimodal import (
    MODALITIES, TOKENIZER_PATH, MultimodalSpec, PairedShapes, load_tokenizer, log_mel, mel_filterbank,
    relative_position, video_centres,
)
from prob_jepa.data.multimodal import PAD_ID, VOCAB_SIZE
from prob_jepa.data.shapes import ARRANGEMENT_NAMES, CLASSES, MEAN, STD, Scene

SPEC = MultimodalSpec()
SCENE = paired_scene()
PARTS = Scene(**{**SCENE.__dict__, "layout": "parts"})


@pytest.fixture(scope="module")
def scenes() -> PairedShapes:
    return PairedShapes(400, 0, SCENE)


def foreground_centroids(pixels: torch.Tensor) -> torch.Tensor:
    """Centroids ``[..., 2]`` (x, y in [0, 1]) of the shape in normalized images ``[..., 3, S, S]``: the background
    is dark, the shape has a channel at full intensity."""
    mask = (pixels * STD + MEAN).amax(-3) > 0.6
    c = (torch.arange(pixels.shape[-1]) + 0.5) / pixels.shape[-1]
    area = mask.sum((-2, -1))
    return torch.stack([(mask * c).sum((-2, -1)) / area, (mask * c[:, None]).sum((-2, -1)) / area], -1)


def stacked(ds: PairedShapes, modality: str) -> torch.Tensor:
    return torch.stack([ds[i][0][modality] for i in range(len(ds))])


def test_scenes_are_seeded():
    a, b, c = PairedShapes(16, 3, SCENE), PairedShapes(16, 3, SCENE), PairedShapes(16, 4, SCENE)
    for m in MODALITIES:
        assert torch.equal(stacked(a, m), stacked(b, m)), m
        assert not torch.equal(stacked(a, m), stacked(c, m)), m
    assert a.captions == b.captions and a.captions != c.captions


def test_each_modality_does_not_depend_on_which_others_are_built(scenes):
    alone = PairedShapes(400, 0, SCENE, modalities=("points", "image"))
    assert torch.equal(stacked(alone, "image"), stacked(scenes, "image"))
    assert torch.equal(stacked(alone, "points"), stacked(scenes, "points"))
    assert set(alone[0][0]) == {"points", "image"}


def test_items_have_the_documented_shapes_and_collate(scenes):
    item, label = scenes[7]
    expected = {
        "image": ((3, 32, 32), torch.float32), "audio": ((32, 32), torch.float32), "text": ((16,), torch.int64),
        "video": ((4, 3, 32, 32), torch.float32), "points": ((256, 3), torch.float32),
    }
    assert {m: (tuple(x.shape), x.dtype) for m, x in item.items()} == expected
    assert label == int(scenes.factors["label"][7]) and 0 <= label < len(CLASSES)
    assert set(scenes.factors) == {"label", "cx", "cy", "radius", "theta", "color", "hue", "value", "background", "motion"}
    batch, labels = next(iter(DataLoader(scenes, batch_size=5)))
    assert batch["video"].shape == (5, 4, 3, 32, 32) and labels.shape == (5,)
    audio = stacked(scenes, "audio")
    assert abs(audio.mean().item()) < 0.3 and 0.7 < audio.std().item() < 1.3  # fixed standardization


def test_image_shows_the_shape_at_its_centre(scenes):
    centroid = foreground_centroids(stacked(scenes, "image"))
    f = scenes.factors
    assert (centroid - torch.stack([f["cx"], f["cy"]], -1)).abs().max() < 0.02


def test_video_starts_at_the_image_and_moves_along_its_direction(scenes):
    video, f = stacked(scenes, "video"), scenes.factors
    track = foreground_centroids(video)  # [n, T, 2]
    assert torch.allclose(track[:, 0], foreground_centroids(stacked(scenes, "image")), atol=1e-6)
    assert (track - video_centres(f, SPEC.video_frames)).abs().max() < 0.02
    moved = track[:, -1] - track[:, 0]
    direction = torch.stack([torch.cos(f["motion"]), torch.sin(f["motion"])], -1)
    far = moved.norm(dim=-1) > 2 / SPEC.video_size
    assert far.float().mean() > 0.3  # most shapes have room to move
    assert ((moved[far] * direction[far]).sum(-1) / moved[far].norm(dim=-1)).min() > 0.5


@pytest.mark.parametrize("layout", ["single", "parts"])
def test_points_fill_the_shape_in_the_image(scenes, layout):
    """Points and image come from one geometry (shapes.object_mask), whatever the scene's layout."""
    if layout == "parts":
        scenes = PairedShapes(200, 0, PARTS, modalities=("image", "points"))
    points, f = stacked(scenes, "points"), scenes.factors
    if layout == "single":  # a tilted corner of the parts layout may pass the image edge, as the image clips it
        assert points.min() >= 0 and points.max() <= 1
    offset = points[..., :2].mean(1) - torch.stack([f["cx"], f["cy"]], -1)
    assert offset.abs().mean() < 0.015 and offset.abs().max() < 0.07
    assert ((points[..., 2] - 0.5).abs() <= f["radius"][:, None]).all()
    image = stacked(scenes, "image")
    shape = (image * STD + MEAN).amax(1) > 0.6  # [n, S, S]
    col, row = (points[..., :2] * image.shape[-1]).long().clamp(0, image.shape[-1] - 1).unbind(-1)
    on_shape = shape[torch.arange(len(points))[:, None], row, col].float().mean(1)
    assert on_shape.mean() > 0.93 and on_shape.min() > 0.8  # the rest fall on pixels cut by the outline
    assert torch.equal(farthest_point_order(points), points)  # stored in farthest-point order: the encoder's centres


def test_audio_tones_encode_class_position_and_hue(scenes):
    audio, f = stacked(scenes, "audio"), scenes.factors
    fb = mel_filterbank(SPEC.n_fft, SPEC.n_mels, SPEC.sample_rate)
    centre_hz = (fb * torch.linspace(0, SPEC.sample_rate / 2, len(fb))[:, None]).sum(0) / fb.sum(0)
    low, high = audio[:, centre_hz < 1800], audio[:, centre_hz > 1900]  # tone 1 (class), tone 2 (hue)
    note = low.amax(-1).argmax(-1)
    per_class = [note[f["label"] == k].unique() for k in range(len(CLASSES))]
    assert all(len(bins) == 1 for bins in per_class) and len(torch.cat(per_class).unique()) == len(CLASSES)
    pitch2 = high.amax(-1).argmax(-1).float()
    assert torch.corrcoef(torch.stack([pitch2, f["hue"]]))[0, 1] > 0.95
    onset = (low.amax(1) > 1).float().argmax(-1).float()  # first loud frame of tone 1
    assert torch.corrcoef(torch.stack([onset, relative_position(f["cx"], f["radius"])]))[0, 1] > 0.95


def test_mel_filters_partition_unity_and_a_tone_peaks_in_its_band():
    fb = mel_filterbank(512, 32, 16000)
    hz = torch.linspace(0, 8000, 257)
    centre_hz = (fb * hz[:, None]).sum(0) / fb.sum(0)
    assert fb.shape == (257, 32) and fb.min() >= 0 and torch.allclose(fb.amax(0), torch.ones(32), atol=0.2)
    between = (hz >= centre_hz[0] + 50) & (hz <= centre_hz[-1] - 200)
    assert torch.allclose(fb[between].sum(1), torch.ones(int(between.sum())), atol=1e-5)
    t = torch.arange(8448) / 16000
    for freq in (440.0, 1000.0, 3000.0, 6000.0):
        spectrum = log_mel(torch.sin(2 * math.pi * freq * t)).mean(-1)  # [n_mels]
        assert spectrum.argmax() == (centre_hz - freq).abs().argmin(), freq


def test_captions_name_the_scene_and_tokens_decode_back(scenes):
    f, tokenizer = scenes.factors, load_tokenizer()
    hue_names = {0.0: "red", 1 / 6: "yellow", 1 / 3: "green", 0.5: "cyan", 2 / 3: "blue", 1.0: "red"}
    x, y = relative_position(f["cx"], f["radius"]), relative_position(f["cy"], f["radius"])
    for i, caption in enumerate(scenes.captions):
        words = caption.replace(",", "").split()
        assert CLASSES[int(f["label"][i])] in words
        for hue, name in hue_names.items():
            if abs(f["hue"][i] - hue) < 0.02:
                assert name in words, (caption, float(f["hue"][i]))
        assert ("left" in words) == (x[i] < 1 / 3) and ("right" in words) == (x[i] > 2 / 3)
        assert ("top" in words) == (y[i] < 1 / 3) and ("bottom" in words) == (y[i] > 2 / 3)
        ids = scenes[i][0]["text"]
        assert tokenizer.decode(ids[ids != PAD_ID].tolist()) == caption
    assert stacked(scenes, "text").max() < VOCAB_SIZE and PAD_ID == 0


def test_a_caption_longer_than_text_length_is_an_error():
    with pytest.raises(ValueError, match="text_length"):
        PairedShapes(8, 0, SCENE, MultimodalSpec(text_length=4), modalities=("text",))


def test_unknown_modality_lists_valid_names():
    with pytest.raises(ValueError, match="image, audio, text, video, points"):
        PairedShapes(8, 0, SCENE, modalities=("image", "smell"))


def test_shipped_tokenizer_is_reproduced_by_its_script(tmp_path, monkeypatch):
    script = load_experiment("train_tokenizer")
    monkeypatch.setattr(sys, "argv", ["train_tokenizer.py", "--out", str(tmp_path / "bpe.json")])
    script.main()
    assert json.loads((tmp_path / "bpe.json").read_text()) == json.loads(TOKENIZER_PATH.read_text())


def test_build_datasets_from_the_composed_config(compose):
    cfg = compose("data=paired_shapes", "data.train_size=32", "data.val_size=16", "data.modalities=[audio,text]").data
    train, val, probe = build_datasets(cfg, ("train", "val", "train_eval"))
    assert probe is train and (len(train), len(val)) == (32, 16)
    assert set(train[0][0]) == {"audio", "text"} and train.spec == MultimodalSpec.from_config(cfg)
    assert not torch.equal(train.factors["cx"][:16], val.factors["cx"])
