"""Real images: ``tiny_imagenet_100`` (Tiny-ImageNet restricted to N classes) and ``imagenet_1k`` (ImageFolder).

The code never downloads: a missing path raises :class:`FileNotFoundError`
naming the path looked at, the layout expected and how to obtain the data.
Images are opened lazily in ``__getitem__`` and converted to RGB. Random
augmentations draw from the global torch RNG, so under
:class:`~prob_jepa.data.sampler.SeededDataset` they are a pure function of
``(seed, epoch, index)``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_LAYOUT = """\
  <root>/                         (the unzipped tiny-imagenet-200 directory)
    wnids.txt                     one wnid per line
    train/<wnid>/images/*.JPEG
    val/images/*.JPEG
    val/val_annotations.txt       tab-separated lines: filename wnid x y w h"""
TINY_SOURCE = (
    "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it, "
    "then pass data.root=/path/to/tiny-imagenet-200"
)
IMAGENET_LAYOUT = """\
  <root>/                         (torchvision ImageFolder layout)
    train/<wnid>/*.JPEG
    val/<wnid>/*.JPEG             the validation images arranged in class folders too"""
IMAGENET_SOURCE = (
    "obtain ILSVRC-2012 from https://image-net.org (registration required), extract train/ into its class "
    "folders, arrange val/ into class folders (e.g. with the standard valprep.sh script), "
    "then pass data.root=/path/to/imagenet"
)


def _require(path: Path, what: str, layout: str, source: str) -> Path:
    """``path`` if it exists, else a :class:`FileNotFoundError` saying what was expected there and how to get it."""
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found: looked at {path.absolute()}\nExpected layout:\n{layout}\n"
            f"The data is never downloaded by the code: {source}."
        )
    return path


def _tiny(path: Path, what: str) -> Path:
    return _require(path, f"Tiny-ImageNet {what}", TINY_LAYOUT, TINY_SOURCE)


def _imagenet(path: Path, what: str) -> Path:
    return _require(path, f"ImageNet {what}", IMAGENET_LAYOUT, IMAGENET_SOURCE)


def _to_normalized() -> list[Callable]:
    """PIL RGB → float ``[3, H, W]`` normalized with the ImageNet mean and std."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(cfg) -> v2.Compose:
    """I-JEPA augmentation: RandomResizedCrop(``image_size``, scale=``crop_scale``), optional flip and colour.

    ``color_jitter`` is the strength s of I-JEPA's colour distortion
    (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, then grayscale with
    p=0.2); 0 turns it off.

    References:
        Assran et al., Self-Supervised Learning from Images with a
        Joint-Embedding Predictive Architecture (arXiv:2301.08243), ``src/transforms.py``.
    """
    ops: list[Callable] = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale))]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        ops += [v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8), v2.RandomGrayscale(p=0.2)]
    return v2.Compose(ops + _to_normalized())


def val_transform(cfg) -> v2.Compose:
    """Resize the short side to ``image_size / val_crop_fraction``, then center-crop ``image_size``."""
    resize = round(cfg.image_size / cfg.val_crop_fraction)
    return v2.Compose([v2.Resize(resize), v2.CenterCrop(cfg.image_size)] + _to_normalized())


class ImageList(Dataset):
    """Labelled image files, opened lazily; item ``i`` → ``(transform(RGB image) [3, S, S], label)``.

    Args:
        samples: ``(path, label)`` pairs.
        classes: class names (wnids); label ``k`` is ``classes[k]``.
        transform: PIL RGB image → tensor.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: Callable):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def tiny_classes(root: Path, num_classes: int, class_list: str | None) -> list[str]:
    """The chosen wnids in label order: the first ``num_classes`` of sorted ``wnids.txt``, or ``class_list``'s lines."""
    wnids = _tiny(root / "wnids.txt", "wnids.txt").read_text().split()
    if class_list is None:
        if len(wnids) < num_classes:
            raise ValueError(f"{root / 'wnids.txt'} lists {len(wnids)} classes, fewer than num_classes={num_classes}")
        return sorted(wnids)[:num_classes]
    path = Path(class_list).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"class list not found: looked at {path} (data.class_list: one wnid per line)")
    chosen = path.read_text().split()
    unknown = sorted(set(chosen) - set(wnids))
    if unknown or len(set(chosen)) != len(chosen) or len(chosen) != num_classes:
        raise ValueError(
            f"class list {path} must name {num_classes} distinct wnids of wnids.txt (data.num_classes); "
            f"it has {len(chosen)} lines, {len(set(chosen))} distinct, unknown: {unknown}"
        )
    return chosen


def tiny_samples(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """``(path, label)`` of every ``split`` image ("train" or "val") of ``classes``."""
    label = {wnid: k for k, wnid in enumerate(classes)}
    if split == "train":
        samples = []
        for wnid in classes:
            folder = _tiny(root / "train" / wnid / "images", f"train folder of {wnid}")
            samples += [(p, label[wnid]) for p in sorted(folder.glob("*.JPEG"))]
    else:
        images = _tiny(root / "val" / "images", "val images")
        annotations = _tiny(root / "val" / "val_annotations.txt", "val annotations")
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        samples = [(images / row[0], label[row[1]]) for row in rows if row[1] in label]
    if not samples:
        raise FileNotFoundError(f"no Tiny-ImageNet {split} images of the chosen classes in {root}\n{TINY_LAYOUT}")
    return samples


def interleave_classes(samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """``(path, label)`` pairs reordered round-robin over the labels (the first image of each class in label order,
    then the second, …), each class's images in their given order. Folders list a split class by class; the
    evaluation's probes, k-NN bank and probe curve take a split's first ``n`` images, which would then be a few
    classes of a hundred."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rounds = itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
    return [sample for row in rounds for sample in row if sample is not None]


def _transforms(cfg) -> dict[str, Callable]:
    """Per split: ``train`` augments; ``val`` and ``train_eval`` (train images for probes) do not."""
    return {"train": train_transform(cfg), "val": val_transform(cfg), "train_eval": val_transform(cfg)}


def _folder(split: str) -> str:
    return "train" if split == "train_eval" else split


def build_tiny_imagenet(cfg, splits: Sequence[str] = ("train", "val")) -> tuple[ImageList, ...]:
    """Datasets of ``data=tiny_imagenet_100``: ``num_classes`` classes, labels ``0..num_classes-1`` in class order,
    images interleaved over the classes (:func:`interleave_classes`)."""
    root = _tiny(Path(cfg.root).expanduser(), "root (data.root)")
    classes = tiny_classes(root, cfg.num_classes, cfg.class_list)
    transforms = _transforms(cfg)
    return tuple(ImageList(interleave_classes(tiny_samples(root, _folder(s), classes)), classes, transforms[s])
                 for s in splits)


def build_imagenet(cfg, splits: Sequence[str] = ("train", "val")) -> tuple[ImageFolder, ...]:
    """Datasets of ``data=imagenet_1k``: an ``ImageFolder`` per split, all with the same ``num_classes`` classes, images
    interleaved over the classes (:func:`interleave_classes`)."""
    root = _imagenet(Path(cfg.root).expanduser(), "root (data.root)")
    transforms = _transforms(cfg)
    sets = []
    for s in splits:
        folder = _imagenet(root / _folder(s), f"{_folder(s)} folder")
        if not any(p.is_dir() for p in folder.iterdir()):
            raise FileNotFoundError(
                f"ImageNet {s} folder {folder} has no class folders\nExpected:\n{IMAGENET_LAYOUT}\n{IMAGENET_SOURCE}."
            )
        images = ImageFolder(str(folder), transform=transforms[s])
        images.samples = images.imgs = interleave_classes(images.samples)
        images.targets = [label for _, label in images.samples]
        sets.append(images)
    for s, ds in zip(splits, sets):
        if len(ds.classes) != cfg.num_classes or ds.classes != sets[0].classes:
            raise ValueError(
                f"ImageNet {s} folder {root / s} has {len(ds.classes)} class folders; expected the same "
                f"{cfg.num_classes} (data.num_classes) in every split"
            )
    return tuple(sets)
