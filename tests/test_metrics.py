"""metrics.py against brute-force references written here, the streaming PixelMetrics against the
exact metrics, and metrics.py's place in the house (it imports no other file of the project)."""
import ast
import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics import (PixelMetrics, ap, au_pro, auroc, best_f1, connected_components, image_labels, image_scores,
                     sample_labels, sample_scores)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- test data and references


def random_maps(seed: int, n: int = 6, size: int = 16, levels: int | None = None):
    """n maps: the first without defects, the others with 1-3 rectangular defects each (they may
    touch and merge); scores = noise + a bump on the defects; `levels` quantises the scores to
    create many ties. Returns (maps, masks), (n, size, size) each."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 2, size=2)
            h, w = rng.integers(1, 5, size=2)
            masks[i, y:y + h, x:x + w] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.uniform(0.2, 1.5, size=(n, 1, 1))
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


def flood_fill_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of one (H, W) mask as boolean masks, by breadth-first search."""
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region = np.zeros_like(mask)
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def brute_force_curves(scores: np.ndarray, labels: np.ndarray):
    """Precision, recall and FPR at every threshold (distinct score, descending), one by one."""
    rows = []
    for t in np.unique(scores)[::-1]:
        predicted = scores >= t
        tp, fp = (predicted & labels).sum(), (predicted & ~labels).sum()
        rows.append((tp / (tp + fp), tp / labels.sum(), fp / (~labels).sum()))
    return np.array(rows).T


def brute_force_auroc(scores, labels):
    """P(anomalous score > normal score) + 0.5 P(equal), over all pairs."""
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def brute_force_ap(scores, labels):
    precision, recall, _ = brute_force_curves(scores, labels)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def brute_force_f1_max(scores, labels):
    precision, recall, _ = brute_force_curves(scores, labels)
    f1 = [2 * p * r / (p + r) if p + r > 0 else 0.0 for p, r in zip(precision, recall)]
    return max(f1)


def brute_force_au_pro(maps, masks, limit=0.3):
    """Sweeps every threshold, computes FPR and the mean region overlap from scratch, and
    integrates the polyline segment by segment up to `limit`."""
    regions = [r for mask in masks for r in flood_fill_regions(mask)]
    owners = [i for i, mask in enumerate(masks) for _ in flood_fill_regions(mask)]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & ~masks).sum() / (~masks).sum()
        pro = np.mean([predicted[i][r].mean() for i, r in zip(owners, regions)])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


# ----------------------------------------------------------------------------- exact metrics


@pytest.mark.parametrize("levels", [None, 4])
def test_image_metrics_match_brute_force(levels):
    maps, masks = random_maps(seed=1, n=12, size=8, levels=levels)
    scores, labels = maps.reshape(-1), masks.reshape(-1)
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)
    assert ap(scores, labels) == pytest.approx(brute_force_ap(scores, labels), abs=1e-12)
    assert best_f1(scores, labels)[0] == pytest.approx(brute_force_f1_max(scores, labels), abs=1e-12)


def test_f1_max_uses_every_threshold():
    # Best cut between 0.42 and 0.43: a 21-step grid (0.40, 0.45) misses it.
    scores = np.array([0.9, 0.43, 0.42, 0.41, 0.1])
    labels = np.array([1, 1, 0, 0, 0])
    assert best_f1(scores, labels) == pytest.approx((1.0, 0.43))  # F1-max and the score that reaches it
    assert best_f1(torch.tensor(scores), torch.tensor(labels)) == pytest.approx((1.0, 0.43))


def test_connected_components_match_flood_fill():
    _, masks = random_maps(seed=2, n=8, size=16)
    masks[0, 3, 3] = masks[0, 4, 4] = True  # diagonal neighbours are one region
    masks[0, 3, 4] = masks[0, 4, 3] = False
    labels = connected_components(masks)
    assert labels.shape == masks.shape and labels.dtype == np.int64
    assert labels[0, 3, 3] == labels[0, 4, 4] != 0
    expected = [r for mask in masks for r in flood_fill_regions(mask)]
    assert labels.max() == len(expected)
    found = sorted(tuple(np.flatnonzero(labels == k)) for k in range(1, labels.max() + 1))
    wanted = sorted(tuple(np.flatnonzero(np.stack([r if i == j else np.zeros_like(r) for j in range(len(masks))])))
                    for i, mask in enumerate(masks) for r in flood_fill_regions(mask))
    assert found == wanted
    assert (labels[~masks] == 0).all()


