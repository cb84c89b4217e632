"""Tests of synthetic.py: the built-in synthetic Real-IAD (objects, cameras, defects, cache, command line)."""
import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import synthetic

ROOT = Path(__file__).resolve().parents[1]


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_per_seed(tmp_path):
    sizes = dict(n_train=2, n_test_normal=1, n_test_defect=2, resolution=64)
    first = _files(synthetic.synthesize(tmp_path / "a", "zipper", seed=3, **sizes))
    assert first == _files(synthetic.synthesize(tmp_path / "b", "zipper", seed=3, **sizes))
    other = _files(synthetic.synthesize(tmp_path / "c", "zipper", seed=4, **sizes))
    images = [name for name in first if name.suffix == ".jpg"]
    assert len(images) == 25 and all(first[name] != other[name] for name in images)


def test_synthetic_sample_does_not_depend_on_the_other_sizes(tmp_path):
    full = data.RealIAD(synthetic.synthesize(tmp_path / "a", "toy_brick", 2, 1, 2, resolution=64),
                        "toy_brick", "test", image_size=64)
    defects_only = data.RealIAD(synthetic.synthesize(tmp_path / "b", "toy_brick", 0, 0, 2, resolution=64),
                                "toy_brick", "test", image_size=64)
    ng = [full[i] for i in range(len(full)) if "_NG_" in full[i]["sample_id"]]
    assert len(ng) == len(defects_only) == 2
    for a, b in zip(ng, (defects_only[0], defects_only[1])):
        torch.testing.assert_close(a["images"], b["images"])
        torch.testing.assert_close(a["masks"], b["masks"])


def test_synthetic_splits_shapes_and_labels(tmp_path):
    root = synthetic.synthesize(tmp_path, "audiojack", n_train=3, n_test_normal=2, n_test_defect=5, resolution=64)
    content = json.loads((root / "realiad_jsons" / "audiojack.json").read_text())
    assert all(e["anomaly_class"] == "OK" and e["image_path"].startswith("OK/") for e in content["train"])
    assert any("audiojack__" in e["image_path"] for e in content["test"])  # the release's quirk
    train = data.RealIAD(root, "audiojack", "train", image_size=64)
    assert len(train) == 3 and all(train[i]["label"] == 0 for i in range(3))
    test = data.RealIAD(root, "audiojack", "test", image_size=64)
    assert len(test) == 7
    for i in range(len(test)):
        item = test[i]
        assert item["images"].shape == (5, 3, 64, 64) and item["masks"].shape == (5, 1, 64, 64)
        shown = item["masks"].flatten(1).sum(1)  # (V,) mask pixels per view
        assert ((shown > 0).long() == item["view_labels"]).all()
        assert item["label"] == ("_NG_" in item["sample_id"])  # every defect is shown by some camera
        assert ((shown == 0) | (shown >= synthetic.MIN_VISIBLE * 64 * 64)).all()  # no slivers


def test_every_category_has_its_own_object():
    footprints = {}
    for category in data.CATEGORIES:
        maps = synthetic.object_maps(category, 32)  # (5, 32, 32) height, albedo, shine
        assert maps.shape == (5, 32, 32)
        footprints[category] = maps[0] > 0.02
        assert 0.05 < footprints[category].float().mean() < 0.8, category
    assert len({tuple(f.flatten().tolist()) for f in footprints.values()}) > 20  # shapes differ


@pytest.fixture(scope="module")
def default_defects(tmp_path_factory):
    """The 30 defective test samples of the default zipper split (identical to those written with the
    default sizes, since a sample's randomness depends only on its role and index)."""
    return synthetic.synthesize(tmp_path_factory.mktemp("default"), "zipper", n_train=0, n_test_normal=0)


def test_default_split_visibility_statistics(default_defects):
    counts = synthetic.visibility_stats(default_defects, "zipper")
    assert sum(counts) == 30 and counts[0] == 0
    assert sum(counts[1:5]) >= 0.3 * 30  # seen by only 1 to 4 of the 5 cameras
    assert counts[5] >= 0.3 * 30  # and many by all of them


def test_defects_on_side_faces_are_seen_by_few_cameras(tmp_path):
    counts = synthetic.visibility_stats(synthetic.synthesize(tmp_path, "eraser", 0, 0, 20, resolution=64), "eraser")
    assert sum(counts) == 20 and counts[1] + counts[2] >= 4  # a box's side face: one or two cameras


