"""Evaluate a trained MVAD, IDIF or PatchCore run at sample, image and pixel level, in bounded memory.

Prints a table in the papers' format and writes metrics.json, metrics.md and pictures (PNG).

    python eval.py --checkpoint runs/idif_zipper/last.pt
    python eval.py --checkpoint runs/mvad_all/last.pt --data-root /data/Real-IAD --drop-views 2

Levels (REFERENCE section 5): a *sample* is one object seen by V cameras, an *image* is one view.
  image score  = max of the view's smoothed anomaly map      image label  = any pixel of its mask
  sample score = max over the sample's present views' scores  sample label = any present view
  pixel        = every pixel of every present view, against its mask
Metrics: AUROC and AP (scikit-learn), F1-max over the exact precision-recall curve (ADer samples 21
thresholds), AU-PRO (per-region overlap over FPR in [0, 0.3], divided by 0.3). All metrics return
NaN when the labels hold only one class (written as null in metrics.json, "-" in the tables).

Memory: maps are never kept. `PixelMetrics` folds each batch into fixed-size histograms; its
results stay within a bound that it computes itself (1e-4 or less on anomaly maps, see its
docstring; written to metrics.json as "pixel_error_bound") of the exact values. The official code
keeps every map in float64 (about 120 GB on Real-IAD).

Choices where the papers are silent:
- AU-PRO regions are the 8-connected components of each mask (as the MVTec AD evaluation code).
- Multi-class runs: every metric is computed per category and the top-level numbers are their
  mean, as the papers' "Average" rows; metrics.json also holds "per_category".
- `--drop-views K` (the IDIF paper's robustness table): K random views per sample are removed
  through the model's view_mask (deterministic per --seed, at least one view kept); metrics use
  the present views only, so a sample whose defect shows only in dropped views counts as normal.
- `--view-norm` (REFERENCE section 6, off by default): each camera's image scores are z-scored
  with the mean and std of that camera's image scores on the training split (per category)
  before the max over views, because one camera can score ten times higher than the others.

Shape legend: N maps, B samples, V views, H/W map size, S samples in a dataset.
"""
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # figures drawn straight to files: no pyplot, no backend state
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from idif import IDIF, IDIFConfig
from mvad import MVAD, MVADConfig
from patchcore import PatchCore, PatchCoreConfig

# name -> (config dataclass, model): every model has anomaly_map(images, view_mask) -> (B, V, H, W)
METHODS = {"mvad": (MVADConfig, MVAD), "idif": (IDIFConfig, IDIF), "patchcore": (PatchCoreConfig, PatchCore)}
LEVEL_KEYS = {"sample": ("auroc", "ap", "f1_max"), "image": ("auroc", "ap", "f1_max"),
              "pixel": ("auroc", "ap", "f1_max", "aupro")}

# ----------------------------------------------------------------------------- exact metrics


def _numpy(x) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _both_classes(labels: np.ndarray) -> bool:
    """True when the labels hold normal and anomalous entries; every metric needs both."""
    return bool(labels.any() and not labels.all())


def auroc(scores, labels) -> float:
    """Area under the ROC curve (scikit-learn; tied scores count one half).

    Args:
        scores: (N,) anomaly scores, higher = more anomalous.
        labels: (N,) 1/True = anomalous.
    Returns:
        AUROC in [0, 1]; NaN when the labels hold only one class.
    """
    scores, labels = _numpy(scores).ravel(), _numpy(labels).ravel() > 0
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else math.nan


def ap(scores, labels) -> float:
    """Average precision (scikit-learn): sum over thresholds of (R_n - R_{n-1}) P_n.

    Args:
        scores: (N,) anomaly scores.
        labels: (N,) 1/True = anomalous.
    Returns:
        AP in [0, 1]; NaN when the labels hold only one class.
    """
    scores, labels = _numpy(scores).ravel(), _numpy(labels).ravel() > 0
    return float(average_precision_score(labels, scores)) if _both_classes(labels) else math.nan


def f1_max(scores, labels) -> float:
    """Largest F1 = 2PR / (P + R) over every threshold of the exact precision-recall curve
    (each distinct score is a threshold; ADer samples 21 thresholds instead and reports less).

    Args:
        scores: (N,) anomaly scores.
        labels: (N,) 1/True = anomalous.
    Returns:
        F1-max in [0, 1]; NaN when the labels hold only one class.
    """
    scores, labels = _numpy(scores).ravel(), _numpy(labels).ravel() > 0
    if not _both_classes(labels):
        return math.nan
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    return float(f1.max())


