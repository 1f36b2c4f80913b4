"""What could be behind a mask: each head sample shown as the training patch whose target token it is nearest.

A head's samples live in the target encoder's feature space, where nobody can look at them. Retrieval makes
them visible: every sample (and the point prediction, ``head.mean``) is replaced by its nearest neighbour
among the target tokens of a bank of training images, and shown as the image patch that token encodes. On
the ``shapes`` ambiguity pairs the answer is known — the hidden marker is colour 0 or colour 1 with the
marker's weights — so the share of samples that retrieve a patch of each marker colour is a number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from ..data import display_images
from ..data.shapes import Marker, Scene, ambiguity_pairs
from ..heads import Head
from ..masks import hide
from ..jepa import LevelJEPA
from .ambiguity import marker_masks

CLASSES = ("colour_0", "colour_1", "elsewhere")  # what a retrieved marker-query patch shows


@dataclass
class TokenBank:
    """Target tokens of training images at the coarsest predicted level, and where each comes from.

    features: ``[N, D]`` layer-normed target features (N = images × tokens per image).
    image: ``[N]`` index of each token's image in ``images``.
    box: ``[N, 4]`` the token's pixel box ``(x0, y0, x1, y1)``, end-exclusive.
    images: ``[n, 3, H, W]`` the bank's images, as the dataset gives them (normalized).
    """

    features: torch.Tensor
    image: torch.Tensor
    box: torch.Tensor
    images: torch.Tensor

    def patches(self, index: torch.Tensor, data_name: str) -> list[torch.Tensor]:
        """The displayable pixels ``[h, w, 3]`` in [0, 1] of the bank tokens ``index`` (any shape, flattened)."""
        out = []
        for i in index.flatten().tolist():
            x0, y0, x1, y1 = self.box[i].tolist()
            out.append(display_images(self.images[self.image[i], :, y0:y1, x0:x1], data_name))
        return out


def token_boxes(coords: torch.Tensor, image_size: int) -> torch.Tensor:
    """Token coordinates ``[..., 3]`` (centre x, y in [0, 1]; scale = log2 of the side as a fraction of the image,
    ``jin.layers.coords.grid_coords``) → pixel boxes ``[..., 4]`` ``(x0, y0, x1, y1)``, int64, end-exclusive."""
    half = 2.0 ** coords[..., 2] / 2
    lo = ((coords[..., :2] - half[..., None]) * image_size).round().long()
    hi = ((coords[..., :2] + half[..., None]) * image_size).round().long()
    return torch.cat([lo, hi], -1).clamp(0, image_size)


@torch.no_grad()
def token_bank(model: LevelJEPA, images: torch.Tensor, batch_size: int, device: torch.device) -> TokenBank:
    """The target tokens of training ``images [n, 3, H, W]`` (normalized, any device) at the coarsest predicted
    level, ``model.predict_levels[-1]`` — the level ``model.heads[-1]`` predicts; encoded ``batch_size`` at a time."""
    level = model.predict_levels[-1]
    images = images.cpu()
    features = torch.cat([
        model.target_features(images[s : s + batch_size].to(device))[level].flatten(1, 2).float().cpu()
        for s in range(0, len(images), batch_size)
    ])  # [n, U·T, D]
    n, tokens, _ = features.shape
    box = token_boxes(model.context_encoder.coords(level)[0].flatten(0, 1).cpu(), images.shape[-1])  # [U·T, 4]
    return TokenBank(features.flatten(0, 1), torch.arange(n).repeat_interleave(tokens), box.repeat(n, 1), images)


def nearest(bank: torch.Tensor, queries: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index ``[Q]`` of each query's nearest bank row (Euclidean) for ``bank [N, D]``, ``queries [Q, D]``."""
    bank = bank.to(queries.device)
    return torch.cat([torch.cdist(q, bank).argmin(1) for q in queries.float().split(chunk)]).cpu()


