"""The metric maths of the evaluation: exact AUROC, AP, F1-max and AU-PRO, the streaming pixel
metrics, and the scores per view and per sample. No model, no data: numpy and torch (and
scikit-learn's exact ROC and precision-recall curves).

Each metric in one line (scores: higher = more anomalous; every metric is NaN when the labels hold
only one class):
  AUROC    the probability that a random anomalous item scores above a random normal one (a tie
           counts one half): the area under the ROC curve (true- over false-positive rate).
  AP       average precision: the sum over thresholds of (recall gained) x (precision there), the
           area under the exact precision-recall curve without interpolation.
  F1-max   the largest F1 = 2PR / (P + R) over every threshold (each distinct score is one).
  AU-PRO   per-region overlap: the mean over ground-truth regions of the share of the region
           called anomalous, integrated over the false-positive rate in [0, 0.3] and divided by
           0.3; regions are the 8-connected components of each mask (the papers are silent; as
           the MVTec AD evaluation code).
  F1-max (ADer)  the official MVAD code's pixel F1-max: maps min-max normalised per category, the
           21 thresholds 0, 0.05, ..., 1 (lewandofskee/MVAD util/metric.py); never above F1-max.

Levels, with the labels of the official MVAD code (lewandofskee/MVAD, data/ad_dataset.py,
trainer/mvad_trainer.py, util/metric.py): a *sample* is one object seen by V cameras, an *image* is
one view.
  image score  = max of the view's smoothed anomaly map      image label  = any pixel of its mask
  sample score = max over the sample's present views' scores  sample label = any present view whose
                                                                             JSON class is a defect
  pixel        = every pixel of every present view, against its mask (binarised > 0, resized
                 bilinearly, > 0.5: data.load_mask)

Memory: `PixelMetrics` folds any number of maps into fixed-size histograms, within a bound of the
exact values that it computes itself (1e-4 or less at 2^16 bins), and merges the accumulators of
several processes exactly.

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V; one anomaly map each), n items in a list (samples of a split, scores), H x W image.
"""
import copy
import math

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

LEVEL_KEYS = {"sample": ("auroc", "ap", "f1_max"), "image": ("auroc", "ap", "f1_max"),
              "pixel": ("auroc", "ap", "f1_max", "aupro", "f1_max_ader")}
# The official code's pixel F1-max thresholds on min-max normalised maps: 0, 0.05, ..., 1
# (lewandofskee/MVAD util/metric.py, "mF1_max_px": np.arange(0.0, 1.0 + 1e-3, 0.05), `norm > s`).
ADER_THRESHOLDS = np.arange(0.0, 1.0 + 1e-3, 0.05)

# ----------------------------------------------------------------------------- exact metrics


def _numpy(x) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _both_classes(labels: np.ndarray) -> bool:
    """True when the labels hold normal and anomalous entries; every metric needs both."""
    return bool(labels.any() and not labels.all())


def _flat(scores, labels) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores, labels > 0) as flat numpy arrays, (n,) each; None when the labels hold one class only."""
    scores, labels = _numpy(scores).ravel(), _numpy(labels).ravel() > 0
    return (scores, labels) if _both_classes(labels) else None


def auroc(scores, labels) -> float:
    """Area under the ROC curve (scikit-learn; tied scores count one half).

    Args:
        scores: (n,) anomaly scores, higher = more anomalous.
        labels: (n,) 1/True = anomalous.
    Returns:
        AUROC in [0, 1]; NaN when the labels hold only one class.
    """
    flat = _flat(scores, labels)
    return math.nan if flat is None else float(roc_auc_score(flat[1], flat[0]))


def ap(scores, labels) -> float:
    """Average precision (scikit-learn): sum over thresholds of (R_n - R_{n-1}) P_n.
    (n,) scores, (n,) labels -> AP in [0, 1]; NaN when the labels hold only one class."""
    flat = _flat(scores, labels)
    return math.nan if flat is None else float(average_precision_score(flat[1], flat[0]))


def best_f1(scores, labels) -> tuple[float, float]:
    """The largest F1 = 2PR / (P + R) over every threshold of the exact precision-recall curve
    (each distinct score is a threshold; ADer samples 21 thresholds instead and reports less), and
    the score at which it is reached (a score >= it is called anomalous: the decision threshold that
    `eval.py predict` applies), from one curve.

    Args:
        scores: (n,) anomaly scores.
        labels: (n,) 1/True = anomalous.
    Returns:
        (F1-max in [0, 1], its threshold); (NaN, NaN) when the labels hold only one class.
    """
    flat = _flat(scores, labels)
    if flat is None:
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(flat[1], flat[0])
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    return float(f1.max()), float(thresholds[np.argmax(f1[:-1])])  # the last point (recall 0) has no threshold


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve (scikit-learn), for plots: (fpr, tpr), ([0], [0]) with one class only."""
    flat = _flat(scores, labels)
    return ([0.0], [0.0]) if flat is None else roc_curve(flat[1], flat[0])[:2]


