"""UniAD: the neighbour mask against the official loop, masked attention that ignores the neighbours, the
jitter (its size, training only), a reconstruction that improves with training, a pasted defect scored above
normal views, the parameter count of the official configuration, the frozen EfficientNet-B4's stages and
weights, one-line config errors. CPU, tiny configs (64 px: a 4 x 4 grid)."""
import pytest
import torch
import torchvision
from torch.testing import assert_close

import train
from runtime import place
from uniad import (LayerWiseQueryDecoderLayer, NeighborMaskedEncoderLayer, UniAD, UniADConfig, feature_jitter,
                   neighbor_mask)

SIZE = 64
TINY = dict(weights="none", image_size=SIZE, hidden_dim=32, num_heads=4, encoder_layers=1, decoder_layers=1,
            ffn_dim=64, neighbor_size=3)


def tiny_model(**overrides) -> UniAD:
    """Channels-last, as train.py places it (EfficientNet's depthwise convolutions are many times faster so)."""
    torch.manual_seed(0)
    return place(UniAD(UniADConfig(**{**TINY, **overrides})), "cpu")


def official_mask(h: int, w: int, k: int) -> torch.Tensor:
    """The official generate_mask written as it is, a loop over the cells clearing a clipped window."""
    visible = torch.ones(h, w, h, w, dtype=torch.bool)
    for y in range(h):
        for x in range(w):
            visible[y, x, max(y - k // 2, 0):min(y + k // 2 + 1, h), max(x - k // 2, 0):min(x + k // 2 + 1, w)] = False
    return ~visible.view(h * w, h * w)


@pytest.mark.parametrize("h, w, k", [(4, 4, 3), (3, 5, 1), (5, 3, 3), (6, 7, 5)])
def test_neighbor_mask_equals_the_official_loop(h, w, k):
    mask = neighbor_mask(h, w, k)
    assert torch.equal(mask, official_mask(h, w, k))
    assert mask.diagonal().all() and torch.equal(mask, mask.T)  # each cell hides itself; symmetric
    assert mask[0].sum() == (k // 2 + 1) ** 2  # a corner hides its window clipped to the grid


def perturbed_output(layer, call, x: torch.Tensor, cell: int) -> torch.Tensor:
    """call(layer, x) at cell 5 of a 4 x 4 grid after adding noise to the input at `cell`."""
    changed = x.clone()
    changed[:, cell] += torch.randn(changed.shape[-1], generator=torch.Generator().manual_seed(cell))
    return call(layer, changed)[:, 5]


@pytest.mark.parametrize("which", ["encoder", "decoder memory", "decoder previous"])
def test_a_masked_query_attends_to_no_key_inside_its_neighbourhood(which):
    """Query cell 5 = (1, 1) of a 4 x 4 grid, k = 3: its output does not move when a key of its 3 x 3
    neighbourhood (cells 0-2, 4, 6, 8-10) changes, and moves when one outside (cells 3, 15) does."""
    torch.manual_seed(0)
    D, mask, pos = 8, neighbor_mask(4, 4, 3), torch.randn(16, 8)
    if which == "encoder":
        layer = NeighborMaskedEncoderLayer(D, 2, 16, 0.0).eval()
        call = lambda layer, x: layer(x, pos, mask)  # noqa: E731
    else:
        layer, fixed = LayerWiseQueryDecoderLayer(D, 16, 2, 16, 0.0).eval(), torch.randn(1, 16, D)
        call = ((lambda layer, x: layer(fixed, x, pos, mask)) if which == "decoder memory"  # noqa: E731
                else (lambda layer, x: layer(x, fixed, pos, mask)))
    x = torch.randn(1, 16, D)
    reference = call(layer, x)[:, 5]
    for cell in (0, 1, 2, 4, 6, 8, 9, 10) + ((5,) if which != "encoder" else ()):  # the encoder adds x itself
        assert_close(perturbed_output(layer, call, x, cell), reference, rtol=0, atol=1e-6)
    for cell in (3, 15):
        assert (perturbed_output(layer, call, x, cell) - reference).abs().max() > 1e-3


def test_feature_jitter_scale_and_probability():
    tokens = torch.randn(4, 500, 272) * torch.rand(4, 500, 1) * 3  # tokens of different norms
    torch.manual_seed(0)
    noise = feature_jitter(tokens, 20.0, 1.0) - tokens
    expected = 20.0 * tokens.norm(dim=-1) / 272  # the official std per token: scale * ||f|| / C
    ratio = noise.std(dim=-1) / expected  # (4, 500), each from 272 draws
    assert abs(ratio.mean().item() - 1) < 0.01 and ratio.std() < 0.1
    assert torch.equal(feature_jitter(tokens, 20.0, 0.0), tokens)
    torch.manual_seed(1)
    jittered = sum(not torch.equal(feature_jitter(tokens[:1, :2], 1.0, 0.3), tokens[:1, :2]) for _ in range(400))
    assert 90 < jittered < 150  # p = 0.3 of 400 batches, +-4 standard deviations


def test_jittering_only_in_training():
    model = tiny_model(dropout=0.0)
    features = torch.randn(3, 272, 4, 4)
    model.eval()
    assert torch.equal(model.reconstruct(features), model.reconstruct(features))
    model.train()
    assert not torch.equal(model.reconstruct(features), model.reconstruct(features))
    quiet = tiny_model(dropout=0.0, jitter_prob=0.0).train()
    assert torch.equal(quiet.reconstruct(features), quiet.reconstruct(features))


@pytest.fixture(scope="module")
def trained(zipper):
    """(the losses on the 4 training samples before and after 8 of train.py's steps at rate 1e-2, in eval
    mode: no jitter, no dropout; the trained tiny UniAD), after train.py's calibration."""
    train_split, _ = zipper
    model = tiny_model()
    model.backbone.calibrate([train_split.flatten(0, 1)])
    optimizer = train.build_optimizer(model, model.cfg, 1e-2)
    with torch.no_grad():
        before = float(model.eval()(train_split))
    model.train()
    for _ in range(8):
        train.train_step(model, optimizer, {"images": train_split}, "uniad", torch.device("cpu"), model.cfg.clip)
    with torch.no_grad():
        after = float(model.eval()(train_split))
    return before, after, model


def test_reconstruction_of_a_training_batch_improves(trained):
    before, after, _ = trained
    assert after < 0.9 * before, (before, after)


def test_a_pasted_defect_scores_above_the_normal_views(zipper, trained, pasted_defect_check):
    pasted_defect_check(trained[2].anomaly_map, zipper[1], slack=16)  # 16 px: one cell of the 4 x 4 grid


def test_parameters_of_the_official_configuration():
    model = UniAD(UniADConfig(weights="none"))  # 224 px: the 14 x 14 grid, D = 256, 4 + 4 layers
    C, D, F, T = 272, 256, 1024, 196
    attention = 4 * D * D + 4 * D  # q, k, v and output projections with biases
    encoder_layer = attention + (D * F + F + F * D + D) + 2 * 2 * D
    decoder_layer = T * D + 2 * attention + (D * F + F + F * D + D) + 3 * 2 * D
    expected = (C * D + D) + 2 * 14 * D // 2 + 4 * encoder_layer + 4 * decoder_layer + 2 * D + (D * C + C)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == 7_717_392
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in torchvision.models.efficientnet_b4().features[:6].parameters())


def test_stages_map_shapes_and_missing_views():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 3, SIZE, SIZE)
    stages = model.backbone(images.flatten(0, 1))
    assert [tuple(s.shape) for s in stages] == [(6, 24, 32, 32), (6, 32, 16, 16), (6, 56, 8, 8), (6, 160, 4, 4)]
    assert model.features(images).shape == (6, 272, 4, 4)
    maps = model.anomaly_map(images)
    assert maps.shape == (2, 3, SIZE, SIZE) and (maps > 0).all()
    masked = model.anomaly_map(images, torch.tensor([[True, False, True], [True, True, True]]))
    assert masked[0, 1].abs().max() == 0 and torch.equal(masked[1], maps[1])
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone.training


def test_imagenet_file_named_and_read(offline_hub, tmp_path):
    with pytest.raises(ValueError) as error:
        tiny_model(weights="imagenet")
    assert "efficientnet_b4_rwightman-23ab8bcd.pth" in str(error.value) and str(offline_hub) in str(error.value)
    torch.manual_seed(3)
    reference = torchvision.models.efficientnet_b4()
    torch.save(reference.state_dict(), tmp_path / "b4.pth")
    model = tiny_model(weights=str(tmp_path / "b4.pth"))
    assert not model.backbone.needs_calibration
    assert_close(model.backbone.features[5][0].block[0][0].weight, reference.features[5][0].block[0][0].weight)


@pytest.mark.parametrize("field, value, message", [
    ("image_size", 72, "image_size 72 must be a multiple of 16"),
    ("num_heads", 5, "num_heads 5 must be a divisor of hidden_dim 32"),
    ("neighbor_size", 7, "neighbor_size 7 must be odd and at most 3 at image_size 64"),
    ("neighbor_size", 2, "neighbor_size 2 must be odd"),
    ("jitter_prob", 1.5, r"jitter_prob 1.5 must be in \[0, 1\]"),
    ("clip", 0.0, "clip 0.0 must be positive; official: 0.1"),
])
def test_bad_config_values_are_one_line_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message) as error:
        UniADConfig(**{**TINY, field: value})
    assert "\n" not in str(error.value)
