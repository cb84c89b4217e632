"""eval.py as a script: tiny MVAD / IDIF checkpoints on a few synthetic samples through main(cfg),
the dropped-view path, view-norm and the mean over categories against oracle detectors, the report
formats, the export for Real-IAD's scorer ADEval (checked against ADEval's own command line),
`eval.py predict`, and the one-line errors of the command line."""
import dataclasses
import json
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import data
import synthetic
from eval import (ADEVAL_SAMPLE_KEY, ADEvalExport, EvalConfig, adeval_argv, camera_statistics, cli,
                  drop_views_mask, evaluate, find_data_root, format_table, load_model, main, predict_image)
from idif import IDIF, IDIFConfig
from metrics import LEVEL_KEYS, connected_components, image_scores
from mvad import MVAD, MVADConfig
from patchcore import PatchCore, PatchCoreConfig
from runtime import accelerate, autocast
from simplenet import SimpleNet, SimpleNetConfig
from uniad import UniAD, UniADConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """A few synthetic zipper samples in the Real-IAD layout."""
    root = tmp_path_factory.mktemp("realiad")
    synthetic.synthesize(root, "zipper", n_train=2, n_test_normal=2, n_test_defect=3, resolution=SIZE)
    return root


def save_checkpoint(path: Path, method: str, root: Path) -> Path:
    """A checkpoint as train.py writes it, of an untrained tiny model."""
    torch.manual_seed(0)
    if method == "mvad":
        cfg = MVADConfig(backbone="resnet18", weights="none", image_size=SIZE, n_win=(4, 3, 2), topk=2,
                         blocks=(1, 1, 1))
        model = MVAD(cfg)
    else:
        cfg = IDIFConfig(image_size=SIZE, weights="none", fusion_blocks=1)
        model = IDIF(cfg)
    torch.save({"method": method, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                "epoch": 0, "seed": 0,
                "train": {"method": method, "category": "zipper", "data_root": str(root), "image_size": SIZE}},
               path)
    return path


def check_metrics(metrics: dict) -> None:
    """Every level holds exactly its metrics, each a fraction in [0, 1]."""
    for level, keys in LEVEL_KEYS.items():
        assert set(metrics[level]) == set(keys), level
        for key in keys:
            assert 0.0 <= metrics[level][key] <= 1.0, (level, key)


def test_main_writes_metrics_table_and_pictures(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})  # auto: bf16
    checkpoint = save_checkpoint(tmp_path / "last.pt", "mvad", synthetic_root)
    metrics = main(EvalConfig(checkpoint=str(checkpoint), batch_size=4, device="cpu", num_figures=2,
                              export_adeval=str(tmp_path / "export" / "adeval.pkl")))
    check_metrics(metrics)
    assert "per_category" not in metrics
    settings = metrics["settings"]
    assert (settings["method"], settings["samples"], settings["views"], settings["drop_views"]) == ("mvad", 5, 5, 0)
    assert (settings["device"], settings["world_size"], settings["precision"]) == ("cpu", 1, "bf16")
    assert all(0 <= v <= 1e-3 for v in metrics["pixel_error_bound"].values())

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["sample"] == pytest.approx(metrics["sample"]) and written["pixel"] == pytest.approx(metrics["pixel"])
    table = (tmp_path / "metrics.md").read_text()
    assert ("| Category | Sample AUROC/AP/F1-max | Image AUROC/AP/F1-max | Pixel AUROC/AP/F1-max/AU-PRO/"
            "F1-max(ADer) |") in table
    assert f"| zipper | {100 * metrics['sample']['auroc']:.1f}/" in table
    pixel, bound = metrics["pixel"], metrics["pixel_error_bound"]
    assert pixel["f1_max_ader"] <= pixel["f1_max"] + bound["f1_max_ader"] + bound["f1_max"]
    assert "Not the papers' settings: image size 64 (papers: 256); epochs 0 (papers: 100)." in table
    assert table.startswith("mvad on zipper: 5 test samples, drop_views 0, view_norm False, precision bf16 (auto: "
                            "the CPU has AMX_BF16)")
    assert "The papers' protocol: python train.py --method mvad --category zipper --data-root " in table
    decision = written["predict"]["zipper"]  # what `eval.py predict` applies
    assert decision["view_stats"] is None and decision["map_range"][0] < decision["map_range"][1]
    assert 0 <= decision["sample_threshold"] <= decision["map_range"][1]
    out = capsys.readouterr().out
    assert "Pixel AUROC/AP/F1-max/AU-PRO/F1-max(ADer)" in out and "Not the papers' settings" in out
    exported = pickle.loads((tmp_path / "export" / "adeval.pkl").read_bytes())  # ADEval's input format
    assert len(exported) == 25 and all(Path(p).is_file() for p in exported)
    for anomaly_map, score, mask in exported.values():
        assert anomaly_map.shape == (SIZE, SIZE) and anomaly_map.dtype == np.float32
        assert score == anomaly_map.max() and (mask is None or Path(mask).suffix == ".png")
    command = shlex.join(adeval_argv(tmp_path / "export" / "adeval.pkl", 5, SIZE))
    assert command in table and command in out and "--evaluate_size 64" in command
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "roc.png" in pictures and len(pictures) == 3
    assert "_NG_" in [p for p in pictures if p.startswith("example_0_")][0]  # defective samples first


