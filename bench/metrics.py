"""Pixel AUROC and AP: metrics.PixelMetrics (streaming histograms) against scikit-learn (exact, in memory).

    python bench/metrics.py [--quick] [--out bench/results] [--max-sklearn-gib 6]

Data: N = 200, 2,000, 20,000 (--quick: 40, 200; 20 would be half a chunk, and PixelMetrics' memory
is per chunk) random-but-realistic 256 x 256 anomaly maps: a smooth background with pixel noise, a few
false-positive bumps, and on half of the maps 1-3 elliptical defects whose mask is the ellipse and
whose score bump reaches past it (as a smoothed map does). They are generated in chunks of 40 maps
(eval.py's batch: 8 samples x 5 views), seeded per chunk, so both methods see the same pixels.
- PixelMetrics: `update(maps, masks)` per chunk, then `compute()` and `error_bound()`. Time: one pass
  over the N maps, generating the maps excluded. Memory: the rise of the peak resident size over the
  whole pass, i.e. one chunk of maps plus PixelMetrics' temporaries and histograms.
- scikit-learn: `roc_auc_score` and `average_precision_score` on all pixels flattened (float32 scores,
  bool labels); time: the two calls; memory: the flattened arrays plus scikit-learn's working memory.
  Run only where the flattened arrays fit --max-sklearn-gib (5 bytes per pixel).
Each case runs in a child process of its own. The maps are plain numpy on the CPU: both metrics run
on the CPU, and --device is only recorded. At the end, PixelMetrics' time and memory are extrapolated
linearly (least squares over the N measured) to the Real-IAD test set, 114,585 maps.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

import common  # before the project's modules: it puts the repository root on sys.path
from metrics import PixelMetrics

SIDE = 256  # map side in pixels (eval at 256 x 256)
CHUNK = 40  # maps per update: one eval.py batch of 8 samples x 5 views
REAL_IAD_TEST_MAPS = 114_585  # 22,917 test samples x 5 views


def make_chunk(index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `index` of the benchmark's maps: (n, SIDE, SIDE) float32 scores and bool masks."""
    rng = np.random.default_rng([2024, index])
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 9, 9)).astype(np.float32))
    maps = 0.15 + 0.03 * F.interpolate(coarse, size=(SIDE, SIDE), mode="bicubic", align_corners=True)[:, 0].numpy()
    maps += rng.normal(0.0, 0.005, size=maps.shape).astype(np.float32)  # sensor-like noise
    masks = np.zeros(maps.shape, dtype=bool)
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    for i in range(n):
        defects = rng.integers(1, 4) if rng.random() < 0.5 else 0
        for k in range(defects + rng.integers(0, 3)):  # the first `defects` bumps are real, the rest not
            cy, cx = rng.uniform(24, SIDE - 24, size=2)
            ry, rx = rng.uniform(4, 24, size=2)
            d2 = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2  # (SIDE, SIDE), 1 on the ellipse
            maps[i] += rng.uniform(0.05, 0.4) * np.exp(-d2 / 2)
            if k < defects:
                masks[i] |= d2 <= 1
    return maps, masks


def chunks(n: int):
    """The first n maps of the benchmark, CHUNK at a time."""
    for index, start in enumerate(range(0, n, CHUNK)):
        yield make_chunk(index, min(CHUNK, n - start))


def pixel_metrics_case(device, n: int) -> dict:
    """One streaming pass of PixelMetrics over n maps (one process per case)."""
    metrics, seconds = PixelMetrics(), 0.0
    with common.PeakMemory("cpu") as peak:
        for maps, masks in chunks(n):
            start = time.perf_counter()
            metrics.update(maps, masks)
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        values, bound = metrics.compute(), metrics.error_bound()
        seconds += time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak.bytes, "auroc": values["auroc"], "ap": values["ap"],
            "bound_auroc": bound["auroc"], "bound_ap": bound["ap"]}


def sklearn_case(device, n: int) -> dict:
    """scikit-learn's AUROC and AP on all n maps' pixels at once (one process per case)."""
    with common.PeakMemory("cpu") as peak:
        scores, labels = np.empty((n, SIDE, SIDE), np.float32), np.empty((n, SIDE, SIDE), bool)
        for start, (maps, masks) in zip(range(0, n, CHUNK), chunks(n)):
            scores[start:start + CHUNK], labels[start:start + CHUNK] = maps, masks
        scores, labels = scores.ravel(), labels.ravel()  # (n * SIDE^2,)
        start = time.perf_counter()
        auroc, ap = roc_auc_score(labels, scores), average_precision_score(labels, scores)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak.bytes, "auroc": float(auroc), "ap": float(ap)}