def connected_components(mask) -> np.ndarray:
    """Labels the connected regions of binary masks, 8-connectivity (diagonal neighbours touch),
    as the MVTec AD evaluation code does; regions never cross from one mask to the next.

    Vectorised union-find: every foreground pixel starts as its own root; each round links the
    larger root of every edge whose ends have different roots to the smaller one, then pointer
    jumping makes every pixel point at its root. Each round at least halves the number of roots
    that still have an edge to another root, so P foreground pixels take O(log P) rounds.

    Args:
        mask: (..., H, W) bool or {0, 1}.
    Returns:
        (..., H, W) int64: 0 = background, 1..R = the regions in raster order over all masks.
    """
    mask = _numpy(mask) > 0
    m = mask.reshape(-1, *mask.shape[-2:])  # (N, H, W)
    node = np.cumsum(m.ravel()).reshape(m.shape) - 1  # (N, H, W) foreground pixel -> node id
    # The edges: each pixel with its right, lower, lower-right and lower-left neighbour.
    neighbour_pairs = [
        (np.s_[:, :, :-1], np.s_[:, :, 1:]),
        (np.s_[:, :-1, :], np.s_[:, 1:, :]),
        (np.s_[:, :-1, :-1], np.s_[:, 1:, 1:]),
        (np.s_[:, :-1, 1:], np.s_[:, 1:, :-1]),
    ]
    a, b = [], []
    for first, second in neighbour_pairs:
        both = m[first] & m[second]
        a.append(node[first][both])
        b.append(node[second][both])
    a, b = np.concatenate(a), np.concatenate(b)  # (E,), (E,)
    parent = np.arange(int(m.sum()))  # parent[i] <= i always, so the links never form a cycle
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(root_a, root_b)[differ], np.minimum(root_a, root_b)[differ])
        while True:  # pointer jumping until every node points at a root
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
    labels = np.zeros(m.size, dtype=np.int64)
    labels[m.ravel()] = np.unique(parent, return_inverse=True)[1] + 1
    return labels.reshape(mask.shape)


def _descending_cumsum(counts: np.ndarray) -> np.ndarray:
    """Counts per score bin in ascending score order -> totals at or above each bin, from the top
    bin down, with a leading 0 (the threshold above every score). (K,) -> (K + 1,)."""
    return np.concatenate([[0], np.cumsum(counts[::-1])])


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal area under the polyline (x, y) (np.trapezoid needs numpy >= 2)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the polyline (x, y) over [0, limit], interpolating y linearly at x = limit.

    Args:
        x: (K,) non-decreasing, x[0] = 0. y: (K,).
    """
    k = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    if k < len(x):
        t = (limit - x[k - 1]) / (x[k] - x[k - 1])
        x = np.append(x[:k], limit)
        y = np.append(y[:k], y[k - 1] + t * (y[k] - y[k - 1]))
    return _trapezoid(y, x)


def _pro_curve(normal: np.ndarray, overlap: np.ndarray, regions: int):
    """The PRO curve from per-threshold statistics.

    Args:
        normal: (K,) normal pixels per score bin, ascending score order.
        overlap: (K,) per bin, the sum over its anomalous pixels of 1 / (size of their region).
        regions: number of ground-truth regions.
    Returns:
        fpr, pro: (K + 1,) each, from the threshold above every score (0, 0) down to the lowest.
    """
    fpr = _descending_cumsum(normal) / normal.sum()
    pro = _descending_cumsum(overlap) / regions
    return fpr, np.minimum(pro, 1.0)  # float rounding must not lift the end past 1


def au_pro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve, exact (every distinct score is a threshold).

    For a threshold t: FPR(t) = share of all normal pixels (of every map) with score >= t;
    PRO(t) = mean over all ground-truth regions (8-connected components of each mask) of the
    share of the region's pixels with score >= t. The curve (FPR, PRO), linear between thresholds,
    is integrated over FPR in [0, fpr_limit] (interpolated at fpr_limit) and divided by fpr_limit.
    PRO(t) is a sum over anomalous pixels of 1 / (their region's size * regions), so one weighted
    count per threshold gives it.

    Args:
        maps: (N, H, W) anomaly scores.
        masks: (N, H, W) ground truth, 1/True = anomalous.
        fpr_limit: upper end of the FPR range, 0.3 as the field reports it.
    Returns:
        AU-PRO in [0, 1]; NaN when there is no anomalous region or no normal pixel.
    """
    maps, masks = _numpy(maps).astype(np.float64), _numpy(masks) > 0
    if not _both_classes(masks):
        return math.nan
    labels = connected_components(masks)[masks]  # (P,) region of each anomalous pixel
    values, bin_of = np.unique(maps, return_inverse=True)  # every distinct score is a threshold
    bin_of = bin_of.reshape(maps.shape)
    sizes = np.bincount(labels)
    normal = np.bincount(bin_of[~masks], minlength=len(values))
    overlap = np.bincount(bin_of[masks], weights=1.0 / sizes[labels], minlength=len(values))
    fpr, pro = _pro_curve(normal, overlap, len(sizes) - 1)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------- streaming pixel metrics


