"""IDIF: every part on its own (shapes for V = 2, 3, 5; the decoupling identity; L_IB's gradient
reaching f_c; masked attention against attention over the kept tokens; the STN's turns), then the
model (the dropped-view invariance in training and at test time, the cross-view influence,
determinism in eval mode, training lowers the loss, the component switches) and the error messages."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close


from idif import (
    IDIF,
    ConsistencyBottleneck,
    STN,
    IDIFConfig,
    ImplicitVoxel,
    ViewDecoder,
    distillation_loss,
    kl_divergence,
    masked_attention,
    masked_view_mean,
    on_kept_rows,
    rotate_and_project,
    sample_view_mask,
    grid_sine_encoding,
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


def test_grid_sine_encoding_shapes_and_cells_differ():
    pos3d = grid_sine_encoding((4, 8, 8), C)
    pos2d = grid_sine_encoding((2, 2), C)
    assert pos3d.shape == (256, C) and pos2d.shape == (4, C)
    assert torch.cdist(pos3d, pos3d).add(torch.eye(256)).min() > 0.1  # every cell has its own code


def test_masked_view_mean_averages_present_views_only():
    x = torch.randn(2, 3, 4, 5)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    x[0, 1] = float("nan")  # an absent view cannot leak, not even a NaN
    assert_close(masked_view_mean(x, mask), torch.stack([(x[0, 0] + x[0, 2]) / 2, x[1, 1]]))


def test_on_kept_rows_computes_the_kept_rows_only_and_zeros_the_others():
    x = torch.randn(2, 3, 4)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    x[~keep] = float("nan")
    seen = []
    out = on_kept_rows(lambda rows: seen.append(rows.shape[0]) or [2 * rows, rows + 1], x, keep)
    assert seen == [3]
    assert_close(out[0][keep], 2 * x[keep]) and assert_close(out[1][keep], x[keep] + 1)
    assert torch.equal(out[0][~keep], torch.zeros(3, 4)) and torch.equal(out[1][~keep], torch.zeros(3, 4))
    none_kept = on_kept_rows(lambda rows: rows * 2, x[:, 0], torch.zeros(2, dtype=torch.bool))
    assert torch.equal(none_kept, torch.zeros(2, 4))


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
    f_s, latent = cb(f_E, mask)
    f_c = latent.f_c
    assert f_c.shape == (2, C, 4, 4) and f_s.shape == (2, views, C, 4, 4)
    assert latent.c.shape == latent.mu.shape == latent.log_var.shape == (2, 16, 4, 4)
    assert_close(f_s + f_c[:, None], f_E)  # f_s = f_E - f_c
    ib, kl = cb.ib_loss(f_E, mask, latent)
    assert_close(kl, kl_divergence(latent.mu, latent.log_var))
    assert_close(ib, f_s.pow(2).mean(dim=(2, 3, 4)).mean() + 0.5 * kl)  # L_IB = mean |f_E - f_c|^2 + 0.5 KL


def test_ib_loss_gradient_reaches_the_subtracted_f_c():
    torch.manual_seed(0)
    cb = ConsistencyBottleneck(C, latent=16, kl_weight=0.0)
    f_E = torch.randn(2, 3, C, 4, 4)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    _, latent = cb(f_E, mask)
    f_c = latent.f_c
    (grad,) = torch.autograd.grad(cb.ib_loss(f_E, mask, latent)[0], f_c)
    # d/df_c of mean_b mean_{kept v} mean |f_E^(v) - f_c|^2: f_c is pulled to the kept views' mean
    expected = -2 * (masked_view_mean(f_E, mask) - f_c) / f_c.numel()
    assert_close(grad, expected)
    assert grad.abs().sum() > 0


def test_kl_divergence_matches_torch_distributions():
    mu, log_var = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * log_var).exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).mean()
    assert_close(kl_divergence(mu, log_var), expected)


def test_consistency_bottleneck_samples_in_training_and_uses_mu_in_eval():
    torch.manual_seed(0)
    cb = ConsistencyBottleneck(C, latent=16, kl_weight=0.0)
    f_E, mask = torch.randn(2, 3, C, 4, 4), torch.ones(2, 3, dtype=torch.bool)
    assert not torch.equal(cb(f_E, mask)[1].f_c, cb(f_E, mask)[1].f_c)  # f_c = mu + Sigma * eps
    cb.eval()
    _, latent = cb(f_E, mask)
    assert torch.equal(latent.c, latent.mu) and torch.equal(latent.f_c, cb(f_E, mask)[1].f_c)


def test_consistency_bottleneck_ignores_absent_views():
    torch.manual_seed(0)
    cb = ConsistencyBottleneck(C, latent=16, kl_weight=0.0).eval()
    f_E = torch.randn(2, 3, C, 4, 4)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    changed = f_E.clone()
    changed[0, 1] = float("nan")
    assert torch.equal(cb(f_E, mask)[1].f_c, cb(changed, mask)[1].f_c)
    assert torch.equal(cb(changed, mask)[0][0, 1], torch.zeros(C, 4, 4))  # a dropped view's f_s is zero
    ib_before = cb.ib_loss(f_E, mask, cb(f_E, mask)[1])[0]
    assert torch.equal(ib_before, cb.ib_loss(changed, mask, cb(changed, mask)[1])[0])


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
def test_stn_at_theta_zero_is_the_depth_mean_then_upsampled(views):
    voxel = torch.randn(2, 8, 4, 6, 6)
    projected = rotate_and_project(voxel, torch.zeros(views), (12, 12))
    expected = F.interpolate(voxel.mean(dim=2), size=(12, 12), mode="bilinear", align_corners=False)
    assert projected.shape == (2, views, 8, 12, 12)
    for v in range(views):
        assert_close(projected[:, v], expected, atol=1e-5, rtol=1e-5)


def test_stn_turns_about_the_height_axis():
    voxel = torch.randn(1, 8, 6, 6, 6)  # (B, C, D, Hv, Wv), cubic: turned cell centres land on cell centres
    turns = rotate_and_project(voxel, torch.tensor([math.pi, math.pi / 2]), (6, 6))  # (B, V, C, h, w)
    assert_close(turns[:, 0], voxel.mean(dim=2).flip(-1), atol=1e-5, rtol=1e-5)  # x -> -x, z -> -z
    # a quarter turn: the view looks along the voxel's width; its columns run along the depth axis
    assert_close(turns[:, 1], voxel.mean(dim=4).transpose(-2, -1), atol=1e-5, rtol=1e-5)
    assert_close(STN(4).theta.detach(), torch.tensor([0.0, 0.5, 1.0, 1.5]) * math.pi)  # evenly over 2 pi


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
    assert set(parts) == {"loss", "distill", "ib", "kl", "sigma"}
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
    changed[0, 1] = float("nan")  # absent view of sample 0
    assert torch.equal(model.anomaly_map(changed, mask), maps)

    changed = images.clone()
    changed[0, 2] += 0.5 * torch.randn(3, SIZE, SIZE)  # present view of sample 0
    after = model.anomaly_map(changed, mask)
    assert (after[0, 0] - maps[0, 0]).abs().max() > 1e-4  # fusion carries view 2 into view 0's map
    assert torch.equal(after[1], maps[1])  # never into another sample


def test_dropped_view_changes_no_loss_gradient_or_statistic_in_training():
    model = small_model(3)  # training mode: BatchNorm on batch statistics
    images, corrupted = views_batch(2, 3), views_batch(2, 3, seed=2)
    mask = torch.tensor([[True, False, True], [False, True, True]])

    def step(model, images, corrupted):
        torch.manual_seed(5)  # the CB's noise
        loss = model(images, corrupted, mask)["loss"]
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    other = copy.deepcopy(model)
    loss, grads = step(model, images, corrupted)
    images, corrupted = images.clone(), corrupted.clone()
    images[0, 1], corrupted[0, 1] = float("nan"), float("nan")  # the dropped views' pixels
    images[1, 0], corrupted[1, 0] = torch.randn(3, SIZE, SIZE), torch.randn(3, SIZE, SIZE)
    other_loss, other_grads = step(other, images, corrupted)
    assert_close(other_loss, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        assert_close(other_grads[name], grad, atol=1e-6, rtol=0, msg=name)
    for (name, a), b in zip(model.named_buffers(), other.buffers()):
        assert_close(b, a, atol=1e-6, rtol=0, msg=name)  # BatchNorm running statistics


def test_eval_mode_is_deterministic():
    model = small_model(2).eval()
    images = views_batch(2, 2)
    assert torch.equal(model.anomaly_map(images), model.anomaly_map(images))
    assert torch.equal(model(images, images)["loss"], model(images, images)["loss"])


def test_forward_is_the_loss_and_every_parameter_takes_part():
    model = small_model(3)
    images = views_batch(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.manual_seed(5)
    loss = model(images, images, mask)["loss"]
    torch.manual_seed(5)
    assert torch.equal(loss, model.loss_parts(images, images, mask)["loss"])
    loss.backward()  # view 1 is dropped in both samples: its decoder runs on zero rows
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
            return model(images, corrupted)["loss"].item()

    before = eval_loss()
    model.train()
    for _ in range(5):
        loss = model(images, corrupted)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < 0.7 * before  # measured: 0.42 after 5 steps


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("bottleneck,fusion", [(False, True), (True, False), (False, False)])
def test_switched_off_parts_do_not_exist_and_the_variant_trains(bottleneck, fusion):
    views = 3
    full, model = small_model(views), small_model(views, bottleneck=bottleneck, fusion=fusion)
    cfg = full.cfg
    removed = 0 if bottleneck else parameter_count(ConsistencyBottleneck(C, cfg.latent_channels, 0.0))
    if not fusion:
        grid = SIZE // (16 * cfg.patch_size)
        removed += parameter_count(STN(views)) + parameter_count(ImplicitVoxel(
            C, cfg.voxel_size, (grid, grid), views, cfg.patch_size, cfg.fusion_blocks, cfg.heads))
    assert removed > 0 and parameter_count(full) - parameter_count(model) == removed
    assert (model.bottleneck is None) == (not bottleneck) and (model.stn is None) == (not fusion)
    assert (model.implicit_voxel is None) == (not fusion)

    images = views_batch(2, views)
    parts = model(images, images + 0.1 * torch.randn_like(images))
    assert set(parts) == ({"loss", "distill", "ib", "kl", "sigma"} if bottleneck else {"loss", "distill"})
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    maps = model.eval().anomaly_map(images)
    assert maps.shape == (2, views, SIZE, SIZE) and torch.isfinite(maps).all()


def test_without_fusion_a_view_sees_only_itself():
    model = small_model(3, fusion=False).eval()
    images = views_batch(2, 3)
    changed = images.clone()
    changed[0, 2] += 0.5 * torch.randn(3, SIZE, SIZE)
    before, after = model.anomaly_map(images), model.anomaly_map(changed)
    assert (after[0, 2] - before[0, 2]).abs().max() > 1e-4
    # f_s + f_c = f_E: the other views' inputs move only by the rounding of the subtraction
    assert_close(after[0, :2], before[0, :2], atol=1e-5, rtol=0)
    assert torch.equal(after[1], before[1])


@pytest.mark.parametrize("bottleneck", [True, False])
def test_a_residual_voxel_adds_to_each_views_own_features(bottleneck):
    """fusion_residual (ours, a diagnostic): the decoders' input is the paper's f_p + f_c plus the view's
    own f_s, with the same weights; the paper's default leaves f_s out."""
    paper, residual = small_model(3, bottleneck=bottleneck).eval(), small_model(3, bottleneck=bottleneck,
                                                                                 fusion_residual=True).eval()
    residual.load_state_dict(paper.state_dict())
    mask = torch.tensor([[True, True, True], [True, False, True]])
    f_E = torch.randn(2, 3, C, SIZE // 16, SIZE // 16) * mask[:, :, None, None, None]  # an absent view: zeros
    with torch.no_grad():
        x_paper, _ = paper.decoder_input(f_E, mask)
        x_residual, _ = residual.decoder_input(f_E, mask)
        f_s = paper.bottleneck(f_E, mask)[0] if bottleneck else f_E  # the CB's f_E - f_c (mu at test time)
    assert_close(x_residual, x_paper + f_s, atol=1e-5, rtol=0)
    assert (x_residual - x_paper).abs().max() > 0.1  # f_s is not small


def test_error_residual_voxel_without_fusion():
    with pytest.raises(ValueError, match=r"fusion_residual True must be false when fusion=false \(there is no voxel"):
        IDIFConfig(image_size=SIZE, fusion=False, fusion_residual=True, weights="none")


# ----------------------------------------------------------------------------- error messages


def test_error_image_size_not_a_multiple_of_the_token_stride():
    with pytest.raises(ValueError, match=r"image_size 100 must be a multiple of 32 for IDIF"):
        IDIF(IDIFConfig(image_size=100, weights="none"))


def test_error_view_dropout_out_of_range():
    with pytest.raises(ValueError, match=r"view_dropout 1.0 must be in \[0, 1\)"):
        IDIF(IDIFConfig(image_size=SIZE, view_dropout=1.0, weights="none"))


def test_error_images_do_not_fit_the_model():
    model = small_model(3)
    with pytest.raises(ValueError, match=r"images of shape \(1, 2, 3, 64, 64\); it was built for "
                                         r"\(B, 3, 3, 64, 64\) \(IDIFConfig num_views=3, image_size=64\)"):
        model.eval().anomaly_map(views_batch(1, 2))
    images = views_batch(1, 3)
    with pytest.raises(ValueError, match=r"corrupted views of shape \(1, 3, 3, 32, 32\) must match"):
        model(images, images[..., :32, :32])


def test_error_bad_view_mask():
    model = small_model(2).eval()
    images = views_batch(2, 2)
    with pytest.raises(ValueError, match=r"view_mask must be a bool tensor of shape \(2, 2\)"):
        model.anomaly_map(images, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"every view of a sample absent; IDIF needs at least one"):
        model.anomaly_map(images, torch.tensor([[True, False], [False, False]]))


# ----------------------------------------------------------------------------- map and loss from fixed features


def test_anomaly_map_and_loss_composed_from_the_features(monkeypatch):
    """With features() fixed (3 scales of (B, V, C_s, h_s, w_s)), the map is scipy's Gaussian
    (sigma 4) of the mean over the scales of the bilinearly upsampled 1 - cos, zero for an absent
    view; the loss (no CB: alpha L_Distill) is alpha x the mean over samples of the sum over kept
    views and scales of the mean 1 - cos. Written without idif.py's helpers: a dropped scale,
    blur or weight fails."""
    from scipy import ndimage

    B, V = 2, 3
    model = small_model(V, bottleneck=False, alpha=2.0).eval()
    g = torch.Generator().manual_seed(0)
    sizes = ((8, 16), (16, 8), (32, 4))  # (C_s, h_s), smaller than the model's: features() is replaced
    f_tea = [torch.randn(B, V, c, s, s, generator=g) for c, s in sizes]
    f_stu = [torch.randn(B, V, c, s, s, generator=g) for c, s in sizes]
    monkeypatch.setattr(model, "features", lambda images, corrupted, view_mask: (f_tea, f_stu, None, None))
    distance = [1 - (t * s).sum(2) / (t.norm(dim=2) * s.norm(dim=2)) for t, s in zip(f_tea, f_stu)]  # (B, V, h, w)
    mean = sum(F.interpolate(d.flatten(0, 1)[:, None].double(), size=(SIZE, SIZE), mode="bilinear",
                             align_corners=True)[:, 0] for d in distance) / 3  # (B*V, H, W)
    expected = torch.stack([torch.from_numpy(ndimage.gaussian_filter(m.numpy(), sigma=4)) for m in mean])
    expected = expected.reshape(B, V, SIZE, SIZE).float()
    view_mask = torch.tensor([[True, False, True], [True, True, True]])
    expected[0, 1] = 0  # the absent view
    images = views_batch(B, V)
    assert_close(model.anomaly_map(images, view_mask), expected, rtol=0, atol=1e-5)
    per_view = sum(d.mean(dim=(2, 3)) for d in distance)  # (B, V)
    distill = (per_view * view_mask).sum(1).mean()
    parts = model.loss_parts(images, images, view_mask)
    assert_close(parts["distill"], distill)
    assert_close(parts["loss"], 2.0 * distill)