def test_default_defects_are_sizeable_where_visible(default_defects):
    base = default_defects / "realiad_256" / "zipper"
    entries = json.loads((default_defects / "realiad_jsons" / "zipper.json").read_text())["test"]
    shown = torch.stack([data.load_mask(base / e["mask_path"], 128).mean()
                         for e in entries if e["mask_path"]])  # (views that show a defect,) at 128 px
    assert shown.min() >= 0.8 * synthetic.MIN_VISIBLE and shown.median() > 0.012  # blobs, not slivers


@pytest.mark.parametrize("category", ["zipper", "eraser"])
def test_defects_contrast_with_the_same_sample_without_them(category):
    """Render the first defective samples of the default split at 128 px, and each again without its
    defect (same pose, light and texture): the shown pixels must differ clearly."""
    maps = synthetic.object_maps(category, 128)
    contrasts = []
    for index in range(10):  # two of each kind
        seed = [0, zlib.crc32(category.encode()), 2, index]  # the seeds `synthesize` gives them
        images, masks, _ = synthetic.render_sample(maps, synthetic.SYNTH_DEFECTS[index % 5], np.random.default_rng(seed))
        normal, empty, _ = synthetic.render_sample(maps, None, np.random.default_rng(seed))
        assert masks.any() and not empty.any()
        change = np.abs(images.astype(float) - normal).max(-1) / 255  # (V, R, R)
        for view in np.nonzero(masks.any((1, 2)))[0]:
            assert masks[view].mean() >= synthetic.MIN_VISIBLE
            contrasts.append(change[view][masks[view]].mean())
        assert change[~masks].mean() < 0.02  # elsewhere only sensor noise
    assert min(contrasts) > 0.05 and np.median(contrasts) > 0.3


@pytest.mark.parametrize("category", ["zipper", "bottle_cap", "pcb", "eraser", "toothbrush"])
def test_cameras_frame_the_object_close_up(category):
    """Every camera frames the object like a close-up photograph: its longer side fills 70-88% of the
    image (FILL, up to the height-field sampling) in every view, and all of it is in the picture."""
    maps = synthetic.object_maps(category, 96)
    world = synthetic._world(maps, (math.radians(230), math.radians(50), 0.6))
    hit, _ = synthetic._rasterize(world, synthetic.camera_windows(maps))
    silhouette = hit[:, 2] > 0.005  # (V, R, R) pixels that see the object
    for view in range(len(data.CAMERAS)):
        rows, cols = silhouette[view].any(1).nonzero(), silhouette[view].any(0).nonzero()
        extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) / 96
        assert 0.7 <= extent <= 0.88, (category, view, extent)
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < 95 and cols.max() < 95  # all of it


def test_synthetic_root_generates_once(tmp_path, monkeypatch):
    sizes = dict(n_train=1, n_test_normal=1, n_test_defect=1, resolution=64)
    root = synthetic.synthetic_root("eraser", cache_dir=tmp_path, **sizes)
    assert root.parent == tmp_path and (root / "realiad_jsons" / "eraser.json").is_file()
    assert len(data.RealIAD(root, "eraser", "test", image_size=64)) == 2
    both = synthetic.synthetic_root(["mint", "eraser"], cache_dir=tmp_path, **sizes)  # one root for a list
    assert data.RealIAD(both, "all", "train", image_size=64).categories == ["eraser", "mint"]
    monkeypatch.setattr(synthetic, "synthesize", lambda *args, **kwargs: pytest.fail("generated again"))
    assert synthetic.synthetic_root("eraser", cache_dir=tmp_path, **sizes) == root
    assert synthetic.synthetic_root(["eraser", "mint"], cache_dir=tmp_path, **sizes) == both
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, both.name])  # no staging left


def test_synthetic_root_unknown_category_leaves_nothing(tmp_path):
    with pytest.raises(data.UserError, match=r"unknown category 'zipperr'; valid categories: audiojack"):
        synthetic.synthetic_root(["zipper", "zipperr"], cache_dir=tmp_path, n_train=1, n_test_normal=0,
                                 n_test_defect=0, resolution=64)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_and_prints_statistics(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "synthetic.py"), "--out", str(tmp_path),
                          "--category", "pcb", "--n-train", "1", "--n-test-normal", "0",
                          "--n-test-defect", "2", "--resolution", "64"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"wrote 3 samples of pcb to {tmp_path} in ")
    assert lines[1].startswith("defective test samples by number of views that show the defect: 0: 0, 1:")
    assert lines[2].startswith("seen by only 1 to 4 of the 5 views: ")
    assert (tmp_path / "realiad_jsons" / "pcb.json").is_file()


def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "synthetic.py"), "--out", str(tmp_path),
                          "--category", "zipperr"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: unknown category 'zipperr'; valid categories: audiojack")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr and run.stdout == ""