class PixelMetrics:
    """Pixel AUROC, AP, F1-max and AU-PRO over any number of maps in constant memory.

    State: three histograms over one grid of score bins: normal pixels, anomalous pixels, and
    per bin the sum over anomalous pixels of 1 / (size of their region) (the per-region overlap
    statistics: the sum of every region's normalised histogram, which is all that the PRO curve
    needs), the number of regions, and each bin's smallest and largest score (for the error
    bound). Memory: 5 x bins x 8 bytes (2.6 MB at 2^16 bins).

    The grid: bin k holds scores in [(offset + k) 2^e, (offset + k + 1) 2^e). The first update
    chooses the finest e at which its [min, max] fits into the bins; a later update with scores
    outside grows e and/or moves the offset, and merges the counts into the new bins. Bin edges
    are powers of two, so the new grid's edges are old edges and the merge is exact: the histograms
    always equal those of one pass over all the scores on the finest power-of-two grid that holds
    their whole range, whose bin width is below 2 (max - min) / (bins - 1). (Bin widths never go
    below max|score| * 2^-52, which keeps bin indices exact integers in float64.)

    The error bound (`error_bound()`): every histogram threshold (a bin's lower edge) is a point
    of the exact curve. Between two consecutive ones the exact curve is monotone, so it stays in
    the box that they span. Hence AUROC and AU-PRO differ from the exact values by at most the
    sum of the box areas (halved for AUROC, whose histogram curve takes the box's diagonal), AP by
    at most the sum over bins of recall gained x precision spread in the box, and F1-max by at most
    the largest F1 reachable in a box minus the histogram's F1-max. A bin whose pixels all share
    one score is exact (the exact metrics treat a tie as one threshold too), so its box counts
    zero. The bound is pessimistic where a bin mixes a large exact tie with other scores (it
    cannot see the tie). With 2^16 bins, on 2,000 smooth 256 x 256 maps with defects, it is 1e-5
    (AUROC) to 1e-4 (AP) and the actual differences are at most 4e-5; the project promises 1e-3.
    """

    def __init__(self, bins: int = 2**16, fpr_limit: float = 0.3):
        """
        Args:
            bins: number of score bins; memory and accuracy grow with it.
            fpr_limit: AU-PRO's upper FPR end.
        """
        self.bins, self.fpr_limit = bins, fpr_limit
        self.normal = np.zeros(bins, dtype=np.int64)  # normal pixels per bin
        self.anomalous = np.zeros(bins, dtype=np.int64)  # anomalous pixels per bin
        self.overlap = np.zeros(bins, dtype=np.float64)  # sum of 1 / region size per bin
        self.smallest = np.full(bins, math.inf)  # smallest score per bin
        self.largest = np.full(bins, -math.inf)  # largest score per bin
        self.regions = 0  # ground-truth regions seen
        self.exponent, self.offset = None, 0  # the grid: bin k = [(offset + k) 2^e, (offset + k + 1) 2^e)
        self.low, self.high = math.inf, -math.inf  # the smallest and largest score seen

    def _cover(self, low: float, high: float) -> None:
        """Grows the grid, merging the counts exactly, until [low, high] lies inside it."""
        low, high = min(low, self.low), max(high, self.high)
        exponent = math.frexp(max(abs(low), abs(high)))[1] - 52
        if self.exponent is not None:
            exponent = max(exponent, self.exponent)
        while math.floor(high / 2.0**exponent) - math.floor(low / 2.0**exponent) >= self.bins:
            exponent += 1
        offset = math.floor(low / 2.0**exponent)
        if self.exponent is not None and (exponent, offset) != (self.exponent, self.offset):
            # Old bin k lies inside new bin floor((old offset + k) / 2^shift) - new offset (the
            # clip only touches old bins beyond the data, which are empty).
            shift = exponent - self.exponent
            moved = np.clip(((self.offset + np.arange(self.bins)) >> shift) - offset, 0, self.bins - 1)
            for name, merge, empty in (("normal", np.add, 0), ("anomalous", np.add, 0),
                                       ("overlap", np.add, 0), ("smallest", np.minimum, math.inf),
                                       ("largest", np.maximum, -math.inf)):
                new = np.full_like(getattr(self, name), empty)
                merge.at(new, moved, getattr(self, name))
                setattr(self, name, new)
        self.exponent, self.offset, self.low, self.high = exponent, offset, low, high

    def update(self, maps, masks) -> None:
        """Adds maps and their ground truth.

        Args:
            maps: (..., H, W) anomaly scores (torch on any device, or numpy), finite.
            masks: (..., H, W) ground truth, same shape, 1/True = anomalous.
        """
        maps, masks = _numpy(maps).astype(np.float64), _numpy(masks) > 0
        if maps.shape != masks.shape:
            raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape")
        if maps.size == 0:
            return
        if not np.isfinite(maps).all():
            raise ValueError("anomaly maps contain NaN or infinite values")
        self._cover(float(maps.min()), float(maps.max()))
        index = (np.floor(maps * 2.0**-self.exponent) - self.offset).astype(np.int64)
        labels = connected_components(masks)[masks]  # (P,) region of each anomalous pixel
        sizes = np.bincount(labels, minlength=1)  # (regions + 1,) pixels per region, 0 = background
        self.normal += np.bincount(index[~masks], minlength=self.bins)
        self.anomalous += np.bincount(index[masks], minlength=self.bins)
        self.overlap += np.bincount(index[masks], weights=1.0 / sizes[labels], minlength=self.bins)
        self.regions += len(sizes) - 1
        np.minimum.at(self.smallest, index.ravel(), maps.ravel())
        np.maximum.at(self.largest, index.ravel(), maps.ravel())

    def _curves(self):
        """Cumulative counts at each threshold, from the top bin down (each (bins + 1,))."""
        tp, fp = _descending_cumsum(self.anomalous), _descending_cumsum(self.normal)
        return tp.astype(np.float64), fp.astype(np.float64)

    def _defined(self) -> bool:
        return self.normal.sum() > 0 and self.anomalous.sum() > 0

    def roc_curve(self):
        """Returns (fpr, tpr): the pixel ROC curve at the edges of the non-empty bins, for plots."""
        tp, fp = self._curves()
        keep = np.concatenate([[True], (self.normal + self.anomalous)[::-1] > 0])
        return fp[keep] / max(fp[-1], 1.0), tp[keep] / max(tp[-1], 1.0)

    def compute(self) -> dict:
        """Returns {"auroc", "ap", "f1_max", "aupro"}: NaN where the pixels seen so far hold only
        one class (AU-PRO: no region or no normal pixel)."""
        if not self._defined():
            return dict.fromkeys(("auroc", "ap", "f1_max", "aupro"), math.nan)
        tp, fp = self._curves()
        positives, negatives = tp[-1], fp[-1]
        precision = tp[1:] / np.maximum(tp[1:] + fp[1:], 1.0)
        fpr, pro = _pro_curve(self.normal, self.overlap, self.regions)
        return {
            "auroc": _trapezoid(tp / positives, fp / negatives),
            "ap": float(np.sum(np.diff(tp) / positives * precision)),
            "f1_max": float(np.max(2 * tp / (tp + fp + positives))),
            "aupro": _area_up_to(fpr, pro, self.fpr_limit) / self.fpr_limit,
        }

    def error_bound(self) -> dict:
        """Returns {"auroc", "ap", "f1_max", "aupro"}: the largest possible difference between
        `compute()` and the exact metrics over the same pixels (see the class docstring)."""
        if not self._defined():
            return dict.fromkeys(("auroc", "ap", "f1_max", "aupro"), math.nan)
        tp, fp = self._curves()
        positives, negatives = tp[-1], fp[-1]
        spread = (self.smallest < self.largest)[::-1]  # (bins,) bins holding more than one score
        tp_above, fp_above, tp_in, fp_in = tp[:-1], fp[:-1], tp[1:], fp[1:]  # each bin's box corners
        fp_best = np.where(spread, fp_above, fp_in)  # a tied bin has no point inside its box
        precision_high = tp_in / np.maximum(tp_in + fp_best, 1.0)
        precision_low = np.where(spread, tp_above / np.maximum(tp_above + fp_in, 1.0), precision_high)
        f1_high = 2 * tp_in / (tp_in + fp_best + positives)
        fpr, pro = _pro_curve(self.normal, self.overlap, self.regions)
        fpr_clipped = np.minimum(fpr, self.fpr_limit)
        return {
            "auroc": float(np.sum(spread * np.diff(fp) * np.diff(tp)) / (2 * negatives * positives)),
            "ap": float(np.sum(np.diff(tp) / positives * (precision_high - precision_low))),
            "f1_max": float(f1_high.max()) - self.compute()["f1_max"],
            "aupro": float(np.sum(spread * np.diff(fpr_clipped) * np.diff(pro))) / self.fpr_limit,
        }