class MeanDifference(torch.nn.Module):
    """A detector that needs no training: each pixel's squared distance from the mean of the
    training views of its camera, box-smoothed. It finds the synthetic defects, so its maps are
    informative (pixel AUROC far above 0.5) with a realistic spread of scores."""

    def __init__(self, mean: torch.Tensor):  # (V, 3, H, W)
        super().__init__()
        self.register_buffer("mean", mean)

    def anomaly_map(self, images, view_mask=None):
        B, V, _, H, W = images.shape
        distance = ((images - self.mean) ** 2).sum(2)  # (B, V, H, W)
        return torch.nn.functional.avg_pool2d(distance.view(B * V, 1, H, W), 5, 1, 2).view(B, V, H, W)


def adeval_strips(scores, positive, weights=None, nstrips=1000):
    """ADEval's histograms (adeval/mem_effic.py, _AccumulateStatCurve): `nstrips` strips over
    [min, max] with float32 edges and an overflow strip at each end, ascending. Returns (positives
    or their weights, negatives) per strip."""
    edges = np.linspace(0.0, 1.0, nstrips + 1, dtype=np.float32) * (float(scores.max()) - float(scores.min()))
    edges = np.concatenate([[-np.inf], edges + float(scores.min()), [np.inf]]).astype(np.float32)
    weights = np.ones(len(scores)) if weights is None else weights
    return (np.histogram(scores[positive], edges, weights=weights[positive])[0],
            np.histogram(scores[~positive], edges)[0].astype(float))


def strip_boxes(positives, negatives):
    """(dx, dy, x at the strip's far end) per strip, from the top strip down: ADEval's curve joins the
    exact curve's points at the strip edges by straight lines, and between two of them the exact
    curve is monotone, so it stays in the box (dx, dy)."""
    dy, dx = positives[::-1] / positives.sum(), negatives[::-1] / negatives.sum()
    return dx, dy, np.cumsum(dx)