def connected_components(mask) -> np.ndarray:
    """Labels the connected regions of binary masks, 8-connectivity (diagonal neighbours touch),
    as the MVTec AD evaluation code does; regions never cross from one mask to the next.

    Vectorised union-find: every foreground pixel starts as its own root; each round links the
    larger root of every edge whose ends have different roots to the smaller one, then pointer
    jumping makes every pixel point at its root. Each round at least halves the number of roots
    that still have an edge to another root, so n foreground pixels take O(log n) rounds.

    Args:
        mask: (..., H, W) bool or {0, 1}.
    Returns:
        (..., H, W) int64: 0 = background, 1, 2, ... = the regions in raster order over all masks.
    """
    mask = _numpy(mask) > 0
    m = mask.reshape(-1, *mask.shape[-2:])  # (N, H, W)
    node = np.cumsum(m.ravel()).reshape(m.shape) - 1  # (N, H, W) foreground pixel -> node id
    parent = _union_find(int(m.sum()), *_foreground_edges(m, node))  # (n,) the root of every node
    labels = np.zeros(m.size, dtype=np.int64)
    labels[m.ravel()] = np.unique(parent, return_inverse=True)[1] + 1
    return labels.reshape(mask.shape)


def _foreground_edges(m: np.ndarray, node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8-connectivity edges between foreground pixels of masks m (N, H, W): each pixel with its
    right, lower, lower-right and lower-left neighbour, as the node ids of both ends, (edges,) each."""
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
    return np.concatenate(a), np.concatenate(b)


def _union_find(nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The root (smallest node id of its component) of each of `nodes` nodes joined by the edges (a, b)."""
    parent = np.arange(nodes)  # parent[i] <= i always, so the links never form a cycle
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(root_a, root_b)[differ], np.minimum(root_a, root_b)[differ])
        while True:  # pointer jumping until every node points at a root
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent


def _descending_cumsum(counts: np.ndarray) -> np.ndarray:
    """Counts per score bin in ascending score order -> totals at or above each bin, from the top
    bin down, with a leading 0 (the threshold above every score). (K,) -> (K + 1,)."""
    return np.concatenate([[0], np.cumsum(counts[::-1])])


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
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
    return trapezoid(y, x)


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
    """Pixel AUROC, AP, F1-max and AU-PRO (and the official code's F1-max, `f1_max_ader`) over any
    number of maps in constant memory.

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
    below max|score| * 2^-52, which keeps bin indices exact integers in float64.) For the same
    reason `merge` adds another accumulator's counts exactly: the processes of a distributed
    evaluation each fill one with their share of the maps, and rank 0 merges them.

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

    def merge(self, other: "PixelMetrics") -> None:
        """Adds the pixels another accumulator has seen (another process's share of the test split).

        Exact: the grid depends only on the smallest and largest score seen (the finest power-of-two
        grid that holds them), so once both cover the joint range they share one grid and their
        counts add up to those of one accumulator fed both shares. Only the float sums of `overlap`
        may differ in their last bits (the order of the additions).
        """
        if (other.bins, other.fpr_limit) != (self.bins, self.fpr_limit):
            raise ValueError(f"cannot merge PixelMetrics with {other.bins} bins and fpr_limit {other.fpr_limit} "
                             f"into one with {self.bins} and {self.fpr_limit}")
        if other.exponent is None:  # it has seen no pixel
            return
        other = copy.deepcopy(other)
        self._cover(other.low, other.high)
        other._cover(self.low, self.high)
        assert (self.exponent, self.offset) == (other.exponent, other.offset)
        self.normal += other.normal
        self.anomalous += other.anomalous
        self.overlap += other.overlap
        np.minimum(self.smallest, other.smallest, out=self.smallest)
        np.maximum(self.largest, other.largest, out=self.largest)
        self.regions += other.regions

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
            "auroc": trapezoid(tp / positives, fp / negatives),
            "ap": float(np.sum(np.diff(tp) / positives * precision)),
            "f1_max": float(np.max(2 * tp / (tp + fp + positives))),
            "aupro": _area_up_to(fpr, pro, self.fpr_limit) / self.fpr_limit,
        }

    def f1_max_ader(self) -> tuple[float, float]:
        """Pixel F1-max as the official MVAD code computes it, and how far this can be from it.

        The official code (lewandofskee/MVAD util/metric.py, "mF1_max_px", from ADer) min-max
        normalises all maps of a category together and calls a pixel anomalous when its normalised
        score is > s, for the 21 thresholds s = 0, 0.05, ..., 1. Here s is the score t = low + s
        (high - low) (the histograms keep the exact smallest and largest score). The bins above t's
        bin count fully, those below not at all; t's own bin counts fully when all its scores are
        > t, not at all when none is, and otherwise with the share of its range [smallest, largest]
        above t (linear interpolation). The bound takes such a straddled bin as all above or all
        below t; it is 0 when no threshold falls inside a bin's range. Up to float rounding at t.

        Returns:
            (F1-max, bound on its distance to the official value); (NaN, NaN) with one class only.
        """
        if not self._defined():
            return math.nan, math.nan
        t = self.low + ADER_THRESHOLDS * (self.high - self.low)  # (21,) the thresholds as scores
        k = np.clip(np.floor(t * 2.0**-self.exponent).astype(np.int64) - self.offset, 0, self.bins - 1)
        possible = self.largest[k] > t  # (21,) some of t's bin may lie above t (empty bins: none)
        certain = (possible & (self.smallest[k] > t)).astype(float)  # (21,) all of it lies above t
        possible = possible.astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):  # only straddled bins use the ratio
            linear = (self.largest[k] - t) / (self.largest[k] - self.smallest[k])
        shares = np.stack([certain, np.where(certain == possible, certain, linear), possible])  # (3, 21)
        tp_cum, fp_cum = np.cumsum(self.anomalous), np.cumsum(self.normal)  # ascending bins
        tp = tp_cum[-1] - tp_cum[k] + shares * self.anomalous[k]  # (3, 21) anomalous pixels > t
        fp = fp_cum[-1] - fp_cum[k] + shares[::-1] * self.normal[k]  # (3, 21) normal, fewest first
        f1 = (2 * tp / (tp + fp + tp_cum[-1])).max(axis=1)  # (3,) lowest, estimated, highest
        return float(f1[1]), float(max(f1[2] - f1[1], f1[1] - f1[0]))

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


def view_normalised(scores: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Image scores z-scored per camera (--view-norm): (score - the camera's mean) / its std.
    scores (..., V), stats (..., 2, V) (row 0 the means, row 1 the stds) -> (..., V)."""
    return (scores - stats[..., 0, :]) / stats[..., 1, :]


def level_metrics(scores, labels) -> tuple[dict, float]:
    """AUROC, AP and F1-max of one level's scores, and the F1-max threshold (`best_f1`).
    (n,), (n,) -> ({"auroc", "ap", "f1_max"}, threshold)."""
    f1, threshold = best_f1(scores, labels)
    return {"auroc": auroc(scores, labels), "ap": ap(scores, labels), "f1_max": f1}, threshold


def average(per_category: dict) -> dict:
    """The papers' "Average" row: the mean over categories of each level's metrics."""
    return {level: {key: float(np.mean([m[level][key] for m in per_category.values()])) for key in keys}
            for level, keys in LEVEL_KEYS.items()}