# ----------------------------------------------------------------------------- scores per view and per sample


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image (view) score = max of its smoothed anomaly map, as the official code.
    (B, V, H, W) -> (B, V)."""
    return maps.amax(dim=(-2, -1))


def image_labels(masks: torch.Tensor) -> torch.Tensor:
    """Image (view) label = any anomalous pixel in its (resized) mask. (B, V, H, W) -> (B, V) bool."""
    return masks.flatten(2).gt(0).any(dim=-1)


def sample_scores(scores: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sample score = max over its present views. (B, V), view_mask (B, V) bool -> (B,)."""
    if view_mask is not None:
        scores = scores.masked_fill(~view_mask, -math.inf)
    return scores.amax(dim=1)


def sample_labels(labels: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sample label = any of its present views anomalous. (B, V) bool, view_mask (B, V) -> (B,)."""
    if view_mask is not None:
        labels = labels & view_mask
    return labels.any(dim=1)


def drop_views_mask(num_samples: int, num_views: int, k: int, seed: int) -> torch.Tensor:
    """Which views survive when k random views of every sample are removed.

    Args:
        num_samples: S; num_views: V; k: views to drop per sample, 0 <= k < V.
        seed: the draw depends only on (seed, S, V, k), not on batching or workers.
    Returns:
        (S, V) bool, True = present, V - k True per row.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(num_samples, num_views, generator=generator).argsort(dim=1)  # (S, V) a permutation per row
    return torch.ones(num_samples, num_views, dtype=torch.bool).scatter(1, order[:, :k], False)


def camera_statistics(model, dataset, device, batch_size: int = 8, workers: int = 0) -> dict:
    """Mean and std of each camera's image scores on the (normal) training split, per category,
    for --view-norm: score -> (score - mean) / std before the max over views.

    Returns:
        {category: (2, V) tensor, row 0 the means, row 1 the stds}.
    """
    scores = defaultdict(list)
    with torch.inference_mode():
        for batch in tqdm(DataLoader(dataset, batch_size=batch_size, num_workers=workers),
                          desc="camera statistics", leave=False):
            batch_scores = image_scores(model.anomaly_map(batch["images"].to(device))).float().cpu()  # (B, V)
            for category, row in zip(batch["category"], batch_scores):
                scores[category].append(row)
    stats = {}
    for category, rows in scores.items():
        rows = torch.stack(rows)  # (S, V)
        stats[category] = torch.stack([rows.mean(0), rows.std(0, correction=0).clamp_min(1e-12)])  # (2, V)
    return stats


# ----------------------------------------------------------------------------- the evaluation loop


def level_metrics(scores, labels) -> dict:
    """AUROC, AP and F1-max of one level's scores. (N,), (N,) -> {"auroc", "ap", "f1_max"}."""
    return {"auroc": auroc(scores, labels), "ap": ap(scores, labels), "f1_max": f1_max(scores, labels)}


def average(per_category: dict) -> dict:
    """The papers' "Average" row: the mean over categories of each level's metrics."""
    return {level: {key: float(np.mean([m[level][key] for m in per_category.values()])) for key in keys}
            for level, keys in LEVEL_KEYS.items()}


def example(batch: dict, i: int, images, maps, masks, view_mask, view_scores, label) -> dict:
    """What the picture of sample i of the batch needs, on the CPU: its views as RGB in [0, 1]
    (V, H, W, 3), maps and masks (V, H, W), view_mask and view scores (V,), its label."""
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    rgb = (images.cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)  # (V, H, W, 3)
    return {"sample_id": str(batch["sample_id"][i]), "category": str(batch["category"][i]),
            "images": rgb.numpy(), "maps": maps.numpy(), "masks": masks.numpy(),
            "present": view_mask.numpy(), "scores": view_scores.numpy(), "label": bool(label)}


def evaluate(model, dataset, device, drop_views: int = 0, batch_size: int = 8, workers: int = 0,
             seed: int = 0, view_stats: dict | None = None, num_figures: int = 4, bins: int = 2**16):
    """Streams the test split through the model once and computes every metric.

    Args:
        model: a model of METHODS in eval mode, on `device`.
        dataset: RealIAD-like test split (items: images (V, 3, H, W), masks (V, 1, H, W),
            label, sample_id, category).
        drop_views: views removed per sample (through the model's view_mask), 0 <= k < V.
        batch_size: samples per forward; workers: DataLoader processes.
        seed: seed of the dropped-view draw.
        view_stats: camera_statistics(...) to z-score the image scores per camera, or None.
        num_figures: samples (defective first) whose views, maps and masks are kept for pictures.
        bins: PixelMetrics histogram bins.
    Returns:
        metrics: {"sample", "image", "pixel"} (the mean over categories), "pixel_error_bound",
            and "per_category" when the split holds several categories.
        collected: {"levels": {category: {"sample": (scores, labels), "image": (scores, labels),
            "pixel_roc": (fpr, tpr)}}, "examples": [dict per kept sample]}.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    pixels = defaultdict(lambda: PixelMetrics(bins))  # one accumulator per category
    scores, labels, present = defaultdict(list), defaultdict(list), defaultdict(list)
    defective, normal = [], []  # the first samples of each kind, for the pictures
    view_masks, start = None, 0  # which views every sample keeps; index of the batch's first sample
    with torch.inference_mode():
        for batch in tqdm(loader, desc="evaluating", leave=False):
            images = batch["images"].to(device, non_blocking=True)  # (B, V, 3, H, W)
            B, V = images.shape[:2]
            if view_masks is None:  # V is known from the first batch on
                view_masks = drop_views_mask(len(dataset), V, drop_views, seed)  # (S, V)
            view_mask = view_masks[start:start + B]  # (B, V)
            start += B
            maps = model.anomaly_map(images, view_mask.to(device) if drop_views else None)
            maps = maps.float().cpu()  # (B, V, H, W)
            if not torch.isfinite(maps).all():
                raise data.UserError("the model produced NaN/inf anomaly maps: the checkpoint's training "
                                     "diverged; retrain with a lower --lr")
            masks = batch["masks"][:, :, 0] > 0.5  # (B, V, H, W)
            batch_scores, batch_labels = image_scores(maps), image_labels(masks)  # (B, V) each
            if view_stats is not None:
                stats = torch.stack([view_stats[c] for c in batch["category"]])  # (B, 2, V)
                batch_scores = (batch_scores - stats[:, 0]) / stats[:, 1]
            for category in set(batch["category"]):
                rows = torch.tensor([c == category for c in batch["category"]])  # (B,)
                pixels[category].update(maps[rows][view_mask[rows]], masks[rows][view_mask[rows]])  # (n, H, W)
                scores[category].append(batch_scores[rows])
                labels[category].append(batch_labels[rows])
                present[category].append(view_mask[rows])
            is_defective = sample_labels(batch_labels, view_mask)  # (B,)
            for i in range(B):
                kept = defective if is_defective[i] else normal
                if len(kept) < num_figures:
                    kept.append(example(batch, i, images[i], maps[i], masks[i], view_mask[i],
                                        batch_scores[i], is_defective[i]))

    per_category, bounds, levels = {}, {}, {}
    for category in sorted(pixels):
        s, y, m = torch.cat(scores[category]), torch.cat(labels[category]), torch.cat(present[category])
        levels[category] = {"sample": (sample_scores(s, m), sample_labels(y, m)), "image": (s[m], y[m]),
                            "pixel_roc": pixels[category].roc_curve()}
        per_category[category] = {"sample": level_metrics(*levels[category]["sample"]),
                                  "image": level_metrics(*levels[category]["image"]),
                                  "pixel": pixels[category].compute()}
        bounds[category] = pixels[category].error_bound()
    metrics = average(per_category)
    # |mean of a - mean of b| <= mean of |a - b|: the bound of the category mean is the mean bound
    metrics["pixel_error_bound"] = {k: float(np.mean([b[k] for b in bounds.values()])) for k in LEVEL_KEYS["pixel"]}
    if len(per_category) > 1:
        metrics["per_category"] = per_category
    return metrics, {"levels": levels, "examples": (defective + normal)[:num_figures]}


# ----------------------------------------------------------------------------- reports and pictures


def _percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def format_table(metrics: dict, name: str, markdown: bool = False) -> str:
    """The papers' table: one row per category (plus "Average" for several), AUROC/AP/F1-max per
    level in percent with one decimal, AU-PRO after the pixel F1-max.

    Args:
        metrics: evaluate()'s metrics. name: the row label of a single-category run.
        markdown: a Markdown table instead of aligned plain text.
    """
    header = ["Category", "Sample AUROC/AP/F1-max", "Image AUROC/AP/F1-max", "Pixel AUROC/AP/F1-max/AU-PRO"]
    rows = {**metrics.get("per_category", {}), ("Average" if "per_category" in metrics else name): metrics}
    table = [header] + [[category] + ["/".join(_percent(m[level][k]) for k in keys)
                                      for level, keys in LEVEL_KEYS.items()] for category, m in rows.items()]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join([lines[0], "|" + "---|" * len(header)] + lines[1:]) + "\n"
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table) + "\n"


def _json_ready(value):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def plot_example(ex: dict, path: Path) -> None:
    """One row of the sample's views: image, anomaly map overlaid (one colour scale for the
    sample), ground-truth contour in white; dropped views are greyed out."""
    V = len(ex["maps"])
    names = data.CAMERAS if V == len(data.CAMERAS) else [f"view {v + 1}" for v in range(V)]
    low, high = ex["maps"][ex["present"]].min(), ex["maps"][ex["present"]].max()
    fig = Figure(figsize=(2.4 * V, 2.9))
    for v, ax in enumerate(fig.subplots(1, V, squeeze=False)[0]):
        ax.imshow(ex["images"][v] * (1.0 if ex["present"][v] else 0.3))
        if ex["present"][v]:
            ax.imshow(ex["maps"][v], cmap="jet", alpha=0.45, vmin=low, vmax=max(high, low + 1e-12))
            if ex["masks"][v].any():
                ax.contour(ex["masks"][v], levels=[0.5], colors="white", linewidths=1.0)
            title = f"{names[v]}: {ex['scores'][v]:.3f}"
        else:
            title = f"{names[v]}: dropped"
        ax.set_title(title, fontsize=9, color="red" if ex["masks"][v].any() else "black")
        ax.axis("off")
    kind = "defective" if ex["label"] else "normal"
    fig.suptitle(f"{ex['sample_id']} ({ex['category']}, {kind}): camera: view score; "
                 "white contour = ground truth", fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def plot_roc(levels: dict, path: Path) -> None:
    """ROC curves at sample, image and pixel level, one line per category."""
    fig = Figure(figsize=(12, 4))
    for ax, level in zip(fig.subplots(1, 3), ("sample", "image", "pixel")):
        for category, curves in levels.items():
            if level == "pixel":
                fpr, tpr = curves["pixel_roc"]
            else:
                scores, labels = _numpy(curves[level][0]), _numpy(curves[level][1])
                fpr, tpr, _ = roc_curve(labels, scores) if _both_classes(labels) else ([0.0], [0.0], None)
            if fpr[-1] == 0 or tpr[-1] == 0:  # one class only: no curve
                continue
            ax.plot(fpr, tpr, lw=1.2, label=f"{category} ({100 * _trapezoid(tpr, fpr):.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"{level} ROC (AUROC %)", xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.01))
        if 0 < len(levels) <= 10:
            ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- checkpoint and data


def place(model: torch.nn.Module, device) -> torch.nn.Module:
    """Moves the model to `device`, on a CPU in the channels-last memory format, where oneDNN's
    convolutions are faster: a training step 2-3% faster for MVAD and 9-16% for IDIF on the 2-core
    machine of the README (bench/train.py measures both layouts). GPU runs keep the default layout,
    the one their README figures were measured with."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else model