def main() -> None:
    p = common.arguments(__doc__)
    p.add_argument("--max-sklearn-gib", type=float, default=6.0,
                   help="run scikit-learn only where the flattened scores and labels fit (GiB)")
    args = common.parse(p)
    sizes = (40, 200) if args.quick else (200, 2000, 20000)  # at least one full chunk: memory is per chunk

    results = []
    for n in sizes:
        flat_gib = n * SIDE**2 * 5 / common.GIB  # float32 scores + bool labels
        result = {"maps": n, "pixels": n * SIDE**2, "flat_gib": flat_gib,
                  "pixel_metrics": common.run_isolated(pixel_metrics_case, "cpu", n=n)}
        if flat_gib <= args.max_sklearn_gib:
            result["sklearn"] = common.run_isolated(sklearn_case, "cpu", n=n)
        else:
            result["sklearn"] = {"skipped": f"does not fit: its flattened inputs need {flat_gib:.1f} GiB "
                                            f"> --max-sklearn-gib {args.max_sklearn_gib:g}"}
        results.append(result)

    rows = []
    for r in results:
        pm, sk = r["pixel_metrics"], r["sklearn"]
        row = [f"{r['maps']:,}", f"{r['pixels'] / 1e6:,.1f}", f"{pm['auroc']:.4f}", f"{pm['ap']:.4f}",
               f"{pm['seconds']:.2f}", f"{pm['peak_bytes'] / common.MIB:.0f}"]
        if "seconds" in sk:
            row += [f"{sk['seconds']:.2f}", f"{sk['peak_bytes'] / common.MIB:.0f}",
                    f"{abs(pm['auroc'] - sk['auroc']):.1e}", f"{pm['bound_auroc']:.1e}",
                    f"{abs(pm['ap'] - sk['ap']):.1e}", f"{pm['bound_ap']:.1e}"]
        else:
            row += [sk.get("skipped") or sk["error"], "", "", f"{pm['bound_auroc']:.1e}", "", f"{pm['bound_ap']:.1e}"]
        rows.append(row)
    common.print_table(
        f"Pixel AUROC and AP on {SIDE}x{SIDE} maps: metrics.PixelMetrics (2^16 bins, chunks of {CHUNK} maps) "
        "vs scikit-learn, CPU, one pass each",
        ["maps", "Mpixels", "AUROC", "AP", "PixelMetrics s", "PixelMetrics MiB", "sklearn s", "sklearn MiB",
         "|dAUROC|", "AUROC bound", "|dAP|", "AP bound"], rows)
    print("MiB: the rise of the child process's peak resident size (PixelMetrics: one chunk of maps in "
          "flight; sklearn: the flattened arrays too); bound: PixelMetrics.error_bound()")

    # linear extrapolation of the streaming pass to the Real-IAD test set
    n = np.array([r["maps"] for r in results], dtype=float)
    seconds = np.polyfit(n, [r["pixel_metrics"]["seconds"] for r in results], 1)
    peaks = [r["pixel_metrics"]["peak_bytes"] for r in results]
    memory = np.polyfit(n, peaks, 1)
    real_seconds = float(np.polyval(seconds, REAL_IAD_TEST_MAPS))
    real_bytes = float(np.polyval(memory, REAL_IAD_TEST_MAPS))
    measured = [r for r in results if "seconds" in r["sklearn"]]
    print(f"\nReal-IAD test set ({REAL_IAD_TEST_MAPS:,} maps of {SIDE}x{SIDE}), linear fit over N = "
          f"{', '.join(f'{int(k):,}' for k in n)}: PixelMetrics ~ {real_seconds / 60:.1f} min "
          f"({1e3 * seconds[0]:.2f} ms per map), peak memory ~ {real_bytes / common.MIB:,.0f} MiB "
          f"({memory[0]:,.0f} bytes per extra map; measured {min(peaks) / common.MIB:,.0f} to "
          f"{max(peaks) / common.MIB:,.0f} MiB)")
    real_flat = REAL_IAD_TEST_MAPS * SIDE**2 * 5 / common.GIB
    extrapolation = {"maps": REAL_IAD_TEST_MAPS, "pixel_metrics_seconds": real_seconds,
                     "pixel_metrics_peak_bytes": real_bytes, "sklearn_flat_gib": real_flat}
    if measured:
        per_pixel = measured[-1]["sklearn"]["peak_bytes"] / measured[-1]["pixels"]  # the largest N run
        extrapolation["sklearn_peak_gib"] = per_pixel * REAL_IAD_TEST_MAPS * SIDE**2 / common.GIB
        print(f"scikit-learn would hold {real_flat:,.0f} GiB of flattened inputs and peak at about "
              f"{extrapolation['sklearn_peak_gib']:,.0f} GiB ({per_pixel:.0f} bytes per pixel at N = "
              f"{measured[-1]['maps']:,})")
    common.write_json("metrics", args, {"sizes": results, "real_iad": extrapolation,
                                        "chunk_maps": CHUNK, "side": SIDE, "bins": PixelMetrics().bins})


if __name__ == "__main__":
    main()
