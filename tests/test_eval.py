"""eval.py as a script: tiny MVAD / IDIF checkpoints on a few synthetic samples through main(cfg),
the dropped-view path, the report formats, and the one-line errors of the command line."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from eval import LEVEL_KEYS, EvalConfig, cli, drop_views_mask, evaluate, find_data_root, format_table, main
from idif import IDIF, IDIFConfig
from mvad import MVAD, MVADConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """A few synthetic zipper samples in the Real-IAD layout."""
    root = tmp_path_factory.mktemp("realiad")
    data.synthesize(root, "zipper", n_train=2, n_test_normal=2, n_test_defect=3, resolution=SIZE)
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


def test_main_writes_metrics_table_and_pictures(synthetic_root, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "last.pt", "mvad", synthetic_root)
    metrics = main(EvalConfig(checkpoint=str(checkpoint), batch_size=4, device="cpu", num_figures=2))
    check_metrics(metrics)
    assert "per_category" not in metrics
    settings = metrics["settings"]
    assert (settings["method"], settings["samples"], settings["views"], settings["drop_views"]) == ("mvad", 5, 5, 0)
    assert all(0 <= v <= 1e-3 for v in metrics["pixel_error_bound"].values())

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["sample"] == pytest.approx(metrics["sample"]) and written["pixel"] == pytest.approx(metrics["pixel"])
    table = (tmp_path / "metrics.md").read_text()
    assert "| Category | Sample AUROC/AP/F1-max | Image AUROC/AP/F1-max | Pixel AUROC/AP/F1-max/AU-PRO |" in table
    assert f"| zipper | {100 * metrics['sample']['auroc']:.1f}/" in table
    assert "Pixel AUROC/AP/F1-max/AU-PRO" in capsys.readouterr().out
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "roc.png" in pictures and len(pictures) == 3
    assert "_NG_" in [p for p in pictures if p.startswith("example_0_")][0]  # defective samples first


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
        items.append({"images": images, "masks": masks, "label": int(i % 2), "sample_id": f"s{i}",
                      "category": categories[(i // 2) % len(categories)]})
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
                   "pixel": {"auroc": 0.979, "ap": 0.303, "f1_max": 0.368, "aupro": 0.912}},
           "zipper": {"sample": {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0},
                      "image": {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan},
                      "pixel": {"auroc": 0.5, "ap": 0.5, "f1_max": 0.5, "aupro": 0.5}}}
    metrics = {"sample": {"auroc": 0.95, "ap": 0.9, "f1_max": 0.875}, "image": per["zipper"]["image"],
               "pixel": per["zipper"]["pixel"], "per_category": per}
    markdown = format_table(metrics, "all", markdown=True).splitlines()
    assert markdown[1] == "|---|---|---|---|"
    assert markdown[2] == "| toy | 90.0/80.0/75.0 | 50.0/25.0/12.5 | 97.9/30.3/36.8/91.2 |"
    assert markdown[3] == "| zipper | 100.0/100.0/100.0 | -/-/- | 50.0/50.0/50.0/50.0 |"
    assert markdown[4].startswith("| Average | 95.0/90.0/87.5 |")
    assert format_table(metrics, "all").splitlines()[1].split() == ["toy", "90.0/80.0/75.0", "50.0/25.0/12.5",
                                                                    "97.9/30.3/36.8/91.2"]


def test_bad_flags(synthetic_root, tmp_path):
    checkpoint = str(save_checkpoint(tmp_path / "last.pt", "mvad", synthetic_root))
    with pytest.raises(data.UserError, match=r"^--drop-views 5: must be between 0 and 4"):
        main(EvalConfig(checkpoint=checkpoint, drop_views=5, device="cpu"))
    with pytest.raises(data.UserError, match=r"^--device gpu0: not a device; use cpu, cuda or cuda:N$"):
        main(EvalConfig(checkpoint=checkpoint, device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(data.UserError, match=r"^--device cuda: CUDA is not available on this machine"):
            main(EvalConfig(checkpoint=checkpoint, device="cuda"))


def test_data_root_rules(tmp_path, monkeypatch):
    """--data-root, else the run's root, else $REALIAD_ROOT / ./data/realiad, else the synthetic
    dataset with the run's sizes; a folder that is gone is an error naming where it came from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REALIAD_ROOT", raising=False)
    calls = []
    monkeypatch.setattr(data, "synthetic_root", lambda category, **sizes: calls.append((category, sizes)) or tmp_path)
    run = {"data_root": None, "category": "zipper", "synthetic_train": 3, "synthetic_test": 2}
    assert find_data_root(None, run, "toy") == tmp_path
    assert calls == [("toy", {"n_train": 3, "n_test_normal": 2, "n_test_defect": 2})]
    assert find_data_root(str(tmp_path), {**run, "data_root": "/elsewhere"}, "toy") == tmp_path
    (tmp_path / "data" / "realiad").mkdir(parents=True)
    assert find_data_root(None, run, "toy") == Path("data/realiad")
    with pytest.raises(data.UserError, match=r"^--data-root /gone: no such folder; pass the Real-IAD folder$"):
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