def load_model(path: str):
    """Rebuilds the model of a train.py checkpoint: its method, its config with weights="none"
    (the frozen encoder's weights, calibrated or ImageNet, are in the state dict), its state dict.

    Returns:
        (model in eval mode on the CPU, the checkpoint dict).
    """
    if not Path(path).is_file():
        raise data.UserError(f"--checkpoint {path}: no such file; pass the last.pt that train.py wrote "
                             "(e.g. runs/idif_zipper/last.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises many different types
        raise data.UserError(f"--checkpoint {path}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                             "the file is damaged or of another kind, re-run train.py")
    if not isinstance(checkpoint, dict) or not {"method", "config", "model"} <= checkpoint.keys():
        raise data.UserError(f"--checkpoint {path}: not a train.py checkpoint (it needs the keys "
                             "method, config and model)")
    method = checkpoint["method"]
    if method not in METHODS:
        raise data.UserError(f"--checkpoint {path}: method {method!r} is unknown; eval.py evaluates "
                             f"{', '.join(METHODS)} runs written by train.py")
    config_class, model_class = METHODS[method]
    try:
        model = model_class(config_class(**{**checkpoint["config"], "weights": "none"}))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as e:  # unknown config fields, missing or misshapen weights
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise data.UserError(f"--checkpoint {path}: its config and weights do not fit a {method} model "
                             f"({reason}); was it written by another method or version?")
    return model.eval(), checkpoint


def find_data_root(data_root: str | None, run: dict, category: str) -> Path:
    """The folder holding the test split, by train.py's rule: --data-root, else the run's data
    root, else $REALIAD_ROOT or ./data/realiad, else the built-in synthetic dataset with the run's
    sizes (regenerated by data.synthetic_root if its cache is gone).

    Args:
        data_root: the --data-root flag or None. run: the checkpoint's "train" dict (train.py's
            config). category: the category to evaluate.
    """
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise data.UserError(f"--data-root {data_root}: no such folder; pass the Real-IAD folder")
        return Path(data_root)
    if run.get("data_root") is not None:
        if not Path(run["data_root"]).is_dir():
            raise data.UserError(f"the run's data root {run['data_root']} (from the checkpoint) does not "
                                 "exist here; pass --data-root with the Real-IAD folder")
        return Path(run["data_root"])
    found = data.default_real_iad()
    if found is not None:
        return found
    root = data.synthetic_root(category, n_train=run.get("synthetic_train", 40),
                               n_test_normal=run.get("synthetic_test", 30),
                               n_test_defect=run.get("synthetic_test", 30))
    print(f"no Real-IAD folder given: evaluating on the built-in synthetic dataset at {root}")
    return root


# ----------------------------------------------------------------------------- config and main


@dataclass
class EvalConfig:
    checkpoint: str  # a train.py checkpoint, e.g. runs/idif_zipper/last.pt
    data_root: str | None = None  # Real-IAD folder; None: the run's (synthetic data if it had none)
    category: str | None = None  # a category, a comma list or "all"; None: the run's
    out: str | None = None  # folder for metrics.json, metrics.md, the PNGs; None: the checkpoint's folder
    batch_size: int = 8  # samples (of V views each) per forward pass
    workers: int = 0  # DataLoader worker processes
    device: str | None = None  # None: cuda if available, else cpu
    drop_views: int = 0  # views removed at random from every sample (IDIF's robustness table); 0 = none
    view_norm: bool = False  # z-score image scores per camera with training-split statistics
    num_figures: int = 4  # test samples drawn with their maps (defective first)
    seed: int = 0  # seed of the --drop-views draw
    bins: int = 2**16  # PixelMetrics histogram bins: 2.6 MB per category, error bound <= ~1e-4


def main(cfg: EvalConfig) -> dict:
    """Evaluates a checkpoint on its test split; writes metrics.json, metrics.md, PNGs; prints the
    table; returns the metrics dict (as written to metrics.json, with NaN for undefined metrics)."""
    if cfg.batch_size < 1 or cfg.bins < 2 or cfg.num_figures < 0:
        raise data.UserError(f"--batch-size {cfg.batch_size}, --bins {cfg.bins}, --num-figures "
                             f"{cfg.num_figures}: need at least 1, 2 and 0")
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise data.UserError(f"--device {cfg.device}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise data.UserError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    model, checkpoint = load_model(cfg.checkpoint)
    model = place(model, device)
    run = checkpoint.get("train") or {}
    category = cfg.category or run.get("category")
    if category is None:
        raise data.UserError(f"--checkpoint {cfg.checkpoint} does not name its category; pass --category")
    root = find_data_root(cfg.data_root, run, category)
    image_size = checkpoint["config"]["image_size"]
    categories = category if category == "all" else category.split(",")
    test_set = data.RealIAD(root, categories, "test", image_size=image_size)
    if len(test_set) == 0:
        raise data.UserError(f"--data-root {root}: the test split of {category} is empty")
    V = test_set[0]["images"].shape[0]
    if not 0 <= cfg.drop_views < V:
        raise data.UserError(f"--drop-views {cfg.drop_views}: must be between 0 and {V - 1} "
                             f"(every sample keeps at least one of its {V} views)")
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.UserError(f"--out {out}: cannot create the folder ({e.strerror}); choose a writable one")

    view_stats = None
    if cfg.view_norm:
        train_set = data.RealIAD(root, categories, "train", image_size=image_size)
        view_stats = camera_statistics(model, train_set, device, cfg.batch_size, cfg.workers)
    metrics, collected = evaluate(model, test_set, device, drop_views=cfg.drop_views,
                                  batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
                                  view_stats=view_stats, num_figures=cfg.num_figures, bins=cfg.bins)
    metrics["settings"] = {
        "checkpoint": str(cfg.checkpoint), "method": checkpoint["method"], "epoch": checkpoint.get("epoch"),
        "data_root": str(root), "categories": sorted(collected["levels"]), "image_size": image_size,
        "samples": len(test_set), "views": V, "drop_views": cfg.drop_views, "view_norm": cfg.view_norm,
        "positive_samples": sum(int(curves["sample"][1].sum()) for curves in collected["levels"].values()),
        "images": sum(len(curves["image"][0]) for curves in collected["levels"].values()),
        "seed": cfg.seed, "pixel_bins": cfg.bins}

    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=1))
    title = (f"{checkpoint['method']} on {category}: {len(test_set)} test samples, drop_views "
             f"{cfg.drop_views}, view_norm {cfg.view_norm}")
    (out / "metrics.md").write_text(f"{title}\n\n{format_table(metrics, category, markdown=True)}")
    plot_roc(collected["levels"], out / "roc.png")
    for k, ex in enumerate(collected["examples"]):
        plot_example(ex, out / f"example_{k}_{re.sub(r'[^A-Za-z0-9_.-]', '_', ex['sample_id'])}.png")
    print(title)
    print(format_table(metrics, category), end="")
    print(f"wrote {out / 'metrics.json'}, metrics.md, roc.png and {len(collected['examples'])} example pictures")
    return metrics


def parse_args(argv=None) -> EvalConfig:
    p = data.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint, e.g. runs/idif_zipper/last.pt")
    d = EvalConfig(checkpoint="")
    p.add_argument("--data-root", default=d.data_root,
                   help="Real-IAD folder; None = the run's (the built-in synthetic data if it had none)")
    p.add_argument("--category", default=d.category, help="a category, a comma list or all; None = the run's")
    p.add_argument("--out", default=d.out, help="output folder; None = the checkpoint's folder")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per forward pass")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--device", default=d.device, help="None = cuda if available, else cpu")
    p.add_argument("--drop-views", type=int, default=d.drop_views,
                   help="remove K random views from every sample (at least one kept)")
    p.add_argument("--view-norm", action="store_true",
                   help="z-score image scores per camera with training-split statistics")
    p.add_argument("--num-figures", type=int, default=d.num_figures, help="test samples to draw")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the --drop-views draw")
    p.add_argument("--bins", type=int, default=d.bins, help="pixel-metric histogram bins")
    return EvalConfig(**vars(p.parse_args(argv)))


def cli(argv=None) -> int:
    """The command line: bad input ends in one line `error: ...` on stderr and exit status 2."""
    return data.run_cli(lambda args: main(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(cli())