def test_connected_components_do_not_cross_maps():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 3, :] = True  # touches the first row of the next mask in memory
    masks[1, 0, :] = True
    labels = connected_components(masks)
    assert set(np.unique(labels[0])) == {0, 1} and set(np.unique(labels[1])) == {0, 2}


def test_connected_components_snake_and_empty():
    snake = np.zeros((9, 9), dtype=bool)
    snake[::2, :] = True
    snake[1::4, -1] = snake[3::4, 0] = True  # one long winding region
    assert connected_components(snake).max() == 1
    assert connected_components(np.zeros((3, 5, 5))).max() == 0


@pytest.mark.parametrize("seed,levels", [(3, None), (4, 3), (5, None)])
def test_au_pro_matches_brute_force(seed, levels):
    maps, masks = random_maps(seed=seed, n=6, size=16, levels=levels)
    assert len([r for m in masks for r in flood_fill_regions(m)]) >= 5  # several regions per image
    exact = au_pro(maps, masks)
    assert exact == pytest.approx(brute_force_au_pro(maps, masks), abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(brute_force_au_pro(maps, masks, 1.0), abs=1e-12)


def test_au_pro_known_values():
    maps, masks = random_maps(seed=6)
    assert au_pro(masks.astype(np.float32), masks) == pytest.approx(1.0)  # perfect maps
    # Constant maps: one threshold, the curve is the diagonal to (1, 1): area 0.3^2 / 2 / 0.3.
    assert au_pro(np.full(maps.shape, 0.7), masks) == pytest.approx(0.15)
    # Region-averaged, not pixel-averaged: a small region found and a large one missed give 0.5.
    maps2, masks2 = np.full((1, 10, 10), 0.5), np.zeros((1, 10, 10), dtype=bool)
    masks2[0, 0, 0] = masks2[0, 5:, 5:] = True
    maps2[0, 0, 0], maps2[0, 5:, 5:] = 1.0, 0.0
    assert au_pro(maps2, masks2) == pytest.approx(0.5)


def test_single_class_gives_nan():
    scores, normal = np.random.default_rng(0).random(20), np.zeros(20, dtype=bool)
    for metric in (auroc, ap, lambda s, y: best_f1(s, y)[0], lambda s, y: best_f1(s, y)[1]):
        assert math.isnan(metric(scores, normal)) and math.isnan(metric(scores, ~normal))
    assert math.isnan(au_pro(scores.reshape(1, 4, 5), normal.reshape(1, 4, 5)))
    metrics = PixelMetrics()
    assert all(math.isnan(v) for v in metrics.compute().values())  # nothing seen yet
    metrics.update(scores.reshape(1, 4, 5), normal.reshape(1, 4, 5))
    assert all(math.isnan(v) for v in metrics.compute().values())
    assert metrics.regions == 0


# ----------------------------------------------------------------------------- streaming PixelMetrics


def exact_pixel_metrics(maps, masks) -> dict:
    return {"auroc": auroc(maps, masks), "ap": ap(maps, masks), "f1_max": best_f1(maps, masks)[0],
            "aupro": au_pro(maps, masks)}


def test_pixel_metrics_match_exact_over_many_updates():
    parts = [random_maps(seed=10 + i, n=10, size=32, levels=levels)
             for i, levels in enumerate([None, 8, None, None])]
    parts[0] = (parts[0][0] * 0.01, parts[0][1])  # a narrow first range that later ones outgrow
    parts[2] = (parts[2][0] * 40 - 7, parts[2][1])
    parts[3] = (np.full_like(parts[3][0], 0.3), parts[3][1])  # constant maps
    metrics = PixelMetrics()
    for maps, masks in parts:
        metrics.update(torch.from_numpy(maps), torch.from_numpy(masks))
    maps, masks = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    exact, streamed, bound = exact_pixel_metrics(maps, masks), metrics.compute(), metrics.error_bound()
    for key in exact:
        assert abs(streamed[key] - exact[key]) <= bound[key] + 1e-12, key
        assert abs(streamed[key] - exact[key]) <= 1e-3, key


def smooth_maps(seed: int, n: int = 12, size: int = 64):
    """Maps like a model's: bilinearly upsampled noise (smooth, no exact ties) plus a bump on
    2-3 elliptical defects per map after the first. Returns (maps, masks), (n, size, size)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(size=(n, 1, size // 8, size // 8)))
    maps = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[:, 0].numpy()
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):
        for _ in range(rng.integers(2, 4)):
            cy, cx, ry, rx = rng.uniform(4, size - 4), rng.uniform(4, size - 4), *rng.uniform(2, 8, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return (0.3 * maps + 0.5 + masks * rng.uniform(0.1, 1.0, size=(n, 1, 1))).astype(np.float32), masks


def test_pixel_metrics_bound_is_small_on_smooth_maps():
    maps, masks = smooth_maps(seed=60)
    metrics = PixelMetrics()
    for i in range(0, len(maps), 4):
        metrics.update(maps[i:i + 4], masks[i:i + 4])
    exact, streamed, bound = exact_pixel_metrics(maps, masks), metrics.compute(), metrics.error_bound()
    for key in exact:
        assert abs(streamed[key] - exact[key]) <= bound[key] + 1e-12, key
        assert bound[key] <= 1e-3, key


def test_pixel_metrics_merge_is_exact():
    """Growing the grid over several updates gives the histograms of one update with everything."""
    parts = [random_maps(seed=20 + i, n=4, size=16) for i in range(3)]
    parts = [(maps * scale + shift, masks) for (maps, masks), scale, shift in zip(parts, [0.1, 3, 1], [0, -2, 5])]
    streamed, single = PixelMetrics(bins=1024), PixelMetrics(bins=1024)
    for maps, masks in parts:
        streamed.update(maps, masks)
    single.update(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert (streamed.exponent, streamed.offset) == (single.exponent, single.offset)
    np.testing.assert_array_equal(streamed.normal, single.normal)
    np.testing.assert_array_equal(streamed.anomalous, single.anomalous)
    np.testing.assert_allclose(streamed.overlap, single.overlap, rtol=1e-12)
    assert streamed.regions == single.regions > 10


def test_pixel_metrics_merge_of_shards_equals_one_pass():
    """Two processes' accumulators (strided shards whose score ranges differ, fed in different
    batches) merged into one: the same grid and counts as one pass over all the maps, hence the
    same metrics; merging an empty accumulator changes nothing, other bins are refused."""
    maps, masks = random_maps(seed=25, n=12, size=16)
    maps[1::2] = maps[1::2] * 4 + 3  # the second shard's scores reach far beyond the first's
    single, shards = PixelMetrics(bins=512), [PixelMetrics(bins=512), PixelMetrics(bins=512)]
    single.update(maps, masks)
    for rank, accumulator in enumerate(shards):
        for start in range(rank, len(maps), 4):  # two maps of the shard per update
            accumulator.update(maps[start:start + 3:2], masks[start:start + 3:2])
    merged, narrow = shards[0], shards[0].exponent
    merged.merge(shards[1])
    merged.merge(PixelMetrics(bins=512))
    assert (merged.exponent, merged.offset, merged.low, merged.high) == (single.exponent, single.offset,
                                                                           single.low, single.high)
    assert narrow < single.exponent  # the merge had to move the first shard to the joint grid
    for name in ("normal", "anomalous", "smallest", "largest"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(single, name), err_msg=name)
    np.testing.assert_allclose(merged.overlap, single.overlap, rtol=1e-12)
    assert merged.regions == single.regions > 10
    for key, value in single.compute().items():
        assert merged.compute()[key] == pytest.approx(value, abs=1e-12), key
    assert merged.f1_max_ader() == pytest.approx(single.f1_max_ader(), abs=1e-12)
    with pytest.raises(ValueError, match="cannot merge PixelMetrics with 64 bins"):
        merged.merge(PixelMetrics(bins=64))


def test_pixel_metrics_coarse_bins_stay_within_their_bound():
    maps, masks = random_maps(seed=30, n=20, size=16)
    exact = exact_pixel_metrics(maps, masks)
    for bins in (4, 16, 64):
        metrics = PixelMetrics(bins=bins)
        metrics.update(maps, masks)
        streamed, bound = metrics.compute(), metrics.error_bound()
        for key in exact:
            assert abs(streamed[key] - exact[key]) <= bound[key] + 1e-12, (bins, key)
    assert max(abs(streamed[k] - exact[k]) for k in exact) > 1e-4  # 64 bins are visibly coarse


def test_pixel_metrics_ties_and_constant_maps_are_exact():
    maps, masks = random_maps(seed=40, n=10, size=16, levels=2)
    metrics = PixelMetrics()
    metrics.update(maps, masks)
    exact = exact_pixel_metrics(maps, masks)
    for key, value in metrics.compute().items():
        assert value == pytest.approx(exact[key], abs=1e-12), key
    constant = PixelMetrics()
    constant.update(np.zeros_like(maps), masks)
    rate = masks.mean()
    assert constant.compute() == pytest.approx(
        {"auroc": 0.5, "ap": rate, "f1_max": 2 * rate / (1 + rate), "aupro": 0.15})


def ader_f1_max(maps, masks) -> float:
    """The official code's pixel F1-max, written as lewandofskee/MVAD util/metric.py computes it
    ("mF1_max_px"): maps min-max normalised together, F1 at `norm > s` for s in 0, 0.05, ..., 1,
    with its small epsilons."""
    norm, gt, eps = (maps - maps.min()) / (maps.max() - maps.min()), masks.astype(bool), 1e-8
    scores = []
    for s in np.arange(0.0, 1.0 + 1e-3, 0.05):
        predicted = norm > s
        hits = np.logical_and(gt, predicted).sum()
        precision, recall = hits / (predicted.sum() + eps), hits / (gt.sum() + eps)
        scores.append(2 * precision * recall / (precision + recall + eps))
    return float(max(scores))


@pytest.mark.parametrize("bins", [2**16, 256, 16])
def test_f1_max_ader_matches_the_official_code_within_its_bound(bins):
    """Streamed over updates that widen the score range; the 21 thresholds fall inside bins, whose
    straddled pixels are interpolated: within the bound it reports (0 where no bin is straddled),
    and never above the exact F1-max (ADer's thresholds are a subset of the exact curve's)."""
    maps, masks = smooth_maps(seed=70, n=9, size=32)
    maps[:3] *= 0.5  # the first update sees a narrower range than the later ones
    metrics = PixelMetrics(bins=bins)
    for i in range(0, len(maps), 3):
        metrics.update(maps[i:i + 3], masks[i:i + 3])
    value, bound = metrics.f1_max_ader()
    official = ader_f1_max(maps.astype(np.float64), masks)
    assert abs(value - official) <= bound + 1e-7, (value, official, bound)  # 1e-7: the official epsilons
    assert official <= best_f1(maps, masks)[0] + 1e-7
    assert bound < 1e-3 if bins == 2**16 else bound > 1e-3  # 16 bins are visibly coarse


def test_f1_max_ader_is_exact_on_ties_and_zero_on_constant_maps():
    maps, masks = random_maps(seed=71, n=10, size=16, levels=3)
    metrics = PixelMetrics()
    metrics.update(maps, masks)
    assert metrics.f1_max_ader() == pytest.approx((ader_f1_max(maps.astype(np.float64), masks), 0.0), abs=1e-7)
    constant = PixelMetrics()
    constant.update(np.ones_like(maps), masks)  # the official code divides by max - min = 0: no pixel is > s
    assert constant.f1_max_ader() == (0.0, 0.0)


def test_pixel_metrics_memory_is_fixed_and_inputs_checked():
    metrics = PixelMetrics(bins=256)
    maps, masks = random_maps(seed=50, n=30, size=32)
    for i in range(0, 30, 10):
        metrics.update(maps[i:i + 10], masks[i:i + 10])
        assert metrics.normal.shape == metrics.anomalous.shape == metrics.overlap.shape == (256,)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.update(np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))


# ----------------------------------------------------------------------------- aggregation


def test_image_and_sample_aggregation():
    maps = torch.zeros(2, 3, 4, 4)  # (B, V, H, W)
    maps[0, 1, 2, 2] = 0.9
    maps[0, 2, 0, 0] = 0.5
    maps[1, 0, 1, 1] = 0.2
    masks = torch.zeros(2, 3, 4, 4)
    masks[0, 1, 2, 2] = 1
    scores, labels = image_scores(maps), image_labels(masks)
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.9, 0.5], [0.2, 0.0, 0.0]]))
    assert labels.tolist() == [[False, True, False], [False, False, False]]
    torch.testing.assert_close(sample_scores(scores), torch.tensor([0.9, 0.2]))
    assert sample_labels(labels).tolist() == [True, False]
    present = torch.tensor([[True, False, True], [False, True, True]])  # drop the defective view
    torch.testing.assert_close(sample_scores(scores, present), torch.tensor([0.5, 0.0]))
    assert sample_labels(labels, present).tolist() == [False, False]


def test_metrics_py_imports_no_other_file_of_the_project():
    """The metric maths stand alone: numpy, torch and scikit-learn's curves, no evaluation loop, no
    training, no data and no model file (a reader of AU-PRO opens one file)."""
    tree = ast.parse((ROOT / "metrics.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"copy", "math", "numpy", "torch", "sklearn"}
