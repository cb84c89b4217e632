"""IDIF: every part on its own (shapes for V = 2, 3, 5; the decoupling identity; masked attention
against attention over the kept tokens; the STN at angle 0 and pi), then the model (the dropped-view
invariance, the cross-view influence, determinism in eval mode, training lowers the loss) and the
error messages."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from data import UserError
from idif import (
    IDIF,
    ConsistencyBottleneck,
    IDIFConfig,
    ImplicitVoxel,
    ViewDecoder,
    distillation_loss,
    masked_attention,
    masked_view_mean,
    rotate_and_project,
    sample_view_mask,
    sine_positional_encoding,
)

SIZE = 64  # input side in the tests: f_E / f_s grid 4x4, teacher scales 16, 8, 4
CHANNELS = (64, 128, 256)  # ResNet18 stages 1-3
C = CHANNELS[-1]


def small_model(views: int, **overrides) -> IDIF:
    torch.manual_seed(0)
    return IDIF(IDIFConfig(image_size=SIZE, num_views=views, weights="none", **overrides))


def views_batch(batch: int, views: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, views, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- helpers


def test_sine_positional_encoding_shapes_and_cells_differ():
    pos3d = sine_positional_encoding((4, 8, 8), C)
    pos2d = sine_positional_encoding((2, 2), C)
    assert pos3d.shape == (256, C) and pos2d.shape == (4, C)
    assert torch.cdist(pos3d, pos3d).add(torch.eye(256)).min() > 0.1  # every cell has its own code


def test_masked_view_mean_averages_present_views_only():
    x = torch.randn(2, 3, 4, 5)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert_close(masked_view_mean(x, mask), torch.stack([(x[0, 0] + x[0, 2]) / 2, x[1, 1]]))


def test_masked_attention_equals_attention_over_kept_tokens_only():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 6, 8), torch.randn(3, 4, 10, 8), torch.randn(3, 4, 10, 8)
    mask = torch.rand(3, 10) > 0.4
    mask[:, 0] = True
    out = masked_attention(q, k, v, mask)
    for i in range(3):
        kept = mask[i]
        expected = F.scaled_dot_product_attention(q[i], k[i][:, kept], v[i][:, kept])
        assert_close(out[i], expected)
    assert_close(masked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_masked_attention_fully_masked_sample_gives_zero_and_finite_gradients():
    q = torch.randn(2, 2, 5, 4, requires_grad=True)
    k, v = torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    out = masked_attention(q, k, v, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("views", [2, 5])
def test_view_dropout_keeps_a_view_and_drops_at_rate_p(views):
    torch.manual_seed(0)
    p = 0.2
    mask = sample_view_mask(20000, views, p)
    assert mask.shape == (20000, views) and mask.dtype == torch.bool
    assert mask.any(dim=1).all()
    expected = p - p ** views / views  # a sample left with no view gets one back
    assert abs((~mask).float().mean().item() - expected) < 0.01
    assert sample_view_mask(10, views, 0.0).all()


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("views", [2, 3, 5])
def test_consistency_bottleneck_shapes_and_decoupling(views):
    torch.manual_seed(0)
    cb = ConsistencyBottleneck(C, latent=16, kl_weight=0.5)
    f_E = torch.randn(2, views, C, 4, 4)
    mask = torch.ones(2, views, dtype=torch.bool)
    f_c, f_s, (c, mu, log_var) = cb(f_E, mask)
    assert f_c.shape == (2, C, 4, 4) and f_s.shape == (2, views, C, 4, 4)
    assert c.shape == mu.shape == log_var.shape == (2, 16, 4, 4)
    assert_close(f_s + f_c[:, None], f_E)  # f_s = f_E - f_c
    ib = cb.ib_loss(f_E, mask, (c, mu, log_var))
    assert ib.dim() == 0 and torch.isfinite(ib)


def test_consistency_bottleneck_samples_in_training_and_uses_mu_in_eval():
    torch.manual_seed(0)
    cb = ConsistencyBottleneck(C, latent=16, kl_weight=0.0)
    f_E, mask = torch.randn(2, 3, C, 4, 4), torch.ones(2, 3, dtype=torch.bool)
    assert not torch.equal(cb(f_E, mask)[0], cb(f_E, mask)[0])  # f_c = mu + Sigma * eps
    cb.eval()
    f_c, _, (c, mu, _) = cb(f_E, mask)
    assert torch.equal(c, mu) and torch.equal(f_c, cb(f_E, mask)[0])


def test_consistency_bottleneck_ignores_absent_views():
    torch.manual_seed(0)
    cb = ConsistencyBottleneck(C, latent=16, kl_weight=0.0).eval()
    f_E = torch.randn(2, 3, C, 4, 4)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    changed = f_E.clone()
    changed[0, 1] += 5.0
    assert torch.equal(cb(f_E, mask)[0], cb(changed, mask)[0])
    ib_before = cb.ib_loss(f_E, mask, cb(f_E, mask)[2])
    assert torch.equal(ib_before, cb.ib_loss(changed, mask, cb(changed, mask)[2]))


@pytest.mark.parametrize("views", [2, 3, 5])
def test_implicit_voxel_shapes_and_masked_views(views):
    torch.manual_seed(0)
    ivc = ImplicitVoxel(C, (2, 4, 4), (2, 2), views, patch_size=2, blocks=2, heads=8)
    f_s = torch.randn(2, views, C, 4, 4)
    mask = torch.ones(2, views, dtype=torch.bool)
    mask[0, -1] = False
    voxel = ivc(f_s, mask)
    assert voxel.shape == (2, C, 2, 4, 4)
    changed = f_s.clone()
    changed[0, -1] += 3.0  # a dropped view: no influence
    assert torch.equal(ivc(changed, mask), voxel)
    changed[0, 0] += 3.0  # a kept view: the voxel changes
    assert not torch.allclose(ivc(changed, mask)[0], voxel[0])


@pytest.mark.parametrize("views", [2, 3, 5])
def test_stn_at_angle_zero_is_the_depth_mean_then_upsampled(views):
    voxel = torch.randn(2, 8, 4, 6, 6)
    projected = rotate_and_project(voxel, torch.zeros(views), (12, 12))
    expected = F.interpolate(voxel.mean(dim=2), size=(12, 12), mode="bilinear", align_corners=False)
    assert projected.shape == (2, views, 8, 12, 12)
    for v in range(views):
        assert_close(projected[:, v], expected, atol=1e-5, rtol=1e-5)


def test_stn_rotates_about_the_height_axis():
    voxel = torch.randn(1, 8, 4, 6, 6)
    half_turn = rotate_and_project(voxel, torch.tensor([math.pi]), (6, 6))[:, 0]
    assert_close(half_turn, voxel.mean(dim=2).flip(-1), atol=1e-5, rtol=1e-5)  # x -> -x, z -> -z


def test_view_decoder_outputs_the_teacher_scales():
    out = ViewDecoder(CHANNELS)(torch.randn(2, C, 4, 4))
    assert [tuple(f.shape) for f in out] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]


def test_distillation_loss_values_and_dropped_views():
    tea = [torch.randn(2, 3, c, 4, 4) for c in CHANNELS]
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert_close(distillation_loss(tea, tea, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    opposite = distillation_loss(tea, [-t for t in tea], mask)  # 1 - cos = 2 everywhere
    assert_close(opposite, torch.tensor(2.0 * 3 * (2 + 3) / 2))  # 3 scales, kept views 2 and 3
    stu = [t + torch.randn_like(t) for t in tea]
    changed = [s.clone() for s in stu]
    for s in changed:
        s[0, 1] = torch.randn_like(s[0, 1])
    assert torch.equal(distillation_loss(tea, stu, mask), distillation_loss(tea, changed, mask))


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("views", [2, 3, 5])
def test_model_shapes_and_finite_loss_parts(views):
    model = small_model(views)
    images = views_batch(2, views)
    parts = model.loss_parts(images, images + 0.1 * torch.randn_like(images))
    assert set(parts) == {"loss", "distill", "ib"}
    assert all(p.dim() == 0 and torch.isfinite(p) for p in parts.values())
    f_tea, f_stu, f_E, _ = model.features(images, images, torch.ones(2, views, dtype=torch.bool))
    for tea, stu, channels, side in zip(f_tea, f_stu, CHANNELS, (16, 8, 4)):
        assert tea.shape == stu.shape == (2, views, channels, side, side)
    assert f_E.shape == (2, views, C, 4, 4)
    maps = model.eval().anomaly_map(images)
    assert maps.shape == (2, views, SIZE, SIZE) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps > 0).all()


def test_absent_view_has_no_influence_and_present_views_do():
    model = small_model(3).eval()
    images = views_batch(2, 3)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    maps = model.anomaly_map(images, mask)
    assert torch.equal(maps[0, 1], torch.zeros(SIZE, SIZE))  # an absent view's map is zero

    changed = images.clone()
    changed[0, 1] = torch.randn(3, SIZE, SIZE)  # absent view of sample 0
    assert torch.equal(model.anomaly_map(changed, mask), maps)

    changed = images.clone()
    changed[0, 2] += 0.5 * torch.randn(3, SIZE, SIZE)  # present view of sample 0
    after = model.anomaly_map(changed, mask)
    assert (after[0, 0] - maps[0, 0]).abs().max() > 1e-4  # fusion carries view 2 into view 0's map
    assert torch.equal(after[1], maps[1])  # never into another sample


def test_eval_mode_is_deterministic():
    model = small_model(2).eval()
    images = views_batch(2, 2)
    assert torch.equal(model.anomaly_map(images), model.anomaly_map(images))
    assert torch.equal(model(images, images), model(images, images))


def test_forward_is_the_loss_and_every_parameter_takes_part():
    model = small_model(3)
    images = views_batch(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.manual_seed(5)
    loss = model(images, images, mask)
    torch.manual_seed(5)
    assert torch.equal(loss, model.loss_parts(images, images, mask)["loss"])
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert all(not n.startswith("teacher") for n, _ in trainable)


def test_a_few_optimiser_steps_lower_the_loss():
    model = small_model(2)
    images = views_batch(2, 2)
    corrupted = images + 0.2 * torch.randn_like(images)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(images, corrupted).item()

    before = eval_loss()
    model.train()
    for _ in range(5):
        loss = model(images, corrupted)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < 0.7 * before  # measured: 0.42 after 5 steps


# ----------------------------------------------------------------------------- error messages


def test_error_image_size_not_a_multiple_of_the_token_stride():
    with pytest.raises(UserError, match=r"image_size 100 must be a multiple of 32 for IDIF"):
        IDIF(IDIFConfig(image_size=100, weights="none"))


def test_error_view_dropout_out_of_range():
    with pytest.raises(UserError, match=r"view_dropout 1.0 must be in \[0, 1\)"):
        IDIF(IDIFConfig(image_size=SIZE, view_dropout=1.0, weights="none"))


def test_error_images_do_not_fit_the_model():
    model = small_model(3)
    with pytest.raises(UserError, match=r"images of shape \(1, 2, 3, 64, 64\); it was built for "
                                         r"\(B, 3, 3, 64, 64\) \(IDIFConfig num_views=3, image_size=64\)"):
        model.eval().anomaly_map(views_batch(1, 2))
    images = views_batch(1, 3)
    with pytest.raises(UserError, match=r"corrupted views of shape \(1, 3, 3, 32, 32\) must match"):
        model(images, images[..., :32, :32])


def test_error_bad_view_mask():
    model = small_model(2).eval()
    images = views_batch(2, 2)
    with pytest.raises(UserError, match=r"view_mask must be a bool tensor of shape \(2, 2\)"):
        model.anomaly_map(images, torch.ones(2, 2))
    with pytest.raises(UserError, match=r"every view of a sample absent; IDIF needs at least one"):
        model.anomaly_map(images, torch.tensor([[True, False], [False, False]]))
