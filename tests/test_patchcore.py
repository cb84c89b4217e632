"""PatchCore: the feature pooling, the greedy coreset against a brute-force k-center, the chunked
nearest-neighbour search against a brute-force distance, the memory bank (a subset of the training
patches, per camera or shared), a pasted defect scored above normal views, checkpoints. CPU, tiny
configs (ResNet18 at 64 px: stage 2 is 8x8)."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mvad import gaussian_blur
from patchcore import (PatchCore, PatchCoreConfig, channel_pool, coreset_indices, greedy_coreset,
                       nearest_neighbour_distance, patch_features)

SIZE = 64


def tiny_model(**overrides) -> PatchCore:
    torch.manual_seed(0)
    cfg = dict(backbone="resnet18", weights="none", image_size=SIZE, width=64, projection_dim=16)
    return PatchCore(PatchCoreConfig(**{**cfg, **overrides})).eval()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every squared L2 distance between the rows of a (Q, D) and b (M, D), in float64, written out."""
    return ((a[:, None].double() - b[None].double()) ** 2).sum(dim=-1)  # (Q, M)


def fitted(train: torch.Tensor, **overrides) -> PatchCore:
    model = tiny_model(**overrides)
    model.encoder.calibrate([train.flatten(0, 1)])  # as train.py does for a random-init encoder
    model.fit(train.split(2), seed=0)
    return model


# ----------------------------------------------------------------------------- features


def test_channel_pool_repeats_or_averages_channels():
    x = torch.randn(2, 6, 3, 5)
    assert_close(channel_pool(x, 12), x.repeat_interleave(2, dim=1))
    assert_close(channel_pool(x, 3), (x[:, 0::2] + x[:, 1::2]) / 2)


