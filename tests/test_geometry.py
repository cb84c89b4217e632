"""What the renderer knows: correspondences between views (projection, depth test, window overlaps),
MVAS routing against them (oracle and cosine routing, routing quality), and the consistency
categories whose every view alone is normal. CPU, 64 px renders."""
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import data
import synthetic
from mvad import MVAD, MVADConfig, mvas_routing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import routing  # noqa: E402  (bench/routing.py)

R = 64


def rendered(category: str, role: int = 1, index: int = 0):
    """(object maps, images, masks, hit, windows) of one sample rendered at R px, as `synthesize` draws it."""
    maps = synthetic.object_maps(category, R)
    images, masks, hit = synthetic.render_sample(maps, None, np.random.default_rng([0, zlib.crc32(category.encode()),
                                                                                    role, index]))
    return maps, images, masks, hit, synthetic.camera_windows(maps)


def pixel_centres(size: int) -> torch.Tensor:
    """(size, size, 2) every pixel's centre (row, column) as fractions of the side."""
    centres = (torch.arange(size) + 0.5) / size
    return torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1)


# ----------------------------------------------------------------------------- correspondences


def test_a_point_taken_from_c1_to_c3_and_back_lands_where_it_started():
    _, _, _, hit, windows = rendered("zipper")
    points = hit.permute(0, 2, 3, 1)  # (V, R, R, 3)
    seen = synthetic.visibility(points, hit, windows)  # (V, V, R, R)
    there = (synthetic.project(points[0], windows)[2] * R).floor().long().clamp(0, R - 1)  # (R, R, 2) in C3
    back = synthetic.project(points[2][there[..., 0], there[..., 1]], windows)[0]  # C3's points there, in C1
    error = ((back - pixel_centres(R)).abs() * R).amax(-1)[seen[0, 2]]  # pixels, where C3 sees C1's point
    assert seen[0, 2].sum() > 0.2 * seen[0, 0].sum()  # C3 sees much of what C1 sees
    assert error.max() <= 1.5 and error.median() <= 0.5


def test_occluded_points_have_no_counterpart():
    """A box (eraser): C4, on the far side, does not see the wall that faces C2 (the box is in the
    way), which C2 sees all of; C1, above, sees the top face that C2 sees."""
    _, _, _, hit, windows = rendered("eraser")
    points = hit.permute(0, 2, 3, 1)
    seen = synthetic.visibility(points, hit, windows)
    x, z = points[1, ..., 0], points[1, ..., 2]  # (R, R) of C2's pixels
    front = (z > 0.02) & (z < 0.5 * z.max()) & (x.abs() < 0.5 * x[z > 0.02].abs().max())  # the wall facing C2
    assert front.sum() > 100 and seen[1, 1][front].all()
    assert not seen[1, 3][front].any()
    assert seen[1, 0][z > 0.95 * z.max()].all()


def test_window_overlaps_of_a_window_sum_to_at_most_one():
    _, _, _, hit, windows = rendered("zipper")
    points, seen = synthetic.sample_geometry(hit, windows, grid=32)
    overlaps = synthetic.window_overlaps(points, seen, windows, size=16, n_win=4)  # (V, 16, V, 16)
    assert overlaps.shape == (5, 16, 5, 16) and (overlaps >= 0).all()
    assert overlaps.sum(-1).max() <= 1 + 1e-6  # per (view, window, other view)
    for i in range(5):
        assert (overlaps[i, :, i] == 0).all()
    assert (overlaps.sum(-1).amax(-1) > 0.5).float().mean() > 0.5  # most windows have a counterpart
    candidates = synthetic.candidate_overlaps(overlaps)  # (V, A, (V-1) A), MVAS's order
    assert_close(candidates[2, :, 16:32], overlaps[2, :, 1])  # view 2's second other view is view 1


def test_two_top_cameras_turned_half_a_turn_pair_mirrored_windows():
    """Two cameras straight above a flat plane, one turned 180 degrees: window (r, c) of one sees
    what window (a-1-r, a-1-c) of the other sees, all of it."""
    poses = torch.tensor([[270.0, 90.0], [90.0, 90.0]]).deg2rad()
    windows = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # centred, half-side 1
    u = pixel_centres(R) * 2 - 1  # (R, R, 2) in [-1, 1]: row, column
    plane = torch.stack([torch.stack([u[..., 1], -u[..., 0]], -1),  # camera 0: x = across, y = up
                         torch.stack([-u[..., 1], u[..., 0]], -1)])  # camera 1: turned half a turn
    hit = torch.cat([plane, torch.full((2, R, R, 1), 0.1)], -1).permute(0, 3, 1, 2)  # (2, 3, R, R)
    points = hit.permute(0, 2, 3, 1)
    seen = synthetic.visibility(points, hit, windows, poses)
    assert seen.all()
    overlaps = synthetic.window_overlaps(hit, seen, windows, size=8, n_win=2, poses=poses)  # (2, 4, 2, 4)
    expected = torch.eye(4).flip(1)  # window p <-> window 3 - p
    assert_close(overlaps[0, :, 1], expected)
    assert_close(overlaps[1, :, 0], expected)


