"""Evaluate a trained MVAD, IDIF, UniAD or SimpleNet run, or a fitted PatchCore, at sample, image and pixel
level, in bounded memory; apply it to new images.

Prints a table in the papers' format and writes metrics.json, metrics.md and pictures (PNG).

    python eval.py --checkpoint runs/idif_zipper/last.pt
    python eval.py --checkpoint runs/mvad_all/last.pt --data-root /data/Real-IAD --drop-views 2
    torchrun --nproc_per_node=4 eval.py --checkpoint runs/mvad_all/last.pt --data-root /data/Real-IAD
    python eval.py --checkpoint runs/idif_zipper/last.pt --export-adeval runs/idif_zipper/adeval.pkl
    python eval.py predict --run runs/idif_zipper --images my_photos/ --out predictions/

The levels (sample, image, pixel) and the metrics (AUROC, AP, F1-max, AU-PRO, the official code's
pixel F1-max) are defined in metrics.py, which computes them. All metrics are NaN when the labels hold
only one class (null in metrics.json, "-" in tables). Memory: maps are never kept; `PixelMetrics`
folds each batch into fixed-size histograms ("pixel_error_bound" in metrics.json, 1e-4 or less).

Several processes (torchrun, or train.py's DDP run): each evaluates its shard of the test split
(runtime.shard) and rank 0 merges them (`merge_shards`) into exactly what one process computes,
and alone reports.

Real-IAD's own scorer, ADEval (PyPI `adeval`), bins its curves (1,000 strips) and labels samples
by their masks; `--export-adeval FILE` writes its input for the test split and the command that
scores it (metrics.md), so both can be put side by side (README, "Comparing with the papers").

Choices where the papers are silent:
- Multi-class runs: every metric is computed per category and the top-level numbers are their
  mean, as the papers' "Average" rows; metrics.json also holds "per_category".
- `--drop-views K` (the IDIF paper's robustness table): K random views per sample are removed
  through the model's view_mask (deterministic per --seed, at least one view kept); metrics use
  the present views only, so a sample whose defect shows only in dropped views counts as normal.
- `--view-norm` (off by default): each camera's image scores are z-scored with the mean and std
  of that camera's image scores on the training split (per category) before the max over views.
- Decision thresholds for `predict`: the test split's F1-max thresholds (sample and image level).
- Runs whose settings are not the papers' say so in one line, with the papers' command.

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V; one anomaly map each), n items in a list (samples of a split, scores), C channels,
H x W image, h x w feature map, S scales, m heads, d = C / m channels per head, T tokens per attention
unit (an MVAS window; an IDIF view). Here n_c: the samples of one category.
"""
import dataclasses
import json
import math
import os
import pickle
import re
import shlex
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.figure import Figure  # figures drawn straight to files: no pyplot, no backend state
from PIL import Image
from tqdm import tqdm

import data
import synthetic
from metrics import (LEVEL_KEYS, PixelMetrics, average, image_labels, image_scores, level_metrics, roc_points,
                     sample_labels, sample_scores, trapezoid, view_normalised)
from mvad import read_torch_file
from runtime import (METHODS, PRECISIONS, accelerate, distributed_context, distributed_run, gather, place,
                     process_group, resolve_device, resolve_precision, setup_process, sharded_loader)

# ----------------------------------------------------------------------------- dropped views and camera statistics


