"""Tiny-ImageNet-100 and ImageNet-1k on fake trees in their exact on-disk layouts."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from prob_jepa.config import compose_config
from prob_jepa.data import SeededDataset, build_datasets
from prob_jepa.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"

WNIDS = ["n04", "n01", "n03", "n00", "n02"]  # wnids.txt order is not sorted
TRAIN_PER_CLASS = 3
GREY_VALUE = 128  # the first train and val image of n00 are uniform greyscale, n01_0.JPEG is CMYK


def val_name(wnid: str, j: int) -> str:
    """The fake val image ``j`` of ``wnid``."""
    return f"val_{2 * WNIDS.index(wnid) + j}.JPEG"


def _save(path: Path, seed: int, mode: str = "RGB", size: int = 64) -> None:
    """A JPEG with structure (a colour gradient plus noise, saved in ``mode``), or uniform grey when ``mode="L"``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.new("L", (size, size), GREY_VALUE).save(path)
        return
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.array([1.0, 0.5, 0.2])
    pixels = np.clip(ramp + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _mode(wnid: str, j: int) -> str:
    return {("n00", 0): "L", ("n01", 0): "CMYK"}.get((wnid, j), "RGB")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A fake ``tiny-imagenet-200``: 5 wnids, 3 train images each, 2 val images each (annotated)."""
    root = tmp_path_factory.mktemp("tiny-imagenet-200")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    rows = []
    for c, wnid in enumerate(WNIDS):
        for j in range(TRAIN_PER_CLASS):
            path = root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG"
            _save(path, seed=10 * c + j, mode=_mode(wnid, j))
        for j in range(2):
            name = val_name(wnid, j)
            _save(root / "val" / "images" / name, seed=100 + 10 * c + j, mode="L" if (wnid, j) == ("n00", 0) else "RGB")
            rows.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows[::-1]) + "\n")  # not in file-name order
    return root


@pytest.fixture(scope="module")
def data_cfg():
    """``data_cfg(name, *overrides)`` → the ``data`` group in struct mode, composed once per name (Hydra is slow)."""
    composed: dict[str, DictConfig] = {}

    def make(name: str, *overrides: str) -> DictConfig:
        if name not in composed:
            composed[name] = compose_config(CONF, [f"data={name}"]).data
        return OmegaConf.merge(composed[name], OmegaConf.from_dotlist(list(overrides)))

    return make


@pytest.fixture
def tiny(data_cfg, tiny_root):
    """``tiny(*overrides)`` → (train, val) of ``data=tiny_imagenet_100`` on the fake tree with 3 classes."""
    return lambda *o: build_datasets(data_cfg("tiny_imagenet_100", f"root={tiny_root}", "num_classes=3", *o))


def wnid_of(path: Path) -> str:
    """The true wnid of a fake image: its class folder for train; for val ``val_{2c+j}`` is ``WNIDS[c]``."""
    if path.parent.parent.name == "val":
        return WNIDS[int(path.stem.split("_")[1]) // 2]
    return path.parent.parent.name


def test_default_classes_are_first_n_of_sorted_wnids(tiny):
    train, val = tiny()
    assert train.classes == val.classes == ["n00", "n01", "n02"]
    assert {(wnid_of(p), y) for p, y in train.samples + val.samples} == {("n00", 0), ("n01", 1), ("n02", 2)}


def test_a_split_lists_its_images_round_robin_over_the_classes(tiny, data_cfg, imagenet_root):
    """The evaluation takes a split's first n images (probes, k-NN bank, probe curve): listed class by class, as the
    folders are, those were a few classes of a hundred (2000 Tiny-ImageNet images: 4 classes)."""
    train, val = tiny()
    assert [y for _, y in train.samples] == [0, 1, 2] * TRAIN_PER_CLASS
    assert [y for _, y in val.samples] == [0, 1, 2] * 2
    train, _ = build_datasets(data_cfg("imagenet_1k", f"root={imagenet_root}", "num_classes=3"))
    assert train.targets == [y for _, y in train.samples] == [0, 1, 2, 0, 1, 2]
    assert [Path(p).name for p, _ in train.samples[:2]] == ["n00_0.JPEG", "n01_0.JPEG"]


def test_class_list_file_overrides_and_sets_label_order(tiny, tmp_path):
    class_list = tmp_path / "classes.txt"
    class_list.write_text("n04\nn00\nn03\n")
    train, val = tiny(f"class_list={class_list}")
    assert train.classes == ["n04", "n00", "n03"]
    assert {(wnid_of(p), y) for p, y in train.samples + val.samples} == {("n04", 0), ("n00", 1), ("n03", 2)}


@pytest.mark.parametrize("lines", ["n04\nn00\n", "n04\nn00\nn99\n", "n04\nn04\nn00\n"])
def test_class_list_must_name_num_classes_known_wnids(tiny, tmp_path, lines):
    class_list = tmp_path / "classes.txt"
    class_list.write_text(lines)
    with pytest.raises(ValueError, match="distinct wnids"):
        tiny(f"class_list={class_list}")


def test_sizes_and_val_annotations(tiny, tiny_root):
    train, val = tiny()
    assert len(train) == 3 * TRAIN_PER_CLASS
    assert len(val) == 3 * 2
    assert all(p.parent == tiny_root / "val" / "images" and p.exists() for p, _ in val.samples)
    expected = sorted(val_name(wnid, j) for wnid in ("n00", "n01", "n02") for j in (0, 1))
    assert sorted(p.name for p, _ in val.samples) == expected


def test_items_are_normalized_rgb_tensors(tiny):
    train, val = tiny()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for ds in (train, val):
        grey = next(i for i, (p, _) in enumerate(ds.samples) if p.name in ("n00_0.JPEG", val_name("n00", 0)))
        x, y = ds[grey]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
        assert torch.allclose(x, (torch.full((3, 64, 64), GREY_VALUE / 255) - mean) / std, atol=0.02)
        colour, _ = ds[grey + 1]
        assert (colour[0] - colour[2]).abs().mean() > 0.5  # colour images keep their channels
    cmyk = [p.name for p, _ in train.samples].index("n01_0.JPEG")
    assert train[cmyk][0].shape == (3, 64, 64)


def test_augmentation_is_reproducible_per_index_and_seed(tiny):
    train, val = tiny()
    seeded = SeededDataset(train)
    a, b, c = seeded[(4, 123)][0], seeded[(4, 123)][0], seeded[(4, 124)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(SeededDataset(val)[(4, 1)][0], SeededDataset(val)[(4, 2)][0])


def test_train_transform_reads_crop_scale_hflip_and_color_jitter(tiny):
    train, val = tiny("crop_scale=[1.0,1.0]", "hflip=false")
    x = val.transform(Image.open(train.samples[4][0]).convert("RGB"))
    assert all(torch.equal(SeededDataset(train)[(4, s)][0], x) for s in range(4))  # no crop, no flip
    default_train, _ = tiny()
    assert not all(torch.equal(SeededDataset(default_train)[(4, s)][0], x) for s in range(4))
    jitter_train, _ = tiny("crop_scale=[1.0,1.0]", "hflip=false", "color_jitter=1.0")
    assert not all(torch.allclose(SeededDataset(jitter_train)[(4, s)][0], x, atol=1e-3) for s in range(4))


@pytest.mark.parametrize("missing", ["", "wnids.txt", "val/val_annotations.txt"])
def test_tiny_missing_data_says_layout_and_source(data_cfg, tiny_root, tmp_path, missing):
    root = tmp_path / "tiny-imagenet-200"
    if missing:  # a copy of the fake tree with one required file removed
        shutil.copytree(tiny_root, root)
        (root / missing).unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(data_cfg("tiny_imagenet_100", f"root={root}", "num_classes=3"))
    message = str(err.value)
    assert str(root / missing) in message
    for needle in ("wnids.txt", "train/<wnid>/images/*.JPEG", "val_annotations.txt", "tiny-imagenet-200.zip"):
        assert needle in message
    assert "data.root=" in message


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """A fake ImageFolder ImageNet: 3 classes, 2 train and 1 val image each; n02_0.JPEG is CMYK (ImageNet has some)."""
    root = tmp_path_factory.mktemp("imagenet")
    for c, wnid in enumerate(["n02", "n00", "n01"]):
        for j in range(2):
            mode = "CMYK" if c == j == 0 else "RGB"
            _save(root / "train" / wnid / f"{wnid}_{j}.JPEG", seed=c * 10 + j, mode=mode, size=40)
        _save(root / "val" / wnid / f"ILSVRC2012_val_{c}.JPEG", seed=50 + c, size=40)
    return root


def test_imagenet_image_folder_splits(data_cfg, imagenet_root):
    train, val = build_datasets(data_cfg("imagenet_1k", f"root={imagenet_root}", "num_classes=3"))
    assert train.classes == val.classes == ["n00", "n01", "n02"]
    assert (len(train), len(val)) == (6, 3)
    assert [y for _, y in val.samples] == [0, 1, 2]
    cmyk = [Path(p).name for p, _ in train.samples].index("n02_0.JPEG")
    for x, _ in (train[cmyk], val[0]):
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    seeded = SeededDataset(train)
    assert torch.equal(seeded[(1, 7)][0], seeded[(1, 7)][0])
    assert not torch.equal(seeded[(1, 7)][0], seeded[(1, 8)][0])


def test_imagenet_class_count_must_match(data_cfg, imagenet_root):
    with pytest.raises(ValueError, match="1000"):
        build_datasets(data_cfg("imagenet_1k", f"root={imagenet_root}"))


def test_imagenet_missing_root_says_layout_and_source(data_cfg, tmp_path):
    root = tmp_path / "imagenet"
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(data_cfg("imagenet_1k", f"root={root}"))
    message = str(err.value)
    for needle in (str(root), "train/<wnid>/*.JPEG", "val/<wnid>/*.JPEG", "image-net.org", "valprep", "data.root="):
        assert needle in message


def test_imagenet_splits_must_share_classes(data_cfg, tmp_path):
    root = tmp_path / "imagenet"
    _save(root / "train" / "n00" / "a.JPEG", seed=0, size=16)
    _save(root / "val" / "n01" / "b.JPEG", seed=1, size=16)
    with pytest.raises(ValueError, match="same 1"):
        build_datasets(data_cfg("imagenet_1k", f"root={root}", "num_classes=1"))


def test_imagenet_flat_val_folder_is_rejected(data_cfg, tmp_path):
    root = tmp_path / "imagenet"
    _save(root / "train" / "n00" / "a.JPEG", seed=0, size=16)
    _save(root / "val" / "ILSVRC2012_val_00000001.JPEG", seed=1, size=16)
    with pytest.raises(FileNotFoundError, match="no class folders(.|\n)*valprep"):
        build_datasets(data_cfg("imagenet_1k", f"root={root}", "num_classes=1"))


@pytest.mark.parametrize("name", ["tiny_imagenet_100", "imagenet_1k"])
def test_train_eval_split_is_the_train_images_without_augmentation(name, data_cfg, tiny_root, imagenet_root):
    root = tiny_root if name == "tiny_imagenet_100" else imagenet_root
    cfg = data_cfg(name, f"root={root}", "num_classes=3", "image_size=32")
    train, probe = build_datasets(cfg, ("train", "train_eval"))
    assert len(train) == len(probe) and [probe[i][1] for i in range(len(probe))] == [train[i][1] for i in range(len(train))]
    seeded = SeededDataset(probe)
    torch.testing.assert_close(seeded[(0, 1)][0], seeded[(0, 2)][0])  # no randomness: seed-independent


def test_a_run_on_tiny_imagenet_evaluates_end_to_end(tiny_root, tmp_path):
    """Data without a marker: the evaluation skips the ambiguity pairs and shows what could be behind the centre."""
    from PIL import Image as PILImage

    from prob_jepa.train import pretrain

    cfg = compose_config(CONF, [
        "data=tiny_imagenet_100", f"data.root={tiny_root}", "data.num_classes=5", "data.image_size=32",
        "model=vit_tiny", "model.patch_size=4", "model.dims=[32]", "model.depths=[1]", "model.num_heads=[2]",
        "model.predictor.dim=24", "model.predictor.depth=1", "model.predictor.num_heads=2", "mask.image.0.min_keep=2",
        "trainer.batch_size=5", "trainer.max_steps=2", "trainer.progress=false", "eval.knn_k=3",
        "eval.head_images=4", "eval.head_rows=64", "eval.sample_rows=16", "eval.num_samples=8", "eval.map_images=2",
        "eval.retrieval_queries=8",
    ])
    result = pretrain(cfg, run_dir=tmp_path)
    assert result.status == "stopped" and "multimodality" not in result.metrics  # stopped at trainer.max_steps
    panel = result.metrics["what_could_be_here"]
    assert panel["bank_tokens"] == 15 * 64 and 1 <= panel["distinct_patches"] <= 8
    for png in ("uncertainty_maps.png", "what_could_be_here.png"):
        assert PILImage.open(tmp_path / "plots" / png).size[0] > 100