def test_adeval_agrees_with_our_metrics(synthetic_root, tmp_path):
    """The export read by ADEval's command line (`python -m adeval`) gives the sample, image and
    pixel AUROC and the AU-PRO that we compute, within what ADEval's binning allows: its ROC and PRO
    curves take 1,000 strips between the smallest and largest score, which can move an area by at
    most half the sum over strips of (FPR step x TPR or PRO step), plus our own histogram bound.
    The data is written at the model's resolution, so both score the same masks and labels.
    (ADEval's AP is a trapezoid under the binned precision-recall curve, not scikit-learn's
    step-wise AP: a different definition, left out here and described in the README.)"""
    train = data.RealIAD(synthetic_root, "zipper", "train", image_size=SIZE)
    test = data.RealIAD(synthetic_root, "zipper", "test", image_size=SIZE)
    assert all(item["label"] == item["view_labels"].max() for item in test)  # ADEval's labels are the same
    model = MeanDifference(torch.stack([item["images"] for item in train]).mean(0))
    export = ADEvalExport(tmp_path / "adeval.pkl", ["zipper"])
    metrics, _ = evaluate(model, test, "cpu", batch_size=2, export=export)
    argv = adeval_argv(tmp_path / "adeval.pkl", 5, SIZE)
    result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    fields = result.stdout.strip().splitlines()[-1].split(",")[1:]
    theirs = {name: float(value) for name, value in zip(fields[::2], fields[1::2])}

    exported = pickle.loads((tmp_path / "adeval.pkl").read_bytes())
    maps = np.stack([m for m, _, _ in exported.values()])  # (N, H, W)
    masks = np.stack([np.array(Image.open(k)) > 127 if k else np.zeros((SIZE, SIZE), bool)
                      for _, _, k in exported.values()])  # (N, H, W) as ADEval reads them
    scores = np.array([score for _, score, _ in exported.values()])
    keys = [re.search(ADEVAL_SAMPLE_KEY, path).group(1) for path in exported]
    samples = sorted(set(keys))
    sample_scores = np.array([max(s for s, k in zip(scores, keys) if k == key) for key in samples])
    sample_labels = np.array([any(masks[i].any() for i, k in enumerate(keys) if k == key) for key in samples])
    regions = connected_components(masks)  # (N, H, W) 8-connected, as ADEval's cv2 call
    pro_weights = np.where(masks, 1.0 / np.bincount(regions.ravel())[regions], 0.0)  # 1 / region size
    for level, ours, (positives, negatives) in (
            ("s_auroc", metrics["sample"]["auroc"], adeval_strips(sample_scores, sample_labels)),
            ("i_auroc", metrics["image"]["auroc"], adeval_strips(scores, masks.any((1, 2)))),
            ("p_auroc", metrics["pixel"]["auroc"], adeval_strips(maps.ravel(), masks.ravel()))):
        dx, dy, _ = strip_boxes(positives, negatives)
        tolerance = np.sum(dx * dy) / 2 + metrics["pixel_error_bound"]["auroc"] * (level == "p_auroc")
        assert tolerance < 0.01, level  # the binning is fine enough for the check to mean something
        assert abs(theirs[level] - ours) <= tolerance + 1e-6, (level, theirs[level], ours, tolerance)
    dx, dy, fpr = strip_boxes(*adeval_strips(maps.ravel(), masks.ravel(), pro_weights.ravel()))
    inside = fpr - dx < 0.3  # strips that reach into FPR [0, 0.3]; the one crossing 0.3 counts whole
    tolerance = (np.sum((dx * dy)[inside & (fpr <= 0.3)]) / 2 + np.sum((dx * dy)[inside & (fpr > 0.3)])) / 0.3
    tolerance += metrics["pixel_error_bound"]["aupro"]
    assert tolerance < 0.02 and metrics["pixel"]["auroc"] > 0.7
    assert abs(theirs["p_aupro"] - metrics["pixel"]["aupro"]) <= tolerance + 1e-6, (theirs, metrics["pixel"])


def test_dropped_views_and_view_norm(synthetic_root, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "last.pt", "idif", synthetic_root)
    out = tmp_path / "dropped"
    metrics = main(EvalConfig(checkpoint=str(checkpoint), out=str(out), drop_views=3, view_norm=True,
                              batch_size=8, device="cpu", num_figures=1, seed=3))
    for level in ("sample", "image", "pixel"):  # metrics defined unless no defect is left in view
        assert all(math.isnan(v) or 0 <= v <= 1 for v in metrics[level].values())
    assert (metrics["settings"]["drop_views"], metrics["settings"]["view_norm"]) == (3, True)
    assert metrics["settings"]["images"] == 5 * (5 - 3)  # present views only
    assert json.loads((out / "metrics.json").read_text())["settings"]["drop_views"] == 3
    assert len(list(out.glob("example_*.png"))) == 1


def test_under_bf16_autocast_maps_losses_and_metric_inputs_stay_float32():
    """--precision bf16 (auto on a CPU with bf16 instructions): the models' convolutions, matrix
    products and attention compute in bf16, and change the maps; the maps (the pixel metrics' input)
    and the image scores are float32 computed in float32, not bf16 values widened (bf16 keeps 8 bits:
    most pixel scores would tie), and so are the training losses."""
    torch.manual_seed(0)
    images = torch.randn(1, 2, 3, SIZE, SIZE)  # (B, V, 3, H, W)
    models = {"mvad": MVAD(MVADConfig(backbone="resnet18", weights="none", image_size=SIZE, n_win=(4, 3, 2), topk=2,
                                      blocks=(1, 1, 1))),
              "idif": IDIF(IDIFConfig(image_size=SIZE, num_views=2, weights="none", voxel_size=(2, 4, 4),
                                      fusion_blocks=1)),
              "patchcore": PatchCore(PatchCoreConfig(backbone="resnet18", width=64, weights="none", image_size=SIZE)),
              "uniad": UniAD(UniADConfig(weights="none", image_size=SIZE, hidden_dim=32, num_heads=4, encoder_layers=1,
                                         decoder_layers=1, ffn_dim=64, neighbor_size=3)),
              "simplenet": SimpleNet(SimpleNetConfig(backbone="resnet18", weights="none", image_size=SIZE, width=64,
                                                     hidden=32))}
    models["patchcore"].fit(iter([images]), seed=0)
    for name, model in models.items():
        fp32 = model.eval().anomaly_map(images)
        maps = accelerate(model.anomaly_map, "cpu", False, "bf16")(images)  # as eval.py runs it
        assert maps.dtype == image_scores(maps).dtype == torch.float32, name
        assert (maps.bfloat16().float() != maps).float().mean() > 0.9, name
        assert not torch.equal(maps, fp32), name  # the features were bf16
    with autocast("cpu", "bf16"):
        losses = [models["mvad"].train()(images), *models["idif"].train()(images, images).values(),
                  models["uniad"].train()(images), *models["simplenet"].train()(images).values()]
    assert all(loss.dtype == torch.float32 for loss in losses)