def drop_views_mask(num_samples: int, num_views: int, k: int, seed: int) -> torch.Tensor:
    """Which views survive when k random views of every sample are removed.

    Args:
        num_samples: n; num_views: V; k: views to drop per sample, 0 <= k < V.
        seed: the draw depends only on (seed, n, V, k), not on batching or workers.
    Returns:
        (n, V) bool, True = present, V - k True per row.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(num_samples, num_views, generator=generator).argsort(dim=1)  # (n, V) a permutation per row
    return torch.ones(num_samples, num_views, dtype=torch.bool).scatter(1, order[:, :k], False)


def camera_statistics(model, dataset, device, batch_size: int = 8, workers: int = 0, drop_views: int = 0,
                      seed: int = 0) -> dict:
    """Mean and std of each camera's image scores on the (normal) training split, per category,
    for --view-norm: score -> (score - mean) / std before the max over views. With several
    processes each scores its shard of the split and every process receives all the scores, in
    sample order, so every process holds the statistics that one process would compute.
    With drop_views K, every training sample loses K views as `evaluate` draws them (`drop_views_mask`
    with `seed`) and each camera's statistics come from the samples that keep it: the scores a
    camera gives when K views are missing, for an evaluation with K views removed.

    Returns:
        {category: (2, V) tensor, row 0 the means, row 1 the stds}.
    """
    loader, indices, rank = sharded_loader(dataset, batch_size, workers, device)
    view_masks = drop_views_mask(len(dataset), dataset[0]["images"].shape[0], drop_views, seed)[indices]  # (n_shard, V)
    categories, rows = [], []
    with torch.inference_mode():
        for batch, view_mask in tqdm(zip(loader, view_masks.split(batch_size)), desc="camera statistics",
                                     leave=False, disable=rank != 0):
            maps = model.anomaly_map(batch["images"].to(device), view_mask.to(device) if drop_views else None,
                                     **synthetic.routing_inputs(batch, device))
            rows += torch.where(view_mask, image_scores(maps).float().cpu(), torch.nan).tolist()  # B x V, NaN: dropped
            categories += batch["category"]
    scores = defaultdict(dict)  # category -> {sample index: V image scores}
    for part in gather(list(zip(indices, categories, rows)), everywhere=True):
        for index, category, row in part:
            scores[category][index] = row
    stats = {}
    for category, by_index in scores.items():
        rows = torch.tensor([by_index[i] for i in sorted(by_index)])  # (n, V) in sample order
        mean = rows.nanmean(0)  # (V,) over the samples that keep each camera
        std = (rows - mean).pow(2).nanmean(0).sqrt()  # the population std, as rows.std(0, correction=0)
        stats[category] = torch.stack([mean, std.clamp_min(1e-12)])  # (2, V)
    return stats


# ----------------------------------------------------------------------------- the evaluation loop


def example(batch: dict, i: int, images, maps, masks, view_mask, view_scores, label) -> dict:
    """What the picture of sample i of the batch needs, on the CPU: its views as RGB in [0, 1]
    (V, H, W, 3), maps and masks (V, H, W), view_mask and view scores (V,), its label."""
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    rgb = (images.cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)  # (V, H, W, 3)
    return {"sample_id": str(batch["sample_id"][i]), "category": str(batch["category"][i]),
            "images": rgb.numpy(), "maps": maps.numpy(), "masks": masks.numpy(),
            "present": view_mask.numpy(), "scores": view_scores.numpy(), "label": bool(label)}


def evaluate(model, dataset, device, drop_views: int = 0, batch_size: int = 8, workers: int = 0,
             seed: int = 0, view_stats: dict | None = None, num_figures: int = 4, bins: int = 2**16,
             export: "ADEvalExport | None" = None):
    """Streams the test split through the model once and computes every metric.

    With several processes (a torch.distributed group: torchrun, or train.py's DDP) each process
    streams its shard of the split (`shard`), and rank 0 gathers the shards and merges them into
    what one process would have computed (`merge_shards`): the same metrics, pictures and export.

    Args:
        model: a model of METHODS in eval mode, on `device`.
        dataset: RealIAD-like test split (items: images (V, 3, H, W), masks (V, 1, H, W),
            view_classes (V,), sample_id, category; with `export` also paths and mask_paths).
        drop_views: views removed per sample (through the model's view_mask), 0 <= k < V.
        batch_size: samples per forward (per process); workers: DataLoader processes.
        seed: seed of the dropped-view draw (one draw for the whole split, whatever the processes).
        view_stats: camera_statistics(...) to z-score the image scores per camera, or None.
        num_figures: samples (defective first) whose views, maps and masks are kept for pictures.
        bins: PixelMetrics histogram bins.
        export: an ADEvalExport that receives every batch's maps and scores and writes its last
            files at the end, or None.
    Returns:
        metrics: {"sample", "image", "pixel"} (the mean over categories), "pixel_error_bound",
            and "per_category" when the split holds several categories.
        collected: {"levels": {category: {"sample": (scores, labels), "image": (scores, labels),
            "pixel_roc": (fpr, tpr)}}, "decision": {category: {"sample_threshold",
            "image_threshold", "map_range"}}, "examples": [dict per kept sample]}.
        Both None on every process but rank 0.
    """
    loader, indices, rank = sharded_loader(dataset, batch_size, workers, device)
    collected, view_masks, start = ShardResults(bins, num_figures), None, 0  # start: the batch's place in the shard
    with torch.inference_mode():
        for batch in tqdm(loader, desc="evaluating", leave=False, disable=rank != 0):
            B, V = batch["images"].shape[:2]
            if view_masks is None:  # V is known from the first batch on; one draw for the whole split
                view_masks = drop_views_mask(len(dataset), V, drop_views, seed)  # (n, V)
            index = torch.tensor(indices[start:start + B])  # (B,) the samples' places in the split
            view_mask, start = view_masks[index], start + B  # (B, V)
            scored = score_batch(model, batch, device, view_mask if drop_views else None, view_stats)
            collected.add(batch, index, view_mask, scored)
            if export is not None:
                export.add(batch, scored["maps"], scored["scores"], view_mask)
    if export is not None:
        export.flush()  # the categories left, in every process before the gather below (same order)
    shards = gather(collected.shard())
    if shards is None:
        return None, None
    pixels, rows, examples = merge_shards(shards, num_figures)
    metrics, levels, decision = summarise(pixels, rows)
    return metrics, {"levels": levels, "decision": decision, "examples": examples}


def score_batch(model, batch: dict, device, view_mask: torch.Tensor | None, view_stats: dict | None) -> dict:
    """One batch through the model: {"images" (B, V, 3, H, W) on `device`, "maps" (B, V, H, W) float32
    on the CPU, "masks" (B, V, H, W) bool, "classes" (B, V) the JSON classes (which give the sample
    labels), "scores" (B, V) image scores (z-scored per camera with view_stats), "labels" (B, V)}."""
    images = batch["images"].to(device, non_blocking=True)  # (B, V, 3, H, W)
    maps = model.anomaly_map(images, None if view_mask is None else view_mask.to(device),
                             **synthetic.routing_inputs(batch, device))
    maps = maps.float().cpu()  # (B, V, H, W)
    if not torch.isfinite(maps).all():
        raise data.UserError("the model produced NaN/inf anomaly maps: the checkpoint's training "
                             "diverged; retrain with a lower --lr")
    masks = batch["masks"][:, :, 0] > 0.5  # (B, V, H, W)
    scores = image_scores(maps)  # (B, V)
    if view_stats is not None:
        scores = view_normalised(scores, torch.stack([view_stats[c] for c in batch["category"]]))  # (B, V)
    return {"images": images, "maps": maps, "masks": masks, "classes": batch["view_classes"] > 0,
            "scores": scores, "labels": image_labels(masks)}


class ShardResults:
    """What one process collects from its shard of the test split: per category a PixelMetrics and
    the rows of its samples (index: place in the split (n,); scores, labels, classes, present:
    (n, V)), and the first num_figures defective and normal samples for the pictures."""

    def __init__(self, bins: int, num_figures: int):
        self.pixels = defaultdict(lambda: PixelMetrics(bins))  # one accumulator per category
        self.rows = defaultdict(lambda: defaultdict(list))  # category -> name -> list of (b,) or (b, V)
        self.defective, self.normal, self.num_figures = [], [], num_figures

    def add(self, batch: dict, index: torch.Tensor, view_mask: torch.Tensor, scored: dict) -> None:
        """One batch: index (B,) its samples' places in the split, view_mask (B, V), score_batch's dict."""
        maps, masks = scored["maps"], scored["masks"]
        for category in set(batch["category"]):
            rows = torch.tensor([c == category for c in batch["category"]])  # (B,)
            self.pixels[category].update(maps[rows][view_mask[rows]], masks[rows][view_mask[rows]])  # (N, H, W)
            for name, value in (("index", index), ("scores", scored["scores"]), ("labels", scored["labels"]),
                                ("classes", scored["classes"]), ("present", view_mask)):
                self.rows[category][name].append(value[rows])
        is_defective = sample_labels(scored["classes"], view_mask)  # (B,)
        for i in range(len(index)):
            kept = self.defective if is_defective[i] else self.normal
            if len(kept) < self.num_figures:
                kept.append({**example(batch, i, scored["images"][i], maps[i], masks[i], view_mask[i],
                                       scored["scores"][i], is_defective[i]), "index": int(index[i])})

    def shard(self) -> dict:
        """What `merge_shards` takes from this process."""
        return {"pixels": dict(self.pixels), "examples": self.defective + self.normal,
                "rows": {c: {k: torch.cat(v) for k, v in columns.items()} for c, columns in self.rows.items()}}


def merge_shards(shards: list[dict], num_figures: int) -> tuple[dict, dict, list]:
    """The processes' shards of an evaluation, merged into what one process would have collected.

    Args:
        shards: per process {"pixels": {category: PixelMetrics}, "rows": {category: {"index": (n,)
            places in the split, "scores", "labels", "classes", "present": (n, V)}}, "examples":
            [example dicts with their "index"]}.
        num_figures: pictures to keep.
    Returns:
        pixels: {category: PixelMetrics}, merged (exact, PixelMetrics.merge).
        rows: {category: {"scores", "labels", "classes", "present": (n_c, V)}}, in sample order.
        examples: the first `num_figures` defective samples in split order, then the first normal ones.
    """
    pixels, columns = {}, defaultdict(lambda: defaultdict(list))
    for part in shards:
        for category, accumulator in part["pixels"].items():
            if category in pixels:
                pixels[category].merge(accumulator)
            else:
                pixels[category] = accumulator
        for category, values in part["rows"].items():
            for name, value in values.items():
                columns[category][name].append(value)
    rows = {}
    for category, values in columns.items():
        order = torch.cat(values.pop("index")).argsort()  # (n_c,) back into the split's order
        rows[category] = {name: torch.cat(parts)[order] for name, parts in values.items()}
    examples = sorted((ex for part in shards for ex in part["examples"]), key=lambda ex: ex["index"])
    defective, normal = [ex for ex in examples if ex["label"]], [ex for ex in examples if not ex["label"]]
    return pixels, rows, (defective[:num_figures] + normal[:num_figures])[:num_figures]


def summarise(pixels: dict, gathered: dict) -> tuple[dict, dict, dict]:
    """Every category's metrics and their mean, the curves to plot and `predict`'s thresholds.

    Args:
        pixels: {category: PixelMetrics}. gathered: {category: {"scores", "labels", "classes",
            "present": (n_c, V) tensors}} (image scores, image labels, JSON classes, views kept).
    Returns:
        (metrics, levels, decision) as in evaluate().
    """
    per_category, bounds, levels, decision = {}, {}, {}, {}
    for category in sorted(pixels):
        s, y, c, m = (gathered[category][k] for k in ("scores", "labels", "classes", "present"))
        sample, image = (sample_scores(s, m), sample_labels(c, m)), (s[m], y[m])
        f1_ader, f1_ader_bound = pixels[category].f1_max_ader()
        # with views removed, "sample" labels a sample by the views left (its defect may be in a removed
        # view); "sample_all_views" by all its views, as the data set labels it
        levels[category] = {"sample": sample, "image": image, "pixel_roc": pixels[category].roc_curve(),
                            "sample_all_views": (sample[0], sample_labels(c))}
        sample_metrics, sample_threshold = level_metrics(*sample)
        image_metrics, image_threshold = level_metrics(*image)
        per_category[category] = {"sample": sample_metrics, "image": image_metrics,
                                  "pixel": {**pixels[category].compute(), "f1_max_ader": f1_ader}}
        bounds[category] = {**pixels[category].error_bound(), "f1_max_ader": f1_ader_bound}
        decision[category] = {"sample_threshold": sample_threshold, "image_threshold": image_threshold,
                              "map_range": [pixels[category].low, pixels[category].high]}
    metrics = average(per_category)
    # |mean of a - mean of b| <= mean of |a - b|: the bound of the category mean is the mean bound
    metrics["pixel_error_bound"] = {k: float(np.mean([b[k] for b in bounds.values()])) for k in LEVEL_KEYS["pixel"]}
    if len(per_category) > 1:
        metrics["per_category"] = per_category
    return metrics, levels, decision


# ----------------------------------------------------------------------------- Real-IAD's scorer, ADEval

# ADEval's sample key for Real-IAD (the one group: everything before `_C<n>_`), as Real-IAD's README
# gives it (github.com/Tencent/AnomalyDetection_Real-IAD); data.SAMPLE_KEY also captures the camera.
ADEVAL_SAMPLE_KEY = r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_"
# ADEval 1.1.0 calls numpy.trapz, which NumPy 2.4 removed (renamed numpy.trapezoid in NumPy 2.0):
# with such a NumPy the command sets the old name first and then runs ADEval's command line.
ADEVAL_WITH_NEW_NUMPY = ('import numpy, runpy; numpy.trapz = numpy.trapezoid; '
                         'runpy.run_module("adeval", run_name="__main__")')


def adeval_argv(pickle_path, views: int, image_size: int) -> list[str]:
    """The command line that scores an exported pickle with ADEval: views grouped into samples by
    their sample key, `views` per sample, at the model's resolution (`--evaluate_size`, as the official
    MVAD evaluation; without it ADEval scores at each image's own size, as Real-IAD's README does)."""
    start = ["python", "-m", "adeval"] if hasattr(np, "trapz") else ["python", "-c", ADEVAL_WITH_NEW_NUMPY]
    return start + [str(pickle_path), "--sample_key_pat", ADEVAL_SAMPLE_KEY,
                    "--expected_views_per_sample", str(views), "--evaluate_size", str(image_size)]


def framed(anomaly_map: np.ndarray, image_path: str) -> np.ndarray:
    """The map laid over the whole image, for ADEval, which resizes it to the image: our map covers
    the centred square crop the model saw (data.resize_crop); a non-square image gets a frame of its
    shape at the map's scale, filled with the map's smallest score (pixels the model never saw).
    (H, W) square -> (H', W') with H' / W' = the image's aspect."""
    with Image.open(image_path) as image:
        width, height = image.size
    side = anomaly_map.shape[0]
    if width == height:
        return anomaly_map
    short = min(height, width)
    rows, cols = max(side, round(height * side / short)), max(side, round(width * side / short))
    top, left = (rows - side) // 2, (cols - side) // 2
    frame = np.full((rows, cols), anomaly_map.min(), dtype=anomaly_map.dtype)
    frame[top:top + side, left:left + side] = anomaly_map
    return frame


class ADEvalExport:
    """Writes what Real-IAD's official scorer ADEval reads: a pickle of {image path: (anomaly map
    (H, W) float32, image score, mask path or None)} with the present views of the test split, one
    file per category (Real-IAD's README scores one file per object), its entries in path order.
    The test split is ordered by category, so each category's file is written when the next one
    starts: memory holds one category's maps (Real-IAD at 256 px: about 1 GB). With several
    processes every process goes through all the categories in order, and rank 0 gathers each
    category's entries from all of them and alone writes its file.
    """

    def __init__(self, path: Path, categories: list[str]):
        """
        Args:
            path: the file for a single category; with several, `<stem>_<category><suffix>` beside it.
            categories: the categories of the split, in its order.
        """
        self.path, self.several = Path(path), len(categories) > 1
        self.waiting = list(categories)  # categories not written yet; the entries are the first one's
        self.entries, self.written = {}, []

    def add(self, batch: dict, maps: torch.Tensor, scores: torch.Tensor, view_mask: torch.Tensor) -> None:
        """One batch: maps (B, V, H, W), image scores (B, V) as evaluated, view_mask (B, V)."""
        for i, category in enumerate(batch["category"]):
            if category not in self.waiting:
                raise ValueError(f"ADEvalExport: {category!r} met again after other categories or unknown; "
                                 "the split must be ordered by category")
            while self.waiting[0] != category:
                self._write(self.waiting.pop(0))
            for v in torch.nonzero(view_mask[i]).flatten().tolist():
                image, mask = batch["paths"][v][i], batch["mask_paths"][v][i]
                entry = (framed(maps[i, v].numpy(), image), float(scores[i, v]),
                         str(Path(mask).resolve()) if mask else None)
                self.entries[str(Path(image).resolve())] = entry

    def flush(self) -> None:
        """Writes the categories not written yet (after the last batch; on every process)."""
        while self.waiting:
            self._write(self.waiting.pop(0))

    def _write(self, category: str) -> None:
        """Writes one category's file (atomically) from the entries of every process, and empties them."""
        shards = gather(self.entries)
        self.entries = {}
        if shards is None:  # not rank 0
            return
        entries = dict(sorted((entry for part in shards for entry in part.items()), key=lambda entry: entry[0]))
        if not entries:
            return
        path = self.path
        if self.several:
            path = path.with_name(f"{path.stem}_{category}{path.suffix}")
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(entries, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
        self.written.append(path)


# ----------------------------------------------------------------------------- reports and pictures


def file_name(text: str) -> str:
    """`text` as a file name on any system: each character but letters, digits and _ . - becomes _."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def format_table(metrics: dict, name: str, markdown: bool = False) -> str:
    """The papers' table: one row per category (plus "Average" for several), AUROC/AP/F1-max per
    level in percent with one decimal, AU-PRO after the pixel F1-max, then the pixel F1-max as the
    official code computes it (the one comparable with the papers' pixel F1-max).

    Args:
        metrics: evaluate()'s metrics. name: the row label of a single-category run.
        markdown: a Markdown table instead of aligned plain text.
    """
    header = ["Category", "Sample AUROC/AP/F1-max", "Image AUROC/AP/F1-max",
              "Pixel AUROC/AP/F1-max/AU-PRO/F1-max(ADer)"]
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
                fpr, tpr = roc_points(*curves[level])
            if fpr[-1] == 0 or tpr[-1] == 0:  # one class only: no curve
                continue
            ax.plot(fpr, tpr, lw=1.2, label=f"{category} ({100 * trapezoid(tpr, fpr):.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"{level} ROC (AUROC %)", xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.01))
        if 0 < len(levels) <= 10:
            ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- checkpoint and data


def load_model(path: str):
    """Rebuilds the model of a train.py checkpoint: its method, its config with weights="none"
    (the frozen encoder's weights, calibrated or ImageNet, are in the state dict), its state dict.

    Returns:
        (model in eval mode on the CPU, the checkpoint dict).
    """
    if not Path(path).is_file():
        raise data.UserError(f"--checkpoint {path}: no such file; pass the last.pt that train.py wrote "
                             "(e.g. runs/idif_zipper/last.pt)")
    checkpoint = read_torch_file(path, f"--checkpoint {path}", "PyTorch checkpoint",
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
    sizes (regenerated by synthetic.synthetic_root if its cache is gone).

    Args:
        data_root: the --data-root flag or None. run: the checkpoint's "train" dict (train.py's
            config). category: the category to evaluate.
    """
    if data_root is not None:
        return data.find_real_iad(data_root)
    if run.get("data_root") is not None:
        if not Path(run["data_root"]).is_dir():
            raise data.UserError(f"the run's data root {run['data_root']} (from the checkpoint) does not "
                                 "exist here; pass --data-root with the Real-IAD folder")
        return Path(run["data_root"])
    found = data.default_real_iad()
    if found is not None:
        return found
    root = synthetic.synthetic_root(category, n_train=run.get("synthetic_train", 40),
                                    n_test_normal=run.get("synthetic_test", 30),
                                    n_test_defect=run.get("synthetic_test", 30))
    print(f"no Real-IAD folder given: evaluating on the built-in synthetic dataset at {root}")
    return root


# ----------------------------------------------------------------------------- predict: new images


def predict_inputs(paths: list[str], views: int) -> list[tuple[str, list[Path]]]:
    """The samples to score: the V files of one sample in camera order, or folders of views named
    the Real-IAD way (grouped by sample key, ordered by camera; a .png beside an image of the same
    name is its mask and skipped). Returns [(sample id, V image paths)]."""
    given = [Path(p) for p in paths]
    for path in given:
        if not path.exists():
            raise data.UserError(f"--images {path}: no such file or folder")
    if all(p.is_file() for p in given):
        if len(given) != views:
            raise data.UserError(f"--images: {len(given)} files given, but the run's model takes {views} views "
                                 f"per sample; pass the {views} views of one sample in camera order (C1 first)")
        match = data.SAMPLE_KEY.search(given[0].name)
        return [(match.group(1) if match else given[0].stem, given)]
    if not all(p.is_dir() for p in given):
        raise data.UserError("--images: pass either the files of one sample or folders of samples, not both")
    samples = defaultdict(dict)  # sample key -> {camera: path}
    for folder in given:
        files = [f for f in sorted(folder.iterdir()) if f.suffix.lower() in data.IMAGE_SUFFIXES]
        stems = Counter(f.stem for f in files)
        for f in files:
            if f.suffix.lower() == ".png" and stems[f.stem] > 1:
                continue  # a mask beside its image
            match = data.SAMPLE_KEY.search(f.name)
            if match is None:
                raise data.UserError(f"--images {f}: not named the Real-IAD way (<category>_<nnnn>_<OK or "
                                     "NG_code>_C<n>_...); rename it, or pass the files of one sample")
            samples[match.group(1)][match.group(2)] = f
    if not samples:
        raise data.UserError(f"--images {given[0]}: no images (.jpg, .png) in it")
    for key, cameras in samples.items():
        if len(cameras) != views:
            raise data.UserError(f"--images: sample {key} has {len(cameras)} views "
                                 f"({', '.join(sorted(cameras))}), but the run's model takes {views}")
    return [(key, [cameras[c] for c in sorted(cameras)]) for key, cameras in sorted(samples.items())]


def predict_image(path: Path, size: int) -> torch.Tensor:
    """A photo as the model reads it (shorter side resized to `size`, centred square crop: as the
    training images, data.load_image), said in one line when it was not size x size.
    Returns (3, size, size) in [0, 1]."""
    try:
        with Image.open(path) as image:
            w, h = image.size  # the header only
        pixels = data.load_image(path, size)  # decoded as in training: a large JPEG at a reduced scale
    except (OSError, SyntaxError, ValueError, data.UserError) as e:
        raise data.UserError(f"--images {path}: not a readable image ({e}); pass JPEG or PNG files") from None
    if (w, h) != (size, size):
        print(f"{path}: {w}x{h} resized to {size}x{size} (shorter side to {size}, centred crop), as in training")
    return pixels


def stored_decision(run: Path, category: str | None) -> tuple[dict, int]:
    """The thresholds (and camera statistics, map range) that the run's evaluation stored for
    `category`, and the number of views per sample. One-line errors for a run not evaluated."""
    path = run / "metrics.json"
    try:
        stored = json.loads(path.read_text())
        decisions, views = stored["predict"], stored["settings"]["views"]
    except (OSError, ValueError, KeyError):
        raise data.UserError(f"--run {run}: {path} holds no thresholds; evaluate the run first: "
                             f"python eval.py --checkpoint {run / 'last.pt'}") from None
    if category is None and len(decisions) == 1:
        category = next(iter(decisions))
    if category not in decisions:
        raise data.UserError(f"--category {category or ''}: the run's thresholds are per category; choose "
                             f"one of {', '.join(decisions)}")
    if None in (decisions[category]["sample_threshold"], decisions[category]["image_threshold"]):
        raise data.UserError(f"--run {run}: its test split held one class only, so no threshold was chosen")
    return decisions[category], views


def plot_prediction(rgb: np.ndarray, maps: np.ndarray, result: dict, decision: dict, path: Path) -> None:
    """The sample's views with their maps overlaid on one colour scale (the test split's range of
    the run's maps), a colour bar, each view's score (red: above the image threshold), the verdict.
    rgb (V, H, W, 3), maps (V, H, W)."""
    V = len(maps)
    names = data.CAMERAS if V == len(data.CAMERAS) else [f"view {v + 1}" for v in range(V)]
    fig = Figure(figsize=(2.4 * V + 1, 2.9))
    axes = fig.subplots(1, V, squeeze=False)[0]
    for v, ax in enumerate(axes):
        ax.imshow(rgb[v])
        shown = ax.imshow(maps[v], cmap="jet", alpha=0.45, vmin=decision["map_range"][0],
                          vmax=decision["map_range"][1])
        view = result["views"][v]
        ax.set_title(f"{names[v]}: {view['score']:.3f}", fontsize=9, color="red" if view["anomalous"] else "black")
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.01, label="anomaly score (map)")
    verdict = "ANOMALOUS" if result["anomalous"] else "normal"
    fig.suptitle(f"{result['sample_id']}: {verdict} (sample score {result['score']:.3f}, threshold "
                 f"{decision['sample_threshold']:.3f}); camera: view score", fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")


@dataclass
class PredictConfig:
    run: str  # a train.py run folder that eval.py has evaluated (last.pt, metrics.json)
    images: list  # the V image files of one sample, or folders of Real-IAD-named views
    out: str  # folder for the pictures and predictions.json
    category: str | None = None  # whose thresholds, for a multi-class run; None: the run's only one
    device: str | None = None  # None: cuda if available, else cpu


def predict(cfg: PredictConfig) -> dict:
    """Applies a trained, evaluated run to new images: one picture per sample and predictions.json.

    A view or sample is called anomalous when its score reaches the F1-max threshold of the run's
    test split (stored in metrics.json by the evaluation, with the camera statistics of
    --view-norm, which are applied the same way). Returns the content of predictions.json.
    """
    run, out = Path(cfg.run), Path(cfg.out)
    if not (run / "last.pt").is_file():
        raise data.UserError(f"--run {run}: no last.pt there; pass the folder train.py wrote "
                             "(e.g. runs/idif_zipper)")
    decision, views = stored_decision(run, cfg.category)
    samples = predict_inputs(cfg.images, views)
    device = resolve_device(cfg.device)
    model, checkpoint = load_model(str(run / "last.pt"))
    model, size = place(model, device), checkpoint["config"]["image_size"]
    created(out, "--out")
    results = []
    for key, paths in samples:
        images = torch.stack([predict_image(p, size) for p in paths])  # (V, 3, H, W)
        with torch.inference_mode():
            maps = model.anomaly_map(data.normalize(images)[None].to(device)).float().cpu()[0]  # (V, H, W)
        scores = image_scores(maps)  # (V,)
        if decision["view_stats"] is not None:
            scores = view_normalised(scores, torch.tensor(decision["view_stats"]))  # (V,)
        result = {"sample_id": key, "score": float(scores.max()),
                  "anomalous": bool(scores.max() >= decision["sample_threshold"]),
                  "picture": f"{file_name(key)}.png",
                  "views": [{"path": str(p), "score": float(x),
                             "anomalous": bool(x >= decision["image_threshold"])} for p, x in zip(paths, scores)]}
        rgb = images.permute(0, 2, 3, 1).numpy()  # (V, H, W, 3)
        plot_prediction(rgb, maps.numpy(), result, decision, out / result["picture"])
        results.append(result)
        print(f"{key}: {'ANOMALOUS' if result['anomalous'] else 'normal'} (score {result['score']:.3f})")
    report = {"run": str(run), "sample_threshold": decision["sample_threshold"],
              "image_threshold": decision["image_threshold"], "view_norm": decision["view_stats"] is not None,
              "samples": results}
    (out / "predictions.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'predictions.json'} and {len(results)} pictures")
    return report


# ----------------------------------------------------------------------------- config and main


# The papers' training settings, train.py's GPU profile: the official MVAD config (lewandofskee/MVAD
# configs/mvad/mvad_realiad.py: size 256, batch 8, 100 epochs); the IDIF paper gives 256 px and batch
# 8, no epochs. Where a run differs, its reports say so in one line (protocol_note).
PAPER_SETTINGS = dict(image_size=256, batch_size=8, epochs=100, view_norm=False)


def protocol_note(checkpoint: dict, root: Path, view_norm: bool) -> str | None:
    """One line naming what in a run is not the papers' protocol, with the command that is; None
    when nothing differs. root: the data evaluated (the built-in synthetic data is not Real-IAD)."""
    run = {**(checkpoint.get("train") or {}), "epochs": checkpoint.get("epoch")}  # the epochs trained
    trained = run["epochs"] is not None  # a training-free run (PatchCore) has no batch or epochs that matter
    names = {"image_size": "image size", **({"batch_size": "batch", "epochs": "epochs"} if trained else {})}
    differences = [f"{name} {run[key]} (papers: {PAPER_SETTINGS[key]})" for key, name in names.items()
                   if run.get(key) not in (None, PAPER_SETTINGS[key])]
    if view_norm:
        differences.append("view-norm on (papers: off)")
    if checkpoint.get("random_encoder"):
        differences.append("random-init encoder calibrated on the training images (papers: ImageNet)")
    on_synthetic = synthetic.SYNTHETIC_CACHE in Path(root).resolve().parents
    if on_synthetic:
        differences.append("built-in synthetic data (papers: Real-IAD)")
    if not differences:
        return None
    command = (f"python train.py --method {checkpoint['method']} --category {run.get('category', 'all')} "
               f"--data-root {'/path/to/Real-IAD' if on_synthetic else root} --image-size 256 "
               f"{'--batch-size 8 --epochs 100 ' if trained else ''}--no-view-norm --weights imagenet")
    return f"Not the papers' settings: {'; '.join(differences)}. The papers' protocol: {command}"


@dataclass
class EvalConfig:
    checkpoint: str  # a train.py checkpoint, e.g. runs/idif_zipper/last.pt
    data_root: str | None = None  # Real-IAD folder; None: the run's (synthetic data if it had none)
    category: str | None = None  # a category, a comma list or "all"; None: the run's
    out: str | None = None  # folder for metrics.json, metrics.md, the PNGs; None: the checkpoint's folder
    batch_size: int = 8  # samples (of V views each) per forward pass
    workers: int = 0  # DataLoader worker processes
    device: str | None = None  # None: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads; None: torch's default (the cores)
    compile: bool = False  # torch.compile the anomaly-map pass (on a GPU with CUDA graphs)
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast of the anomaly-map pass (runtime.resolve_precision)
    drop_views: int = 0  # views removed at random from every sample (IDIF's robustness table); 0 = none
    view_norm: bool = False  # z-score image scores per camera with training-split statistics
    num_figures: int = 4  # test samples drawn with their maps (defective first)
    seed: int = 0  # seed of the --drop-views draw
    bins: int = 2**16  # PixelMetrics histogram bins: 2.6 MB per category, error bound <= ~1e-4
    export_adeval: str | None = None  # write ADEval's input (pickle of maps) here; None: no export
def main(cfg: EvalConfig) -> dict:
    """Evaluates a checkpoint on its test split; writes metrics.json, metrics.md, PNGs; prints the
    table; returns the metrics dict (as written to metrics.json, with NaN for undefined metrics).
    In a torch.distributed group (torchrun, train.py) every process evaluates its shard of the
    split (`evaluate`) and reads the checkpoint itself; rank 0 alone writes and returns the
    metrics, the others return {}."""
    if cfg.batch_size < 1 or cfg.bins < 2 or cfg.num_figures < 0:
        raise data.UserError(f"--batch-size {cfg.batch_size}, --bins {cfg.bins}, --num-figures "
                             f"{cfg.num_figures}: need at least 1, 2 and 0")
    device = resolve_device(cfg.device)
    precision, why = resolve_precision(cfg.precision, device)
    chosen = f"precision {precision}" + (f" ({why})" if cfg.precision == "auto" else "")  # for the title
    cfg = dataclasses.replace(cfg, precision=precision)
    setup_process(cfg.threads)
    model, checkpoint = prepared_model(cfg, device)
    root, category, test_set = test_split(cfg, checkpoint)
    out = output_folder(cfg)
    view_stats = None
    if cfg.view_norm:
        train_set = data.RealIAD(root, category_list(category), "train", image_size=checkpoint["config"]["image_size"])
        view_stats = camera_statistics(model, synthetic.routed(train_set, root, model), device, cfg.batch_size, cfg.workers)
    export = adeval_export(cfg.export_adeval, test_set.categories)
    metrics, collected = evaluate(model, synthetic.routed(test_set, root, model), device, drop_views=cfg.drop_views,
                                  batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
                                  view_stats=view_stats, num_figures=cfg.num_figures, bins=cfg.bins,
                                  export=export)
    if metrics is None:  # not rank 0, which reports for every process
        return {}
    metrics["settings"] = run_settings(cfg, checkpoint, root, test_set, collected, device)
    metrics["predict"] = {c: {**decision, "view_stats": None if view_stats is None else view_stats[c].tolist()}
                          for c, decision in collected["decision"].items()}  # what `eval.py predict` applies
    title = (f"{checkpoint['method']} on {category}: {len(test_set)} test samples, drop_views "
             f"{cfg.drop_views}, view_norm {cfg.view_norm}, {chosen}")
    write_reports(out, metrics, collected, category, title, report_notes(cfg, checkpoint, root, metrics, export))
    return metrics


def category_list(category: str):
    """--category as data.RealIAD takes it: "all", or a list of names from a comma list."""
    return category if category == "all" else category.split(",")


def prepared_model(cfg: EvalConfig, device: torch.device) -> tuple:
    """(the checkpoint's model on `device`, its anomaly_map compiled and/or under bf16 autocast as the
    flags ask, the checkpoint dict)."""
    model, checkpoint = load_model(cfg.checkpoint)
    model = place(model, device)
    if cfg.compile or cfg.precision == "bf16":  # camera_statistics and evaluate call model.anomaly_map
        model.anomaly_map = accelerate(model.anomaly_map, device, cfg.compile, cfg.precision)
    return model, checkpoint


def test_split(cfg: EvalConfig, checkpoint: dict) -> tuple:
    """(data root, category, test split) for --category (else the run's), at the model's image size,
    with one-line errors for an empty split and a --drop-views that leaves no view."""
    run = checkpoint.get("train") or {}
    category = cfg.category or run.get("category")
    if category is None:
        raise data.UserError(f"--checkpoint {cfg.checkpoint} does not name its category; pass --category")
    root = find_data_root(cfg.data_root, run, category)
    test_set = data.RealIAD(root, category_list(category), "test", image_size=checkpoint["config"]["image_size"])
    if len(test_set) == 0:
        raise data.UserError(f"--data-root {root}: the test split of {category} is empty")
    V = test_set[0]["images"].shape[0]
    if not 0 <= cfg.drop_views < V:
        raise data.UserError(f"--drop-views {cfg.drop_views}: must be between 0 and {V - 1} "
                             f"(every sample keeps at least one of its {V} views)")
    return root, category, test_set


def created(folder: Path, flag: str) -> Path:
    """`folder`, created with its parents; a one-line error naming the `flag` that chose it when that
    cannot be done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.UserError(f"{flag}: cannot create the folder {folder} ({e.strerror}); choose a writable "
                             "place") from None
    return folder


def adeval_export(path: str | None, categories: list[str]) -> "ADEvalExport | None":
    """The ADEvalExport of --export-adeval FILE, FILE's folder created; None without the flag."""
    if path is None:
        return None
    created(Path(path).parent, "--export-adeval")
    return ADEvalExport(Path(path), categories)


def output_folder(cfg: EvalConfig) -> Path:
    """--out (else the checkpoint's folder), created; a one-line error when that cannot be done."""
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent
    return created(out, "--out")


def run_settings(cfg: EvalConfig, checkpoint: dict, root: Path, test_set, collected: dict, device) -> dict:
    """metrics.json's "settings": what was evaluated, on which data, how (on which device, by how many
    processes: a sharded evaluation says so in its own output)."""
    levels = collected["levels"]
    return {"checkpoint": str(cfg.checkpoint), "method": checkpoint["method"], "epoch": checkpoint.get("epoch"),
            "data_root": str(root), "categories": sorted(levels), "image_size": checkpoint["config"]["image_size"],
            "samples": len(test_set), "views": test_set[0]["images"].shape[0], "drop_views": cfg.drop_views,
            "view_norm": cfg.view_norm,
            "positive_samples": positive_samples(collected), "images": sum(len(c["image"][0]) for c in levels.values()),
            "seed": cfg.seed, "pixel_bins": cfg.bins, "device": str(device), "world_size": process_group()[1],
            "precision": cfg.precision}


def positive_samples(collected: dict) -> int:
    """Defective samples among those `evaluate` scored (its second result), over every category."""
    return sum(int(curves["sample"][1].sum()) for curves in collected["levels"].values())


def report_notes(cfg: EvalConfig, checkpoint: dict, root: Path, metrics: dict, export) -> list[str]:
    """The lines under the table: what is not the papers' protocol, and ADEval's commands for an export."""
    notes = [protocol_note(checkpoint, root, cfg.view_norm)]
    if export is not None:
        views, image_size = metrics["settings"]["views"], metrics["settings"]["image_size"]
        commands = [shlex.join(adeval_argv(path, views - cfg.drop_views, image_size)) for path in export.written]
        notes.append("ADEval, Real-IAD's scorer, on the exported maps (one file per category):\n"
                     + "\n".join(f"    {command}" for command in commands))
    return [note for note in notes if note]


def write_reports(out: Path, metrics: dict, collected: dict, category: str, title: str,
                  notes: list[str]) -> None:
    """metrics.json, metrics.md (title, table, notes), roc.png, the example pictures; prints the same."""
    table = format_table(metrics, category, markdown=True)
    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=1))
    (out / "metrics.md").write_text("\n\n".join([title, table.rstrip("\n"), *notes]) + "\n")
    plot_roc(collected["levels"], out / "roc.png")
    for k, ex in enumerate(collected["examples"]):
        plot_example(ex, out / f"example_{k}_{file_name(ex['sample_id'])}.png")
    print(title)
    print(format_table(metrics, category), end="")
    for note in notes:
        print(note)
    print(f"wrote {out / 'metrics.json'}, metrics.md, roc.png and {len(collected['examples'])} example pictures")


def parse_args(argv=None) -> EvalConfig:
    p = data.ArgumentParser(description=__doc__.split("\n")[0],
                            epilog="python eval.py predict --help: apply a trained run to new images")
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint, e.g. runs/idif_zipper/last.pt")
    d = EvalConfig(checkpoint="")
    p.add_argument("--data-root", default=d.data_root,
                   help="Real-IAD folder; None = the run's (the built-in synthetic data if it had none)")
    p.add_argument("--category", default=d.category, help="a category, a comma list or all; None = the run's")
    p.add_argument("--out", default=d.out, help="output folder; None = the checkpoint's folder")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per forward pass")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--device", default=d.device, help="None = cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's, the cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the anomaly-map pass (CUDA graphs on a GPU)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bf16: bf16 autocast of the anomaly-map pass; auto: bf16 where the device computes it "
                        "natively")
    p.add_argument("--drop-views", type=int, default=d.drop_views,
                   help="remove K random views from every sample (at least one kept)")
    p.add_argument("--view-norm", action="store_true",
                   help="z-score image scores per camera with training-split statistics")
    p.add_argument("--num-figures", type=int, default=d.num_figures, help="test samples to draw")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the --drop-views draw")
    p.add_argument("--bins", type=int, default=d.bins, help="pixel-metric histogram bins")
    p.add_argument("--export-adeval", default=d.export_adeval, metavar="FILE",
                   help="write the test split's maps for Real-IAD's scorer ADEval (a pickle; one per "
                        "category, FILE's stem + _<category>, for several) and print its command")
    return EvalConfig(**vars(p.parse_args(argv)))


def parse_predict_args(argv=None) -> PredictConfig:
    p = data.ArgumentParser(prog="eval.py predict", description=predict.__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder of train.py, evaluated (last.pt, metrics.json)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="the V views of one sample in camera order (C1 first), or folders of views "
                        "named the Real-IAD way (<category>_<nnnn>_<OK or NG_code>_C<n>_...)")
    p.add_argument("--out", required=True, help="folder for the pictures and predictions.json")
    p.add_argument("--category", default=None, help="which of a multi-class run's thresholds (None: its only one)")
    p.add_argument("--device", default=None, help="None = cuda if available, else cpu")
    return PredictConfig(**vars(p.parse_args(argv)))
def main_in_torchrun(cfg: EvalConfig) -> dict:
    """main(cfg); under torchrun (RANK set) inside a process group of its processes, gloo on CPUs
    and nccl on GPUs, each process on the GPU of its LOCAL_RANK, so that they share the test split:
    `torchrun --nproc_per_node=N eval.py --checkpoint ...`."""
    if "RANK" not in os.environ or dist.is_initialized():
        return main(cfg)
    _, world, local_rank = distributed_context()
    with distributed_run(resolve_device(cfg.device), world, local_rank) as device:
        return main(dataclasses.replace(cfg, device=str(device)))


def cli(argv=None) -> int:
    """The command line (`eval.py ...` evaluates, `eval.py predict ...` applies a run to new images):
    bad input ends in one line `error: ...` on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return data.run_cli(lambda args: predict(parse_predict_args(args)), argv[1:])
    return data.run_cli(lambda args: main_in_torchrun(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(cli())