@dataclass
class Retrieval:
    """Bank tokens retrieved for ``Q`` masked target tokens (``Q`` = images × target tokens per image).

    samples: ``[S, Q]`` the nearest bank token of each of ``S`` head samples.
    mean: ``[Q]`` the nearest bank token of the head's point prediction.
    query_box: ``[Q, 4]`` the pixel box of each masked token in its image (image-major order).
    """

    samples: torch.Tensor
    mean: torch.Tensor
    query_box: torch.Tensor

    def distinct(self) -> float:
        """Distinct patches among the ``S`` samples' retrievals, mean over queries (1 = always the same patch)."""
        return sum(len(set(col)) for col in self.samples.t().tolist()) / self.samples.shape[1]


@torch.no_grad()
def retrieve(
    model: LevelJEPA, head: Head, images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor, bank: TokenBank,
    num_samples: int,
) -> Retrieval:
    """Predict the units ``targets [B, 1, K]`` of ``images [B, 3, H, W]`` from ``context [B, Kc]`` with ``head``
    (which predicts ``model``'s coarsest predicted level) and retrieve every sample's nearest bank token."""
    cond = model.predict(images, context, targets).cond
    c = cond[-1].flatten(0, 2).float()  # [Q, C]
    samples = head.sample(c, num_samples).float()  # [S, Q, D]
    S, Q, _ = samples.shape
    coords = model.target_coords(targets)[-1]  # [B, 1, T, 3]
    return Retrieval(
        samples=nearest(bank.features, samples.flatten(0, 1)).view(S, Q),
        mean=nearest(bank.features, head.mean(c).float()),
        query_box=token_boxes(coords.flatten(0, 2), images.shape[-1]).cpu(),
    )


def marker_classes(bank: TokenBank, marker: Marker, data_name: str) -> torch.Tensor:
    """Per bank token ``[N]``: 0 or 1, the marker colour of its image when the token's centre lies in the marker
    (the nearer of the two colours to the image's mean marker pixel), else 2 (``"elsewhere"``)."""
    region = bank.images[:, :, marker.y : marker.y + marker.size, marker.x : marker.x + marker.size]
    pixel = display_images(region, data_name).mean(dim=(1, 2))  # [n, 3]
    colour = torch.cdist(pixel, torch.tensor(marker.colors)).argmin(1)  # [n]
    cx, cy = (bank.box[:, 0] + bank.box[:, 2]) / 2, (bank.box[:, 1] + bank.box[:, 3]) / 2
    inside = (cx >= marker.x) & (cx < marker.x + marker.size) & (cy >= marker.y) & (cy < marker.y + marker.size)
    return torch.where(inside, colour[bank.image], torch.full_like(bank.image, 2))


def class_shares(classes: torch.Tensor) -> dict[str, float]:
    """Share of each of :data:`CLASSES` among ``classes`` (values 0, 1, 2)."""
    counts = torch.bincount(classes.flatten(), minlength=len(CLASSES)).double()
    return dict(zip(CLASSES, (counts / counts.sum()).tolist()))


