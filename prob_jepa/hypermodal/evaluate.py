"""Evaluation of a hypermodal run: per-modality probe and k-NN against the random initialization, retrieval, zero-shot
transfer, modality dropout, alignment energies and their correlation with a right retrieval."""
from __future__ import annotations

import itertools
import time
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..eval import (
    check_knn_bank, classified_right, evaluation_sets, feature_scores, paired_margins, plots, random_init_model,
)
from ..eval.cost import first_batch, step_flops, training_cost
from ..eval.metrics import pearson_r
from ..eval.representation import linear_probe
from ..run_dir import RunDir
from ..jepa import JEPA
from .objectives import pair_energy

KS = (1, 5, 10)
# the training steps whose draws (modalities, tasks) the FLOPs per step average, evenly spaced over the run
COST_STEPS = 4


@torch.no_grad()
def embed_dataset(
    model: JEPA, dataset: Dataset, batch_size: int, device: torch.device, embeddings: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Alignment embeddings ``{m: [N, E]}`` (empty without ``embeddings``), the target encoder's frozen features
    (:meth:`~prob_jepa.jepa.JEPA.representations`: ``{m: [N, D]}`` and, for a hierarchical
    modality encoder, ``{m/encoder: [N, D_L]}``; CPU, fp32) and labels ``[N]``."""
    names = model.modalities
    embeds: dict[str, list] = {m: [] for m in names}
    feats: dict[str, list] = defaultdict(list)
    labels = []
    bf16 = device.type == "cuda"
    for inputs, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc="embeddings", leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for m in names:
                x = inputs[m].to(device)
                if embeddings:
                    embeds[m].append(model.embed(m, x).float().cpu())
                for key, f in model.representations(m, x).items():
                    feats[key].append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    cat = lambda d: {m: torch.cat(v) for m, v in d.items() if v}  # noqa: E731
    return cat(embeds), cat(feats), torch.cat(labels)


def _ranks(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (row of ``score [N, N]``, higher: better; the true match on the diagonal) ``[N]``: gallery items
    that score above its true match, and others that tie with it."""
    true = score.diagonal()[:, None]
    return (score > true).sum(1).double(), (score == true).sum(1).double() - 1


def _hits(above: torch.Tensor, tied: torch.Tensor, k: int) -> torch.Tensor:
    """Per query, the chance that its true match ranks in the top ``k`` over a random order of its tie
    (the true match's 0-based rank is uniform on ``above … above + tied``)."""
    return ((k - above) / (tied + 1)).clamp(0, 1)


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Item ``i`` of ``query [N, E]`` should retrieve item ``i`` of ``gallery [N, E]`` (cosine similarity).

    Returns ``R@k`` (share of queries whose match ranks in the top ``k``) and the median rank (1 = first). Items that
    score exactly as the true match (identical inputs: two scenes with the same caption; a collapsed model) are
    ordered at random: ``R@k`` is its expectation over that order, the rank the mid-rank of the tie, so a collapsed
    model scores chance (``1/N``), not 1.
    """
    # normalized here, as pair_energy does (embeddings normalized under bf16 autocast are only about unit length)
    above, tied = _ranks(F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).T)
    out = {f"R@{k}": _hits(above, tied, k).mean().item() for k in ks}
    out["median_rank"] = (above + tied / 2).median().item() + 1
    return out


def retrieval(embeds: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Cross-modal retrieval in each direction of every pair: ``{"a->b": {R@1, R@5, R@10, median_rank}}``."""
    return {f"{a}->{b}": recall_at_k(embeds[a], embeds[b]) for a, b in itertools.permutations(embeds, 2)}


def zero_shot_transfer(train: Mapping[str, torch.Tensor], train_y: torch.Tensor, val: Mapping[str, torch.Tensor],
                       val_y: torch.Tensor, max_iter: int = 1000) -> dict[str, dict[str, float]]:
    """A linear class probe fit on modality ``a``'s embeddings, scored on every modality ``b``'s: ``{a: {b: acc}}``.

    The diagonal is the ordinary probe; off the diagonal the probe never saw modality ``b``.
    """
    names, n = list(val), len(val_y)
    out = {}
    for a in names:
        probe = linear_probe(train[a], train_y, torch.cat([val[b] for b in names]), val_y.repeat(len(names)),
                             max_iter=max_iter)
        correct = (probe.logits.argmax(1) == val_y.repeat(len(names))).float()
        out[a] = {b: correct[i * n:(i + 1) * n].mean().item() for i, b in enumerate(names)}
    return out


def dropout_robustness(train: Mapping[str, torch.Tensor], train_y: torch.Tensor, val: Mapping[str, torch.Tensor],
                       val_y: torch.Tensor, max_iter: int = 1000) -> dict[str, float]:
    """Probe accuracy of the fused embedding (mean over modalities) when only ``k`` modalities are present.

    The probe is fit on all modalities fused; ``{k: accuracy}`` averages over every subset of size ``k``.
    """
    names = list(val)
    def fuse(embeds: Mapping[str, torch.Tensor], subset: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.stack([embeds[m] for m in subset]).mean(0), dim=-1)

    subsets = [s for k in range(len(names), 0, -1) for s in itertools.combinations(names, k)]
    probe = linear_probe(fuse(train, names), train_y, torch.cat([fuse(val, s) for s in subsets]),
                         val_y.repeat(len(subsets)), max_iter=max_iter)
    correct = (probe.logits.argmax(1) == val_y.repeat(len(subsets))).float().view(len(subsets), -1).mean(1)
    return {
        str(k): correct[[i for i, s in enumerate(subsets) if len(s) == k]].mean().item()
        for k in range(len(names), 0, -1)
    }


def alignment_energies(embeds: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean JIN eq. 5 energy of matched pairs and of mismatched pairs, per modality pair."""
    out = {}
    for a, b in itertools.combinations(embeds, 2):
        energy = pair_energy(embeds[a], embeds[b])
        off = ~torch.eye(len(energy), dtype=torch.bool)
        out[f"{a}-{b}"] = {"matched": energy.diagonal().mean().item(), "random": energy[off].mean().item()}
    return out


def energy_retrieval_correlation(embeds: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Whether the alignment energy says which retrievals are right, JIN's own test of its energy (the JIN paper,
    §5.3: "energy correlates strongly with prediction accuracy (Pearson r = −0.83)", with eq. 5's energy between
    modalities): per direction ``a->b`` of every pair of ``embeds {m: [N, E]}``, the Pearson r over queries between
    an energy (:func:`~prob_jepa.hypermodal.objectives.pair_energy`, ``1 − cos``) and the query's true match ranking
    first (1 / 0; a tie counted at its chance, as ``R@1``):

    - ``matched``: the energy of the query and its true match — what an image head's energy is (that of the true
      target), known only with the label; it leans negative once some retrievals are right whatever the energy
      knows (a retrieval is right exactly when this energy is the query's lowest);
    - ``retrieved``: the energy of the query and the item it retrieves (the lowest), known without the label: the
      test of the energy as an uncertainty.

    Negative: lower energy goes with a right retrieval. NaN where no or every retrieval is right.
    """
    out = {}
    for a, b in itertools.permutations(embeds, 2):
        energy = pair_energy(embeds[a], embeds[b])
        right = _hits(*_ranks(-energy), k=1)  # ranked by the energy itself: the retrieved item is the lowest
        out[f"{a}->{b}"] = {"matched": pearson_r(energy.diagonal(), right),
                            "retrieved": pearson_r(energy.min(1).values, right)}
    return out


def retrieval_figure(table: Mapping[str, Mapping[str, float]], names: Sequence[str], path, chance: float):
    """Heat map of R@1 for every (query, gallery) pair."""
    grid = [[table[f"{a}->{b}"]["R@1"] if a != b else float("nan") for b in names] for a in names]
    fig, ax = plots.plt.subplots(figsize=(5.2, 4.3))
    plots.sns.heatmap(grid, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", xticklabels=names,
                      yticklabels=names, ax=ax)
    ax.set(xlabel="gallery modality", ylabel="query modality", title=f"retrieval R@1 (chance {chance:.3f})")
    return plots.save(fig, path)


# the JIN paper's energy–accuracy correlation (§5.3), drawn beside ours
JIN_ENERGY_R = -0.83


def transfer_figure(zero_shot, dropout, energies, energy_r, path):
    """Zero-shot transfer matrix, accuracy against present modalities, matched vs random energies, and the
    correlation of the energy with a right retrieval per direction (:func:`energy_retrieval_correlation`)."""
    names = list(zero_shot)
    fig, axes = plots.plt.subplots(1, 4, figsize=(21, 4.4))
    plots.sns.heatmap([[zero_shot[a][b] for b in names] for a in names], annot=True, fmt=".2f", vmin=0, vmax=1,
                      cmap="viridis", xticklabels=names, yticklabels=names, ax=axes[0])
    axes[0].set(xlabel="evaluated on", ylabel="probe fit on", title="zero-shot class transfer")
    ks = sorted(dropout, key=int)
    axes[1].plot([int(k) for k in ks], [dropout[k] for k in ks], marker="o")
    axes[1].set_xticks([int(k) for k in ks])
    axes[1].set(xlabel="modalities present", ylabel="probe accuracy (fused)", ylim=(0, 1.05), title="modality dropout")
    pairs = list(energies)
    x = range(len(pairs))
    axes[2].bar([i - 0.2 for i in x], [energies[p]["matched"] for p in pairs], 0.4, label="matched")
    axes[2].bar([i + 0.2 for i in x], [energies[p]["random"] for p in pairs], 0.4, label="random")
    axes[2].set_xticks(list(x), pairs, rotation=60, fontsize=7)
    top = max([1.0] + [v for p in pairs for v in energies[p].values()])
    axes[2].set(ylabel="energy (1 − cos)", title="alignment energy (JIN eq. 5)", ylim=(0, 1.25 * top))
    axes[2].legend(ncol=2, loc="upper center")  # above the bars: the headroom of ylim
    directions = list(energy_r)
    x = range(len(directions))
    for shift, kind, label in ((-0.2, "matched", "of the true match"), (0.2, "retrieved", "of the retrieved item")):
        axes[3].bar([i + shift for i in x], [energy_r[d][kind] for d in directions], 0.4, label=f"energy {label}")
    axes[3].axhline(0, color="black", lw=0.8)
    axes[3].axhline(JIN_ENERGY_R, color="grey", ls="--", lw=1, label=f"JIN §5.3 (r = {JIN_ENERGY_R})")
    axes[3].set_xticks(list(x), directions, rotation=60, fontsize=7)
    axes[3].set(ylim=(-1, 1), ylabel="Pearson r with a right retrieval (R@1)",
                title="does lower energy go with a right retrieval?")
    axes[3].legend(fontsize=7, loc="upper right")
    return plots.save(fig, path)


def frozen_scores(train_f: Mapping[str, torch.Tensor], train_y: torch.Tensor, val_f: Mapping[str, torch.Tensor],
                  val_y: torch.Tensor, e: DictConfig) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per representation ``m`` (a modality's shared-space mean token; ``<m>/encoder``: its hierarchical encoder's
    coarsest level), the linear probe (``linear_probe/<m>``) and k-NN (``knn/<m>``) accuracy of the frozen features
    ``{m: [N, D]}``, scored as the image run scores its encoder (:func:`~prob_jepa.eval.feature_scores`), and under
    the same names whether each validation item is classified right (bool ``[N]``)."""
    out, right = {}, {}
    for m in val_f:
        scores, probe, knn = feature_scores(train_f[m], train_y, val_f[m], val_y, e)
        out[f"linear_probe/{m}"], out[f"knn/{m}"] = scores["linear_probe"], scores["knn"]
        for score, is_right in classified_right(probe, knn, val_y).items():
            right[f"{score}/{m}"] = is_right
    return out, right


def evaluate_hypermodal(
    model: JEPA, cfg: DictConfig, train_set: Dataset, val_set: Dataset | None, run: RunDir,
    device: torch.device,
) -> dict[str, Any]:
    """Per-modality linear probe and k-NN of the target encoder and of the same model at its random initialization
    (``representation.random_init``), and the margins between them on the same validation items with their paired
    standard errors (``representation.margin``: :func:`~prob_jepa.eval.paired_margins`); with two modalities or
    more, retrieval R@1/5/10 in each direction, zero-shot transfer, modality dropout, alignment energies and their
    correlation with a right retrieval (:func:`energy_retrieval_correlation`); and the FLOPs of a training step (the
    mean over the draws of ``COST_STEPS`` of the run's steps, spread evenly; a run stopped early by
    ``trainer.max_steps`` is measured as if its curriculum ended there).

    Writes ``eval.json`` and ``plots/training_curves.png``, with two modalities or more ``plots/retrieval.png`` and
    ``plots/transfer.png``.

    Raises:
        ConfigError: the probe's or k-NN's ``eval.*`` settings are out of range (naming them), before any work.
    """
    e = cfg.eval
    train_set, val_set = evaluation_sets(train_set, val_set, e)  # checks the probe's and k-NN's settings first
    model.eval()
    aligned = len(model.modalities) > 1  # one modality has nothing to align with or retrieve
    check_knn_bank(e, train_set)
    tic = time.perf_counter()
    train_z, train_f, train_y = embed_dataset(model, train_set, e.batch_size, device, embeddings=aligned)
    val_z, val_f, val_y = embed_dataset(model, val_set, e.batch_size, device, embeddings=aligned)
    reference = random_init_model(cfg, device)
    _, ref_train_f, _ = embed_dataset(reference, train_set, e.batch_size, device, embeddings=False)
    _, ref_val_f, _ = embed_dataset(reference, val_set, e.batch_size, device, embeddings=False)
    del reference
    scores, right = frozen_scores(train_f, train_y, val_f, val_y, e)
    ref_scores, ref_right = frozen_scores(ref_train_f, train_y, ref_val_f, val_y, e)
    metrics: dict[str, Any] = {"representation": {
        **scores, "random_init": ref_scores, "margin": paired_margins(right, ref_right, count="scenes"),
    }}
    if aligned:
        table = retrieval(val_z)
        metrics["representation"].update({
            "mean_R@1": sum(r["R@1"] for r in table.values()) / len(table),
            "min_R@1": min(r["R@1"] for r in table.values()),
            "chance_R@1": 1 / len(val_y),
        })
        metrics.update({
            "retrieval": table,
            "retrieval_gallery": len(val_y),
            "zero_shot": zero_shot_transfer(train_z, train_y, val_z, val_y, e.probe_max_iter),
            "modality_dropout": dropout_robustness(train_z, train_y, val_z, val_y, e.probe_max_iter),
            "energy": alignment_energies(val_z),
            "energy_retrieval_r": energy_retrieval_correlation(val_z),
        })
    records = run.read_metrics()
    trained = records[-1]["step"] if records else 1
    steps = sorted({round(s * (trained - 1) / max(COST_STEPS - 1, 1)) for s in range(COST_STEPS)})
    metrics["cost"] = {"flops_per_step": step_flops(cfg, model, first_batch(val_set, cfg.trainer.batch_size),
                                                     steps, total_steps=trained)}
    if records:
        metrics["cost"].update(training_cost(records, cfg.trainer.batch_size))
        metrics["train"] = {"final_loss": records[-1]["loss"], "steps": records[-1]["step"]}
        plots.training_curves({run.path.name: records}, run.plots / "training_curves.png")
    metrics["timings"] = {"eval_s": time.perf_counter() - tic}
    metrics["eval_config"] = OmegaConf.to_container(e, resolve=True)  # what this evaluation ran with
    run.write_eval(metrics)
    if aligned:
        retrieval_figure(table, model.modalities, run.plots / "retrieval.png", 1 / len(val_y))
        transfer_figure(metrics["zero_shot"], metrics["modality_dropout"], metrics["energy"],
                        metrics["energy_retrieval_r"], run.plots / "transfer.png")
    return metrics