def test_patch_features_average_3x3_and_give_each_stage_half_the_width():
    stage2, stage3 = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    out = patch_features(stage2, stage3, patch_size=3, width=16)
    assert out.shape == (2, 8, 8, 16)
    # a 3x3 mean with zero padding, written out
    local2 = sum(F.pad(stage2, (1, 1, 1, 1))[:, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9
    assert_close(out[..., :8], local2.permute(0, 2, 3, 1))  # stage 2's 8 channels, unchanged
    local3 = F.interpolate(F.avg_pool2d(stage3, 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False)
    assert_close(out[..., 8:], ((local3[:, 0::2] + local3[:, 1::2]) / 2).permute(0, 2, 3, 1))  # pairs of stage 3


# ----------------------------------------------------------------------------- coreset and search


def greedy_reference(points: torch.Tensor, k: int, first: int) -> list[int]:
    """Brute-force k-center: at each step the point whose distance to the selected set (the minimum
    over the selected points, from the full distance matrix) is largest."""
    distances = torch.cdist(points, points)
    chosen = [first]
    for _ in range(k - 1):
        chosen.append(int(distances[:, chosen].min(dim=1).values.argmax()))
    return chosen


def test_greedy_coreset_picks_the_farthest_point_at_each_step():
    points = torch.randn(60, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chosen = greedy_coreset(points, 12, torch.Generator().manual_seed(3))
    assert chosen.tolist() == greedy_reference(points, 12, int(chosen[0]))
    assert len(set(chosen.tolist())) == 12
    # the covering radius shrinks as points are added
    radius = [torch.cdist(points, points[chosen[:i]]).min(dim=1).values.max() for i in range(1, 13)]
    assert all(b <= a for a, b in zip(radius, radius[1:])) and radius[-1] < radius[0]


def test_coreset_indices_size_and_seed():
    features = torch.randn(200, 32)
    picks = coreset_indices(features, 0.1, 8, torch.Generator().manual_seed(0))
    assert picks.shape == (20,) and len(set(picks.tolist())) == 20 and picks.max() < 200
    assert torch.equal(picks, coreset_indices(features, 0.1, 8, torch.Generator().manual_seed(0)))
    assert not torch.equal(picks, coreset_indices(features, 0.1, 8, torch.Generator().manual_seed(1)))
    assert torch.equal(coreset_indices(features, 1.0, 8), torch.arange(200))
    assert coreset_indices(features, 0.001, 8).shape == (1,)  # at least one entry


@pytest.mark.parametrize("chunk", [1, 50, 2**24])
def test_nearest_neighbour_distance_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 6, generator=g), torch.randn(23, 6, generator=g)
    brute = squared_distances(queries, bank).min(dim=1).values.float()  # (37,)
    assert_close(nearest_neighbour_distance(queries, bank, chunk=chunk), brute, rtol=1e-5, atol=1e-5)
    assert_close(nearest_neighbour_distance(bank, bank, chunk=chunk), torch.zeros(23), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("per_camera", [False, True])
def test_memory_bank_is_a_coreset_of_the_training_patches(zipper, per_camera):
    train, _ = zipper
    model = fitted(train, per_camera=per_camera)
    patches = model.embed(train).flatten(2, 3)  # (S, V, P, D)
    S, V, P, D = patches.shape
    bank = model.memory_bank
    if per_camera:  # camera v's bank holds 10% of camera v's patches
        assert bank.shape == (V, int(0.1 * S * P), D)
        pools = [patches[:, v].reshape(-1, D) for v in range(V)]
    else:
        assert bank.shape == (1, int(0.1 * S * V * P), D)
        pools = [patches.reshape(-1, D)]
    for entries, pool in zip(bank, pools):
        nearest = squared_distances(entries, pool).min(dim=1).values  # every entry is a training patch
        assert nearest.max() <= 1e-8 * pool.square().sum(dim=1).max()
        assert torch.unique(entries, dim=0).shape[0] == entries.shape[0]  # each one once


@pytest.mark.parametrize("per_camera", [False, True])
def test_anomaly_map_is_the_upsampled_smoothed_nearest_distance(zipper, per_camera):
    train, test = zipper
    model = fitted(train, per_camera=per_camera)
    features = model.embed(test)  # (B, V, h, w, D)
    B, V, h, w, D = features.shape
    banks = model.memory_bank if per_camera else model.memory_bank.expand(V, -1, -1)
    scores = torch.stack([squared_distances(features[:, v].reshape(-1, D), banks[v]).min(dim=1).values
                          .view(B, h, w) for v in range(V)], dim=1).float()  # brute force, view v in bank v
    expected = gaussian_blur(F.interpolate(scores.flatten(0, 1)[:, None], size=(SIZE, SIZE), mode="bilinear"
                                           )[:, 0], 4.0).view(B, V, SIZE, SIZE)
    maps = model.anomaly_map(test)
    assert_close(maps, expected, rtol=1e-4, atol=1e-4)
    mask = torch.tensor([[True, False, True, True, True], [True] * 5])
    masked = model.anomaly_map(test, mask)
    assert masked[0, 1].abs().max() == 0 and torch.equal(masked[1], maps[1])


def test_a_pasted_defect_scores_above_the_normal_views(zipper, pasted_defect_check):
    train, test = zipper
    pasted_defect_check(fitted(train).anomaly_map, test)


def test_state_dict_round_trip_and_errors(zipper):
    train, test = zipper
    model = fitted(train, per_camera=True)
    fresh = tiny_model(per_camera=True)
    with pytest.raises(ValueError, match="memory bank is empty: fit it first"):
        fresh.anomaly_map(test)
    fresh.load_state_dict(model.state_dict())  # the empty bank takes the stored bank's size
    assert_close(fresh.anomaly_map(test), model.anomaly_map(test), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one memory bank per camera for 5 cameras; the images have 3"):
        model.anomaly_map(test[:, :3])
    with pytest.raises(ValueError, match=r"coreset_fraction 0.0 must be in \(0, 1\]"):
        tiny_model(coreset_fraction=0.0)
    with pytest.raises(ValueError, match="patch_size 2 must be odd"):
        tiny_model(patch_size=2)
    with pytest.raises(ValueError, match="image_size 72 must be a multiple of 16"):
        tiny_model(image_size=72)