@torch.no_grad()
def marker_retrieval(
    model: LevelJEPA, head: Head, data: DictConfig, bank: TokenBank, num_pairs: int, num_samples: int,
    device: torch.device, seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the head puts behind the hidden marker of the ``shapes`` ambiguity pairs.

    Context: every mask unit outside the marker (as in ``ambiguity_metrics``); each sample of each marker token
    retrieves its nearest bank token, which shows marker colour 0, colour 1, or something else. A head that
    has learnt the ambiguity retrieves the two colours in about the marker's weights; a point prediction, one.

    Returns:
        metrics: the shares of :data:`CLASSES` among the samples' and the point predictions' retrievals, the
            mean number of distinct patches among a token's samples, the true weights, the bank's size;
        plot: :func:`panel_rows` for the first pairs (truths: the marker in each colour), the shares, the weights.
    """
    marker = Marker.from_config(data.marker)
    pairs = ambiguity_pairs(num_pairs, data.image_size, seed, marker, Scene.from_config(data.scene))
    context, targets = marker_masks(pairs, model.context_encoder.unit_grid, device)
    found = retrieve(model, head, pairs.images[0].to(device), context, targets, bank, num_samples)
    classes = marker_classes(bank, marker, data.name)
    metrics = {
        "pairs": num_pairs,
        "bank_tokens": len(bank.features),
        "weights": list(marker.weights),
        "samples": class_shares(classes[found.samples]),
        "mean": class_shares(classes[found.mean]),
        "distinct_patches": found.distinct(),
    }
    labels = [f"colour {k} (p = {w:g})" for k, w in enumerate(marker.weights)]
    rows = panel_rows(found, pairs.images, bank, data.name, labels, classes)
    return metrics, {"weights": list(marker.weights), "samples": metrics["samples"], "mean": metrics["mean"],
                     "rows": rows}


@torch.no_grad()
def centre_retrieval(
    model: LevelJEPA, head: Head, images: torch.Tensor, bank: TokenBank, num_samples: int, data_name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the head puts behind the 2 × 2 mask units at the centre of ``images [B, 3, H, W]`` (data without a
    marker; on an odd grid the block starts one unit above and left of the middle), predicted from all the other
    units; the plot rows also show each masked token's true patch.

    Raises:
        ValueError: for a grid of at most 2 × 2 units (no context is left).
    """
    G = model.context_encoder.unit_grid
    lo = max(G // 2 - 1, 0)
    hidden = [r * G + c for r in range(lo, min(lo + 2, G)) for c in range(lo, min(lo + 2, G))]
    if len(hidden) == G * G:
        raise ValueError(f"a {G}×{G} mask-unit grid leaves no context around its centre")
    B, device = len(images), images.device
    context, targets = hide(torch.tensor(hidden, device=device).expand(B, -1), G * G)
    found = retrieve(model, head, images, context, targets, bank, num_samples)
    metrics = {"images": B, "bank_tokens": len(bank.features), "distinct_patches": found.distinct()}
    return metrics, {"rows": panel_rows(found, images[None], bank, data_name, ["truth"])}


def panel_rows(
    found: Retrieval, images: torch.Tensor, bank: TokenBank, data_name: str, truth_labels: list[str],
    classes: torch.Tensor | None = None, shown: int = 2, patches: int = 10,
) -> list[dict[str, Any]]:
    """For the first masked token of each of the first ``shown`` images: the image with its masked units greyed
    out (``image``, from ``images[0]``), the token's box (``query_box``), its true pixels in each of the
    ``images [V, B, 3, H, W]`` versions (``truths``, labelled ``truth_labels``), the patches retrieved by the
    point prediction and by ``patches`` samples (``patches``, the point prediction's first), and, given the
    bank's ``classes``, each patch's class name. Pixels are displayable ``[h, w, 3]`` lists in [0, 1]."""
    tokens = len(found.query_box) // images.shape[1]  # masked tokens per image
    rows = []
    for i in range(min(shown, images.shape[1])):
        q = i * tokens
        picked = torch.cat([found.mean[q : q + 1], found.samples[:patches, q]])
        shown_image = display_images(images[0, i], data_name).clone()
        for x0, y0, x1, y1 in found.query_box[q : q + tokens].tolist():
            shown_image[y0:y1, x0:x1] = 0.5
        x0, y0, x1, y1 = found.query_box[q].tolist()
        row = {
            "image": shown_image.numpy().round(3).tolist(),
            "query_box": [x0, y0, x1, y1],
            "truths": [display_images(v[i, :, y0:y1, x0:x1], data_name).numpy().round(3).tolist() for v in images],
            "truth_labels": truth_labels,
            "patches": [x.numpy().round(3).tolist() for x in bank.patches(picked, data_name)],
        }
        if classes is not None:
            row["classes"] = [CLASSES[c] for c in classes[picked].tolist()]
        rows.append(row)
    return rows