def test_stored_geometry_is_what_the_renderer_gives(tmp_path):
    root = synthetic.synthesize(tmp_path, "zipper", n_train=1, n_test_normal=0, n_test_defect=1, resolution=R)
    samples, windows = synthetic.load_geometry(root, "zipper")
    assert sorted(samples) == ["zipper_0001_OK", "zipper_0002_NG_HS"]
    _, _, _, hit, expected_windows = rendered("zipper", role=0)
    points, seen = synthetic.sample_geometry(hit, expected_windows)
    assert_close(windows, expected_windows)
    assert torch.equal(samples["zipper_0001_OK"][0], points) and torch.equal(samples["zipper_0001_OK"][1], seen)


def test_oracle_routing_needs_the_stored_geometry(tmp_path):
    (tmp_path / "realiad_jsons").mkdir()
    with pytest.raises(data.UserError, match="routing 'oracle' needs the geometry"):
        synthetic.load_geometry(tmp_path, "zipper")
    model = MVAD(MVADConfig(backbone="resnet18", weights="none", image_size=64, n_win=(2, 2, 2), blocks=(1, 1, 1),
                            routing="oracle"))
    with pytest.raises(ValueError, match="routing 'oracle'"):
        model(torch.randn(1, 5, 3, 64, 64))


# ----------------------------------------------------------------------------- routing variants