def test_two_processes_evaluate_as_one(synthetic_root, tmp_path):
    """`torchrun --nproc_per_node=2 eval.py`: each process evaluates every other one of the 5 test
    samples (shards of 3 and 2). Both runs score one sample per forward on one thread, so every
    score is computed by the same float operations (batches of several samples, or other thread
    counts, round the convolutions differently, which the --view-norm z-scores blow up). Rank 0's
    metrics.json then holds the one-process sample and image metrics, --view-norm statistics and
    thresholds exactly, and its pixel metrics within their error bound; the --drop-views draw (the
    exported views), the exported maps and the pictures are the same."""
    checkpoint = save_checkpoint(tmp_path / "last.pt", "mvad", synthetic_root)
    flags = ["--checkpoint", str(checkpoint), "--device", "cpu", "--drop-views", "2", "--view-norm", "--seed", "5",
             "--batch-size", "1", "--num-figures", "3"]
    runs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(flags + ["--out", str(runs["one"]), "--export-adeval", str(runs["one"] / "adeval.pkl")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "eval.py", *flags, "--out", str(runs["two"]), "--export-adeval",
                             str(runs["two"] / "adeval.pkl")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Pixel AUROC/AP/F1-max/AU-PRO/F1-max(ADer)") == 1  # rank 0 alone reports
    one, two = (json.loads((run / "metrics.json").read_text()) for run in runs.values())
    for key in ("sample", "image", "predict"):
        assert one[key] == two[key], key
    assert one["settings"].pop("world_size") == 1 and two["settings"].pop("world_size") == 2  # sharded, and says so
    assert one["settings"] == two["settings"]
    assert one["settings"]["images"] == 5 * 3 and one["sample"]["auroc"] is not None
    for key, bound in one["pixel_error_bound"].items():
        assert abs(one["pixel"][key] - two["pixel"][key]) <= bound + 1e-12, key
    exported = [pickle.loads((run / "adeval.pkl").read_bytes()) for run in runs.values()]
    assert list(exported[0]) == list(exported[1])  # the same views kept, in the same order
    for path, (anomaly_map, score, mask) in exported[0].items():
        assert (score, mask) == exported[1][path][1:] and np.array_equal(anomaly_map, exported[1][path][0])
    pictures = [sorted(p.name for p in run.glob("example_*.png")) for run in runs.values()]
    assert pictures[0] == pictures[1] and len(pictures[0]) == 3


def oracle_dataset(samples: int = 8, categories=("toy", "zipper")) -> list[dict]:
    """Items whose first image channel holds the ground truth (0 or 5), two categories."""
    items = []
    for i in range(samples):
        masks = torch.zeros(5, 1, 8, 8)
        if i % 2:
            masks[i % 5, 0, 2:4, 3:6] = 1
            masks[(i + 2) % 5, 0, 5:7, 0:2] = 1
        images = torch.zeros(5, 3, 8, 8)
        images[:, 0] = 5 * masks[:, 0]
        items.append({"images": images, "masks": masks, "view_classes": masks.flatten(1).amax(1).long(),
                      "sample_id": f"s{i}", "category": categories[(i // 2) % len(categories)]})
    return items


class Oracle(torch.nn.Module):
    """A perfect detector: its map is the ground truth hidden in the image; dropped views get a
    huge score that must not reach any metric."""

    def anomaly_map(self, images, view_mask=None):
        maps = images[:, :, 0].clone()  # (B, V, H, W)
        if view_mask is not None:
            maps[~view_mask] = 1e6
        return maps


@pytest.mark.parametrize("drop", [0, 2])
def test_evaluate_with_a_perfect_detector(drop):
    metrics, collected = evaluate(Oracle(), oracle_dataset(), "cpu", drop_views=drop, batch_size=3,
                                  num_figures=2, bins=64)
    assert set(metrics["per_category"]) == {"toy", "zipper"}
    for level, keys in LEVEL_KEYS.items():
        for key in keys:
            assert metrics[level][key] == pytest.approx(1.0, abs=1e-12), (level, key)
            assert metrics["per_category"]["toy"][level][key] == pytest.approx(1.0, abs=1e-12), (level, key)
    assert sum(len(c["image"][0]) for c in collected["levels"].values()) == 8 * (5 - drop)
    assert [ex["label"] for ex in collected["examples"]] == [True, True]


def noisy_dataset(split: str, samples: int, seed: int, categories=("zipper",), shift=None) -> list[dict]:
    """Items for an imperfect oracle: channel 0 of view v holds a constant level b ~ U(0, 1) (plus
    `shift[category]`) and, in the test split, +5 on a defect box of views i % 5 and (i + 2) % 5 of
    every odd sample i. Training items are normal."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(samples):
        category = categories[(i // 2) % len(categories)]
        masks = torch.zeros(5, 1, 8, 8)
        if split == "test" and i % 2:
            masks[i % 5, 0, 2:4, 3:6] = 1
            masks[(i + 2) % 5, 0, 5:7, 0:2] = 1
        level = torch.rand(5, generator=g) + (shift or {}).get(category, 0.0)  # (V,)
        images = torch.zeros(5, 3, 8, 8)
        images[:, 0] = level[:, None, None] + 5 * masks[:, 0]
        items.append({"images": images, "masks": masks, "view_classes": masks.flatten(1).amax(1).long(),
                      "sample_id": f"{split}{i}", "category": category})
    return items


class LoudFirstCamera(torch.nn.Module):
    """An oracle whose camera C1 scores +10 on every map, defect or not."""

    def anomaly_map(self, images, view_mask=None):
        maps = images[:, :, 0].clone()  # (B, V, H, W)
        maps[:, 0] += 10
        return maps


def test_view_norm_statistics_and_what_they_fix():
    """camera_statistics are each camera's mean and (population) std of the training image scores,
    checked against the levels written into the images. With them C1's +10 no longer hides the
    defects that only the other cameras see: sample AUROC 1.0, without them below 1."""
    train_set, test_set = noisy_dataset("train", 12, seed=1), noisy_dataset("test", 20, seed=2)
    stats = camera_statistics(LoudFirstCamera(), train_set, "cpu", batch_size=5)
    scores = torch.stack([item["images"][:, 0, 0, 0] for item in train_set]) + torch.tensor([10.0, 0, 0, 0, 0])
    assert set(stats) == {"zipper"} and stats["zipper"].shape == (2, 5)
    assert_close(stats["zipper"][0], torch.from_numpy(scores.numpy().mean(0)))
    assert_close(stats["zipper"][1], torch.from_numpy(scores.numpy().std(0)))  # numpy: ddof 0
    normed, _ = evaluate(LoudFirstCamera(), test_set, "cpu", view_stats=stats, num_figures=0, bins=64)
    plain, _ = evaluate(LoudFirstCamera(), test_set, "cpu", num_figures=0, bins=64)
    assert normed["sample"]["auroc"] == 1.0 and normed["image"]["auroc"] == 1.0
    assert plain["sample"]["auroc"] < 0.9


def test_view_norm_statistics_with_views_removed_count_the_samples_that_keep_each_camera():
    """With K views removed from every training sample (the draw of `drop_views_mask`), a camera's
    mean and std come from the samples that keep it, checked by hand."""
    train_set = noisy_dataset("train", 12, seed=1)
    stats = camera_statistics(LoudFirstCamera(), train_set, "cpu", batch_size=5, drop_views=2, seed=3)
    scores = (torch.stack([item["images"][:, 0, 0, 0] for item in train_set]) + torch.tensor([10.0, 0, 0, 0, 0])).numpy()
    kept = drop_views_mask(12, 5, 2, seed=3).numpy()  # (12, 5)
    assert (kept.sum(0) < 12).all() and (kept.sum(0) > 1).all()
    for v in range(5):
        column = scores[kept[:, v], v]  # the scores of camera v in the samples that keep it
        assert stats["zipper"][0, v].item() == pytest.approx(column.mean(), rel=1e-6)
        assert stats["zipper"][1, v].item() == pytest.approx(column.std(), rel=1e-5)


def test_top_level_metrics_are_the_mean_over_categories_not_the_pooled_value():
    """Two categories whose normal levels differ by 3: each category's sample AUROC (sklearn on the
    max over views of the levels written into the images) enters the top level as their mean; the
    pooled AUROC over both is another number."""
    from sklearn.metrics import roc_auc_score

    items = noisy_dataset("test", 24, seed=3, categories=("toy", "zipper"), shift={"zipper": 3.0})
    for item in items[1::4]:  # an imperfect detector: a defect below the normal level of some views
        item["images"][:, 0] -= 4.5 * item["masks"][:, 0]
    metrics, _ = evaluate(Oracle(), items, "cpu", num_figures=0, bins=64)
    score = {i: float(item["images"][:, 0].amax()) for i, item in enumerate(items)}
    label = {i: int(item["view_classes"].any()) for i, item in enumerate(items)}
    per_category = {}
    for category in ("toy", "zipper"):
        rows = [i for i, item in enumerate(items) if item["category"] == category]
        per_category[category] = roc_auc_score([label[i] for i in rows], [score[i] for i in rows])
        assert metrics["per_category"][category]["sample"]["auroc"] == pytest.approx(per_category[category])
    assert 0.5 < min(per_category.values()) < 1.0
    assert metrics["sample"]["auroc"] == pytest.approx(np.mean(list(per_category.values())))
    pooled = roc_auc_score(list(label.values()), list(score.values()))
    assert abs(pooled - metrics["sample"]["auroc"]) > 0.05
    for level, keys in LEVEL_KEYS.items():
        for key in keys:
            assert metrics[level][key] == pytest.approx(
                np.mean([metrics["per_category"][c][level][key] for c in ("toy", "zipper")]), abs=1e-12)


def test_metrics_do_not_depend_on_the_batch_size_with_dropped_views():
    """The dropped views are drawn per sample, not per batch, and every accumulator streams: one
    sample per batch gives the very same metrics as eight."""
    items = noisy_dataset("test", 20, seed=4, categories=("toy", "zipper"))
    for item in items[1::4]:  # defects barely above the normal levels: an imperfect detector
        item["images"][:, 0] -= 4.9 * item["masks"][:, 0]
    one, _ = evaluate(Oracle(), items, "cpu", drop_views=2, batch_size=1, num_figures=0, bins=256, seed=5)
    eight, _ = evaluate(Oracle(), items, "cpu", drop_views=2, batch_size=8, num_figures=0, bins=256, seed=5)
    assert one == eight
    assert one["sample"]["auroc"] < 1.0


def test_drop_views_mask_is_deterministic():
    mask = drop_views_mask(50, 5, 2, seed=7)
    assert mask.shape == (50, 5) and mask.dtype == torch.bool
    assert (mask.sum(1) == 3).all()
    assert torch.equal(mask, drop_views_mask(50, 5, 2, seed=7))
    assert not torch.equal(mask, drop_views_mask(50, 5, 2, seed=8))
    assert drop_views_mask(10, 5, 0, seed=0).all() and (drop_views_mask(10, 5, 4, seed=0).sum(1) == 1).all()


def test_format_table_multi_class():
    per = {"toy": {"sample": {"auroc": 0.9, "ap": 0.8, "f1_max": 0.75},
                   "image": {"auroc": 0.5, "ap": 0.25, "f1_max": 0.125},
                   "pixel": {"auroc": 0.979, "ap": 0.303, "f1_max": 0.368, "aupro": 0.912, "f1_max_ader": 0.3}},
           "zipper": {"sample": {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0},
                      "image": {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan},
                      "pixel": {"auroc": 0.5, "ap": 0.5, "f1_max": 0.5, "aupro": 0.5, "f1_max_ader": 0.5}}}
    metrics = {"sample": {"auroc": 0.95, "ap": 0.9, "f1_max": 0.875}, "image": per["zipper"]["image"],
               "pixel": per["zipper"]["pixel"], "per_category": per}
    markdown = format_table(metrics, "all", markdown=True).splitlines()
    assert markdown[1] == "|---|---|---|---|"
    assert markdown[2] == "| toy | 90.0/80.0/75.0 | 50.0/25.0/12.5 | 97.9/30.3/36.8/91.2/30.0 |"
    assert markdown[3] == "| zipper | 100.0/100.0/100.0 | -/-/- | 50.0/50.0/50.0/50.0/50.0 |"
    assert markdown[4].startswith("| Average | 95.0/90.0/87.5 |")
    assert format_table(metrics, "all").splitlines()[1].split() == ["toy", "90.0/80.0/75.0", "50.0/25.0/12.5",
                                                                    "97.9/30.3/36.8/91.2/30.0"]


def test_bad_flags(synthetic_root, tmp_path):
    checkpoint = str(save_checkpoint(tmp_path / "last.pt", "mvad", synthetic_root))
    with pytest.raises(data.UserError, match=r"^--drop-views 5: must be between 0 and 4"):
        main(EvalConfig(checkpoint=checkpoint, drop_views=5, device="cpu"))
    with pytest.raises(data.UserError, match=r"^--device gpu0: not a device; use cpu, cuda or cuda:N$"):
        main(EvalConfig(checkpoint=checkpoint, device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(data.UserError, match=r"^--device cuda: CUDA is not available on this machine"):
            main(EvalConfig(checkpoint=checkpoint, device="cuda"))
    blocked = tmp_path / "a file"  # a folder cannot be created inside a file
    blocked.write_text("")
    for flags in ({"out": str(blocked / "run")}, {"export_adeval": str(blocked / "adeval.pkl")}):
        flag = "--" + next(iter(flags)).replace("_", "-")
        with pytest.raises(data.UserError, match=rf"^{flag}: cannot create the folder .*a file.*; choose a writable"):
            main(EvalConfig(checkpoint=checkpoint, device="cpu", **flags))


def test_data_root_rules(tmp_path, monkeypatch):
    """--data-root, else the run's root, else $REALIAD_ROOT / ./data/realiad, else the synthetic
    dataset with the run's sizes; a folder that is gone is an error naming where it came from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REALIAD_ROOT", raising=False)
    calls = []
    monkeypatch.setattr(synthetic, "synthetic_root", lambda category, **sizes: calls.append((category, sizes)) or tmp_path)
    run = {"data_root": None, "category": "zipper", "synthetic_train": 3, "synthetic_test": 2}
    assert find_data_root(None, run, "toy") == tmp_path
    assert calls == [("toy", {"n_train": 3, "n_test_normal": 2, "n_test_defect": 2})]
    assert find_data_root(str(tmp_path), {**run, "data_root": "/elsewhere"}, "toy") == tmp_path
    (tmp_path / "data" / "realiad").mkdir(parents=True)
    assert find_data_root(None, run, "toy") == Path("data/realiad")
    with pytest.raises(data.UserError, match=r"^--data-root /gone: no such folder; pass the folder that holds "
                                             r"realiad_<res>/ and realiad_jsons/ \(see README\)$"):
        find_data_root("/gone", run, "toy")
    with pytest.raises(data.UserError, match=r"^the run's data root /gone \(from the checkpoint\) does not exist "
                                             r"here; pass --data-root"):
        find_data_root(None, {**run, "data_root": "/gone"}, "toy")


def bad_checkpoint(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    elif kind == "unknown":
        torch.save({"method": "padim", "config": {}, "model": {}}, path)
    elif kind == "other":  # says MVAD, holds IDIF's config and weights
        cfg = IDIFConfig(image_size=SIZE, weights="none", fusion_blocks=1)
        torch.save({"method": "mvad", "config": dataclasses.asdict(cfg), "model": IDIF(cfg).state_dict()}, path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", r"--checkpoint \S+missing\.pt: no such file; pass the last\.pt that train\.py wrote"),
    ("corrupt", r"--checkpoint \S+corrupt\.pt: not a readable PyTorch checkpoint \(\w+\)"),
    ("unknown", r"--checkpoint \S+unknown\.pt: method 'padim' is unknown; eval\.py evaluates mvad, idif, patchcore"),
    ("other", r"--checkpoint \S+other\.pt: its config and weights do not fit a mvad model \(.+\)"),
])
def test_bad_checkpoints_give_one_line_errors(kind, message, tmp_path, capsys):
    path = bad_checkpoint(kind, tmp_path)
    assert cli(["--checkpoint", str(path), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]


def test_command_line_exit_status(tmp_path):
    """The real entry point: status 2, one line on stderr, no traceback."""
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(bad_checkpoint("corrupt", tmp_path))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --checkpoint ") and result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- eval.py predict


@pytest.fixture(scope="module")
def evaluated_run(synthetic_root, tmp_path_factory) -> Path:
    """A run folder as train.py leaves it on a CPU: an (untrained, tiny) MVAD checkpoint, evaluated
    with view-norm."""
    run = tmp_path_factory.mktemp("run")
    main(EvalConfig(checkpoint=str(save_checkpoint(run / "last.pt", "mvad", synthetic_root)), device="cpu",
                    num_figures=0, view_norm=True))
    return run


def predict_cli(run: Path, images: list, out: Path) -> int:
    return cli(["predict", "--run", str(run), "--images", *map(str, images), "--out", str(out), "--device", "cpu"])


def test_predict_scores_samples_as_the_evaluation_does(evaluated_run, synthetic_root, tmp_path, capsys):
    """Folders of Real-IAD-named views (the masks beside them are skipped): each view gets the score the
    evaluation gives it (z-scored with the stored camera statistics), each sample the verdict of the
    stored F1-max threshold, a picture each."""
    defective = next(synthetic_root.rglob("*_NG_*_C1_*.jpg")).parent  # 5 views and their masks
    normal = next(synthetic_root.rglob("*_OK_C1_*.jpg")).parent
    assert predict_cli(evaluated_run, [defective, normal], tmp_path) == 0
    report = json.loads((tmp_path / "predictions.json").read_text())
    stored = json.loads((evaluated_run / "metrics.json").read_text())["predict"]["zipper"]
    assert (report["sample_threshold"], report["image_threshold"]) == (stored["sample_threshold"],
                                                                       stored["image_threshold"])
    test = {item["sample_id"]: item for item in data.RealIAD(synthetic_root, "zipper", "test", image_size=SIZE)}
    model = load_model(str(evaluated_run / "last.pt"))[0]
    assert len(report["samples"]) == 2
    mean, std = torch.tensor(stored["view_stats"])  # (V,) each
    assert report["view_norm"] and (std > 0).all()
    for result in report["samples"]:
        raw = model.anomaly_map(test[result["sample_id"]]["images"][None]).amax((-2, -1))[0]  # (V,)
        scores = torch.tensor([view["score"] for view in result["views"]])  # (V,) z-scores
        torch.testing.assert_close(scores * std + mean, raw, rtol=0, atol=1e-6)  # float32 layouts differ
        assert [Path(view["path"]).name.split("_")[-2] for view in result["views"]] == list(data.CAMERAS)
        assert result["anomalous"] == (result["score"] >= stored["sample_threshold"])
        assert (tmp_path / result["picture"]).is_file()
    assert "resized" not in capsys.readouterr().out


def test_predict_takes_the_files_of_one_sample_and_resizes_other_sizes(evaluated_run, synthetic_root, tmp_path,
                                                                        capsys):
    views = sorted(next(synthetic_root.rglob("*_OK_C1_*.jpg")).parent.glob("*.jpg"))  # C1..C5
    Image.open(views[2]).resize((96, 80)).save(tmp_path / "photo.png")
    assert predict_cli(evaluated_run, [*views[:2], tmp_path / "photo.png", *views[3:]], tmp_path / "out") == 0
    assert f"{tmp_path / 'photo.png'}: 96x80 resized to 64x64 (shorter side to 64, centred crop)" in \
        capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert report["samples"][0]["sample_id"] == re.search(ADEVAL_SAMPLE_KEY, views[0].name).group(1)


def test_predict_reads_a_photo_as_training_reads_it(tmp_path):
    """A JPEG larger than the model's input is decoded at a reduced scale in training (data.load_image,
    PIL's draft); predict must read it the same way, or the same photo scores differently there."""
    pixels = torch.Generator().manual_seed(0)
    photo = (torch.rand(256, 320, 3, generator=pixels) * 255).to(torch.uint8).numpy()
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    assert torch.equal(predict_image(tmp_path / "photo.jpg", 64), data.load_image(tmp_path / "photo.jpg", 64))


@pytest.mark.parametrize("case, message", [
    ("four views", r"--images: 4 files given, but the run's model takes 5 views per sample; pass the 5 views"),
    ("unreadable", r"--images \S+C3\S+\.jpg: not a readable image \(.+\); pass JPEG or PNG files"),
    ("foreign name", r"--images \S+holiday\.jpg: not named the Real-IAD way"),
    ("views missing", r"--images: sample zipper_\d{4}_OK has 4 views \(C1, C2, C4, C5\), but the run's model "
                      r"takes 5"),
    ("not evaluated", r"--run \S+: \S+metrics\.json holds no thresholds; evaluate the run first: python eval\.py"),
])
def test_predict_bad_input_gives_one_line(case, message, evaluated_run, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "sample"
    shutil.copytree(next(synthetic_root.rglob("*_OK_C1_*.jpg")).parent, folder)
    views, run = sorted(folder.glob("*.jpg")), evaluated_run
    images = [folder]
    if case == "four views":
        images = views[:4]
    elif case == "unreadable":
        views[2].write_bytes(views[2].read_bytes()[:100])
    elif case == "foreign name":
        shutil.copy(views[0], folder / "holiday.jpg")
    elif case == "views missing":
        views[2].unlink()
    else:
        run = tmp_path / "run"
        run.mkdir()
        shutil.copy(evaluated_run / "last.pt", run / "last.pt")
    assert predict_cli(run, images, tmp_path / "out") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search("^error: " + message, lines[0]), lines