def test_oracle_routing_picks_the_windows_with_the_largest_overlap():
    logits_q, kv = torch.randn(1, 3, 8), torch.randn(1, 6, 8)
    overlap = torch.tensor([[[0.0, 0.5, 0.0, 0.2, 0.0, 0.0],
                             [0.1, 0.0, 0.0, 0.0, 0.3, 0.6],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    logits, index = mvas_routing(logits_q, kv, topk=3, routing="oracle", overlap=overlap)
    assert index[0, 0, :2].tolist() == [1, 3] and index[0, 1].tolist() == [5, 4, 0]
    # where too few windows overlap (or none), the rest are the dot product's best
    rest = [m for m in logits[0, 0].argsort(descending=True).tolist() if m not in (1, 3)]
    assert index[0, 0, 2].item() == rest[0]
    assert index[0, 2].tolist() == logits[0, 2].topk(3).indices.tolist()
    present = torch.tensor([[True, True, True, True, True, False]])  # view of candidate 5 missing
    _, index = mvas_routing(logits_q, kv, topk=2, present=present, routing="oracle", overlap=overlap)
    assert index[0, 1].tolist() == [4, 0]


def test_cosine_routing_is_the_dot_routing_when_every_pooled_feature_has_the_same_norm():
    torch.manual_seed(0)
    q, kv = torch.nn.functional.normalize(torch.randn(8, 9, 16), dim=-1), torch.randn(8, 27, 16)
    kv = 3.0 * torch.nn.functional.normalize(kv, dim=-1)
    assert torch.equal(mvas_routing(q, kv, 4)[1], mvas_routing(q, kv, 4, routing="cosine")[1])
    kv[:, :5] *= 10  # five windows with large features (hubs): the dot product favours them, the cosine not
    dot, cosine = mvas_routing(q, kv, 4)[1], mvas_routing(q, kv, 4, routing="cosine")[1]
    assert torch.equal(cosine, mvas_routing(q, kv / kv.norm(dim=-1, keepdim=True), 4)[1])
    assert (dot < 5).float().mean() > 2 * (cosine < 5).float().mean()


@pytest.fixture(scope="module")
def geometry_split(tmp_path_factory):
    root = synthetic.synthesize(tmp_path_factory.mktemp("geo"), "zipper", n_train=2, n_test_normal=3,
                                n_test_defect=3, resolution=R)
    return root, data.RealIAD(root, "zipper", "test", image_size=64)


def test_random_routing_recall_is_the_stated_chance_level(geometry_split):
    """On a real split's overlaps (scale 2 at 128 px: a = 6, M = 144 candidates), k random windows per
    query window find a best counterpart as often as `routing_quality`'s chance level says."""
    root, split = geometry_split
    dataset = synthetic.WithOverlaps(split, root, sizes=[8], n_win=[6])
    overlap = torch.cat([dataset[i]["overlaps"][0] for i in range(len(dataset))])  # (n V, A, M)
    overlap = overlap.repeat(20, 1, 1)  # 20 random draws
    torch.manual_seed(0)
    index = torch.rand(overlap.shape).argsort(-1)[..., :4]  # (N, A, 4) distinct random candidates
    quality = routing.routing_quality(index, overlap)
    assert quality["queries"] > 1000
    spread = math.sqrt(quality["recall_chance"] * (1 - quality["recall_chance"]) / quality["queries"])
    assert abs(quality["recall"] - quality["recall_chance"]) < 4 * spread
    assert abs(quality["precision"] - quality["precision_chance"]) < 0.02
    best = overlap.argmax(-1, keepdim=True)  # an oracle finds one every time
    assert routing.routing_quality(torch.cat([best, index[..., :3]], -1), overlap)["recall"] == 1.0


def test_routing_labels_keep_runs_that_share_a_folder_name():
    """The study's runs all end in seed<seed>: one label each, so no result overwrites another in routing.json."""
    study = Path("runs/ablations/zipper")
    folders = [study / "mvad" / "seed42", study / "mvad-cosine" / "seed42", study / "mvad" / "seed43"]
    assert routing.run_labels(folders) == ["mvad/seed42", "mvad-cosine/seed42", "mvad/seed43"]
    assert routing.run_labels([Path("runs/mvad_zipper")]) == ["mvad_zipper"]


def test_oracle_mvad_trains_on_the_stored_overlaps(geometry_split):
    root, split = geometry_split
    torch.manual_seed(0)
    model = MVAD(MVADConfig(backbone="resnet18", weights="none", image_size=64, n_win=(4, 2, 2), blocks=(1, 1, 1),
                            routing="oracle"))
    item = synthetic.WithOverlaps(split, root, [16, 8, 4], (4, 2, 2))[0]
    overlaps = [o[None] for o in item["overlaps"]]  # S x (1, V, A, M)
    assert [tuple(o.shape) for o in overlaps] == [(1, 5, 16, 64), (1, 5, 4, 16), (1, 5, 4, 16)]
    loss = model(item["images"][None], overlaps)
    loss.backward()
    assert torch.isfinite(loss) and model.fusion[0].blocks[0].mlp[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- consistency anomalies


def test_every_view_of_a_consistency_defect_has_an_identical_twin_in_a_normal_rendering():
    """A defective sample of zipper_consistency: each view equals, pixel for pixel, the same view of a
    normal sample in one look (same pose, light, noise); one or two views are in the minority's look
    and masked where the looks differ; a normal sample shows one look everywhere."""
    looks = (synthetic.object_maps("zipper", R), synthetic.object_maps("zipper", R, recoloured=True))
    twins = [synthetic.render_sample(maps, None, np.random.default_rng(7))[0] for maps in looks]
    for seed in range(4):
        images, masks, _ = synthetic.render_consistency(looks, True, np.random.default_rng(7),
                                                        np.random.default_rng(seed))
        look = [next(n for n in (0, 1) if np.array_equal(images[v], twins[n][v])) for v in range(5)]  # each view's twin
        minority = np.bincount(look, minlength=2).argmin()
        odd = np.array(look) == minority
        assert 1 <= odd.sum() <= 2
        assert masks[odd].any((1, 2)).all() and not masks[~odd].any()
        normal, empty, _ = synthetic.render_consistency(looks, False, np.random.default_rng(7), np.random.default_rng(seed))
        assert not empty.any() and any(np.array_equal(normal, twin) for twin in twins)


def test_consistency_category_names(tmp_path):
    root = synthetic.synthesize(tmp_path, "eraser_consistency", n_train=1, n_test_normal=1, n_test_defect=2, resolution=R)
    test = data.RealIAD(root, "eraser_consistency", "test", image_size=64)
    labels = {test[i]["sample_id"]: test[i]["label"] for i in range(len(test))}
    assert labels == {"eraser_consistency_0002_OK": 0, "eraser_consistency_0003_NG_CV": 1,
                      "eraser_consistency_0004_NG_CV": 1}
    with pytest.raises(data.UserError, match="valid categories"):
        synthetic.synthesize(tmp_path, "eraser_consistent")


def test_per_camera_patchcore_is_blind_to_views_that_disagree(tmp_path):
    """PatchCore with one memory bank per camera (a per-view detector) on a small zipper_consistency
    split: every view it scores is one that normal samples show, so its sample AUROC stays near
    chance (0.5 +- 0.3 on 8 + 8 test samples), while the same detector finds plain defects (>= 0.9)."""
    from patchcore import PatchCore, PatchCoreConfig
    from metrics import auroc, image_scores, sample_scores

    def sample_auroc(category):
        root = synthetic.synthesize(tmp_path, category, n_train=10, n_test_normal=8, n_test_defect=8, resolution=R)
        split = {s: data.RealIAD(root, category, s, image_size=R) for s in ("train", "test")}
        train = torch.stack([split["train"][i]["images"] for i in range(len(split["train"]))])  # (10, V, 3, R, R)
        torch.manual_seed(0)
        model = PatchCore(PatchCoreConfig(backbone="resnet18", weights="none", image_size=R, width=64,
                                          projection_dim=16)).eval()
        model.encoder.calibrate([train.flatten(0, 1)])
        model.fit(train.split(5), seed=0)
        test = [split["test"][i] for i in range(len(split["test"]))]
        with torch.inference_mode():
            scores = image_scores(model.anomaly_map(torch.stack([item["images"] for item in test])))  # (16, V)
        return auroc(sample_scores(scores), torch.tensor([item["label"] for item in test]))

    consistency, plain = sample_auroc("zipper_consistency"), sample_auroc("zipper")
    print(f"per-camera PatchCore sample AUROC: zipper_consistency {consistency:.2f}, zipper {plain:.2f}")
    assert abs(consistency - 0.5) < 0.3 and plain >= 0.9
