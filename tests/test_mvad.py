"""Tests of mvad.py: MVAS against a loop-based reference, FLOP counts against FlopCounterMode, the
model's shapes and view independence, the frozen encoder's weights handling. CPU, tiny configs."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode


from mvad import (MVAD, FrozenEncoder, MultiViewFusion, MVADConfig, cosine_distance_map, counted_flops,
                  cross_attention_flops, detr_sine_embedding, drop_path, full_cross_attention,
                  full_cross_attention_reference, gaussian_blur, mvas_attention, mvas_attention_reference, mvas_flops,
                  mvas_routing, window_partition, window_unpartition)


def tiny_config(**overrides) -> MVADConfig:
    """64 px inputs: features 16, 8, 4 per side; 4, 3, 2 windows per side."""
    cfg = dict(backbone="resnet18", weights="none", image_size=64, n_win=(4, 3, 2), topk=2, blocks=(1, 2, 1))
    cfg.update(overrides)
    return MVADConfig(**cfg)


# ----------------------------------------------------------------------------- a loop-based MVAS


def mvas_reference(query, others, n_win, topk, num_heads, view_mask=None):
    """Straightforward MVAS: explicit zero padding, one query window at a time, routing by explicit
    window slicing, then dense attention over all other-view tokens with every token outside the
    selected windows masked out."""
    N, H, W, C = query.shape
    n_other = others.shape[1]
    th, tw = math.ceil(H / n_win), math.ceil(W / n_win)
    qp = query.new_zeros(N, th * n_win, tw * n_win, C)
    qp[:, :H, :W] = query
    op = others.new_zeros(N, n_other, th * n_win, tw * n_win, C)
    op[:, :, :H, :W] = others
    s, d = C ** -0.5, C // num_heads
    out = torch.zeros_like(qp)
    for n in range(N):
        candidates = [(v, i, j) for v in range(n_other) for i in range(n_win) for j in range(n_win)
                      if view_mask is None or view_mask[n, v]]
        keys = op[n].reshape(-1, C)
        for i in range(n_win):
            for j in range(n_win):
                rows, cols = slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw)
                q_win = qp[n, rows, cols].reshape(-1, C)
                if not candidates:
                    continue  # no other view present: zero output
                scores = torch.stack([(q_win.mean(0) * s) @ op[n, v, a * th:(a + 1) * th, b * tw:(b + 1) * tw]
                                      .reshape(-1, C).mean(0) for v, a, b in candidates])
                allowed = torch.zeros(n_other, th * n_win, tw * n_win, dtype=torch.bool)
                for c in scores.argsort(descending=True)[:topk].tolist():
                    v, a, b = candidates[c]
                    allowed[v, a * th:(a + 1) * th, b * tw:(b + 1) * tw] = True
                allowed = allowed.reshape(-1)
                for h in range(num_heads):
                    ch = slice(h * d, (h + 1) * d)
                    logits = (q_win[:, ch] * s) @ keys[:, ch].T
                    logits[:, ~allowed] = float("-inf")
                    out[n, rows, cols, ch] = (logits.softmax(-1) @ keys[:, ch]).reshape(th, tw, d)
    return out[:, :H, :W]


def random_views(N, n_other, H, W, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(N, H, W, C, generator=g, dtype=torch.float64)
    others = torch.randn(N, n_other, H, W, C, generator=g, dtype=torch.float64)
    return query, others


# ----------------------------------------------------------------------------- windows and MVAS


@pytest.mark.parametrize("H, W, n_win", [(8, 8, 2), (7, 9, 3), (5, 5, 5), (13, 6, 4), (8, 8, 6)])
def test_window_partition_round_trip_and_padding(H, W, n_win):
    x = torch.randn(2, 3, H, W, 4)
    windows = window_partition(x, n_win)
    th, tw = math.ceil(H / n_win), math.ceil(W / n_win)
    assert windows.shape == (2, 3, n_win * n_win, th * tw, 4)
    torch.testing.assert_close(window_unpartition(windows, n_win, H, W), x, rtol=0, atol=0)
    # window 1 is the second window of the top row; its first token is pixel (0, tw)
    torch.testing.assert_close(windows[:, :, 1, 0], x[:, :, 0, tw], rtol=0, atol=0)
    # the padding is zeros at the bottom/right: it adds exactly (Hp*Wp - H*W) zero tokens
    zeros = (windows == 0).all(dim=-1).sum(dim=(-1, -2))
    assert (zeros == th * tw * n_win * n_win - H * W).all()
    # image_only: the same windows less the rows/columns of windows that hold padding only
    rows, cols = math.ceil(H / th), math.ceil(W / tw)
    cropped = window_partition(x, n_win, image_only=True)
    torch.testing.assert_close(cropped, windows.unflatten(2, (n_win, n_win))[:, :, :rows, :cols].flatten(2, 3),
                               rtol=0, atol=0)
    torch.testing.assert_close(window_unpartition(cropped, n_win, H, W), x, rtol=0, atol=0)


@pytest.mark.parametrize("H, W, n_win, topk, heads, n_other", [
    (8, 8, 2, 2, 4, 2),  # no padding
    (7, 9, 3, 3, 8, 3),  # padding on both axes
    (6, 6, 4, 5, 2, 1),  # padding, one other view
    (5, 4, 2, 7, 1, 4),  # one head, k > windows of one view
])
def test_mvas_matches_loop_reference(H, W, n_win, topk, heads, n_other):
    query, others = random_views(2, n_other, H, W, 16)
    expected = mvas_reference(query, others, n_win, topk, heads)
    torch.testing.assert_close(mvas_attention(query, others, n_win, topk, heads), expected)
    torch.testing.assert_close(mvas_attention_reference(query, others, n_win, topk, heads), expected)


@pytest.mark.parametrize("view_mask", [None, [[True, True, True, True], [False, True, False, True],
                                              [False, False, False, True], [False, False, False, False]]])
def test_fast_mvas_equals_the_plain_version_in_float32_with_gradients(view_mask):
    # the official scale-0 window shape (5 x 5 tokens, padding-only windows) at a smaller size;
    # k = 24 > the 16 windows of one view, so sample 2 (one other view present) also gathers missing ones
    g = torch.Generator().manual_seed(4)
    query = torch.randn(4, 18, 18, 64, generator=g, requires_grad=True)
    others = torch.randn(4, 4, 18, 18, 64, generator=g, requires_grad=True)
    mask = None if view_mask is None else torch.tensor(view_mask)
    grad = torch.randn(4, 18, 18, 64, generator=g)
    results = []
    for fn in (mvas_attention, mvas_attention_reference):
        for k in (4, 24):
            out = fn(query, others, 4, k, 8, mask)
            dq, do = torch.autograd.grad(out, (query, others), grad)
            results.append((out, dq, do))
    for fast, plain in zip(results[:2], results[2:]):
        for a, b in zip(fast, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mvas_with_all_windows_selected_is_dense_cross_attention():
    query, others = random_views(2, 3, 6, 6, 16)
    out = mvas_attention(query, others, n_win=3, topk=3 * 9, num_heads=4)
    torch.testing.assert_close(out, full_cross_attention(query, others, num_heads=4))


def test_full_cross_attention_equals_the_naive_formula_with_gradients():
    g = torch.Generator().manual_seed(5)
    query = torch.randn(2, 9, 7, 64, generator=g, requires_grad=True)
    others = torch.randn(2, 3, 9, 7, 64, generator=g, requires_grad=True)
    grad = torch.randn(2, 9, 7, 64, generator=g)
    fused, naive = full_cross_attention(query, others), full_cross_attention_reference(query, others)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(fused, (query, others), grad), torch.autograd.grad(naive, (query, others), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the naive formula, written out: softmax(q k^T C^-0.5) v per head, head-major channels
    q, kv = query[0].reshape(63, 8, 8).transpose(0, 1), others[0].reshape(189, 8, 8).transpose(0, 1)
    by_hand = ((q @ kv.transpose(1, 2)) / 8).softmax(-1) @ kv  # (m, 63, d); C^-0.5 = 1/8
    torch.testing.assert_close(naive[0], by_hand.transpose(0, 1).reshape(9, 7, 64))


def test_mvas_view_mask_matches_the_reference_and_dropping_the_views():
    query, others = random_views(3, 3, 7, 7, 16, seed=1)
    mask = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    out = mvas_attention(query, others, n_win=3, topk=4, num_heads=4, view_mask=mask)
    torch.testing.assert_close(out, mvas_reference(query, others, 3, 4, 4, view_mask=mask))
    # the same as never having the missing views
    torch.testing.assert_close(out[0], mvas_attention(query[:1], others[:1, [0, 2]], 3, 4, 4)[0])
    torch.testing.assert_close(out[1], mvas_attention(query[1:2], others[1:2, [2]], 3, 4, 4)[0])
    # no other view present: zero output
    assert out[2].abs().max() == 0


def test_mvas_missing_view_has_no_influence_even_with_fewer_windows_than_topk():
    query, others = random_views(2, 3, 4, 4, 8, seed=2)
    mask = torch.tensor([[True, False, False], [False, True, True]])
    # one window per view: sample 0 has 1 present window < k = 3, so missing ones are gathered too
    out = mvas_attention(query, others, n_win=1, topk=3, num_heads=2, view_mask=mask)
    changed = others.clone()
    changed[0, 1:] = 100 * torch.randn_like(changed[0, 1:])
    changed[1, 0] = -changed[1, 0]
    torch.testing.assert_close(mvas_attention(query, changed, 1, 3, 2, view_mask=mask), out, rtol=0, atol=0)
    torch.testing.assert_close(out[0], mvas_attention(query[:1], others[:1, :1], 1, 3, 2)[0])
    # gradients of the missing views are exactly zero, and finite everywhere
    others.requires_grad_(True)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    mvas_attention(query, others, 1, 3, 2, view_mask=mask).sum().backward()
    assert others.grad[0].abs().max() == 0 and others.grad[1, 1].abs().max() == 0
    assert others.grad[1, 0].abs().max() > 0 and torch.isfinite(others.grad).all()


def test_mvas_routing_selects_the_most_correlated_window():
    # query window i is mostly channel i; other view 1 is a copy, view 0 is small noise:
    # with k = 1 each query window must select its own copy
    query, others = random_views(1, 2, 6, 6, 8, seed=3)
    query, others = 0.1 * query, 0.1 * others
    for i in range(4):
        query[0, 3 * (i // 2):3 * (i // 2) + 3, 3 * (i % 2):3 * (i % 2) + 3, i] += 3.0
    others[:, 1] = query
    out = mvas_attention(query, others, n_win=2, topk=1, num_heads=1)
    win = window_partition(others[:, 1], 2)  # (1, 4, 9, 8)
    q = window_partition(query, 2)
    expected = ((q * 8 ** -0.5) @ win.transpose(-1, -2)).softmax(-1) @ win
    torch.testing.assert_close(out, window_unpartition(expected, 2, 6, 6))

    # mvas_routing on its own: the logits are the scaled dot products of the mean-pooled windows
    # (padding included), the index their top-k, view-major over the other views' windows
    pooled_q, pooled_kv = q.mean(2), window_partition(others, 2).flatten(1, 2).mean(2)
    logits, index = mvas_routing(pooled_q, pooled_kv, topk=3)
    torch.testing.assert_close(logits, pooled_q @ pooled_kv.transpose(1, 2) / 8 ** 0.5)
    assert index.shape == (1, 4, 3)
    assert index[0, :, 0].tolist() == [4, 5, 6, 7]  # each query window's own copy in view 1


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("h, w, c, n_other, n_win, topk", [
    (8, 8, 16, 2, 2, 2), (7, 9, 16, 3, 3, 4), (16, 16, 64, 4, 4, 4), (64, 64, 64, 4, 14, 4),
    (32, 32, 128, 4, 9, 4), (16, 16, 256, 4, 6, 4), (5, 5, 8, 1, 2, 9),
])
def test_flop_formulas_equal_flop_counter(h, w, c, n_other, n_win, topk):
    query = torch.empty(1, h, w, c, device="meta")
    others = torch.empty(1, n_other, h, w, c, device="meta")
    mask = torch.ones(1, n_other, dtype=torch.bool, device="meta")
    fast = mvas_flops(h, w, c, n_other, n_win, topk, image_only=True)
    assert counted_flops(mvas_attention, query, others, n_win, topk) == fast
    assert counted_flops(mvas_attention, query, others, n_win, topk, view_mask=mask) == fast
    official = mvas_flops(h, w, c, n_other, n_win, topk)
    assert counted_flops(mvas_attention_reference, query, others, n_win, topk) == official
    assert counted_flops(mvas_attention_reference, query, others, n_win, topk, view_mask=mask) == official
    assert counted_flops(full_cross_attention, query, others) == cross_attention_flops(h, w, c, n_other)


@pytest.mark.parametrize("h, w, c, n_other, n_win, topk", [(8, 8, 16, 2, 2, 2), (7, 9, 16, 3, 3, 4)])
def test_counted_flops_sees_the_fused_attention_on_a_cpu(h, w, c, n_other, n_win, topk):
    """On CPU tensors FlopCounterMode alone does not see the fused attention's kernel (the docstrings
    of full_cross_attention and mvas_attention say so); counted_flops counts what the formulas (and
    the meta device, above) give."""
    query, others = torch.randn(1, h, w, c), torch.randn(1, n_other, h, w, c)
    with FlopCounterMode(display=False) as alone:
        full_cross_attention(query, others)
    assert alone.get_total_flops() == 0  # torch 2.14.1: no formula for the CPU kernel
    assert counted_flops(full_cross_attention, query, others) == cross_attention_flops(h, w, c, n_other)
    fast = mvas_flops(h, w, c, n_other, n_win, topk, image_only=True)
    mask = torch.tensor([[True] * (n_other - 1) + [False]])  # a missing view: masked, still computed
    assert counted_flops(mvas_attention, query, others, n_win, topk) == fast
    assert counted_flops(mvas_attention, query, others, n_win, topk, view_mask=mask) == fast


def test_mvas_is_far_cheaper_than_dense_at_the_official_scale_0():
    mvas, dense = mvas_flops(64, 64, 64, 4, 14, 4), cross_attention_flops(64, 64, 64, 4)
    assert mvas == 145_108_992 and dense == 17_179_869_184
    # the fast version skips the 196 - 13 x 13 = 27 query windows that hold padding only
    assert mvas_flops(64, 64, 64, 4, 14, 4, image_only=True) == mvas * 169 // 196
    assert dense / mvas > 100


def test_best_n_win_gives_the_four_thirds_power_law():
    """The exact count `mvas_flops` (checked against FlopCounterMode above), minimised over every
    window count a: with v = k the best a^2 = (hw)^(2/3) is a whole divisor of h when h = t^3
    (a = t^2), so the integer minimum equals 6 c v^(1/3) k^(2/3) (hw)^(4/3)."""
    c, v, k = 64, 4, 4
    for t in (2, 3, 4):
        h = t ** 3
        best = min(mvas_flops(h, h, c, v, a, k) for a in range(1, h + 1))
        assert best == mvas_flops(h, h, c, v, t * t, k)  # at a = t^2
        assert best == pytest.approx(6 * c * v ** (1 / 3) * k ** (2 / 3) * (h * h) ** (4 / 3), rel=1e-12)


# ----------------------------------------------------------------------------- small helpers


def test_detr_sine_embedding_values():
    pos = detr_sine_embedding(4, 6, 16)
    assert pos.shape == (4, 6, 16)
    y = torch.arange(1, 5, dtype=torch.float32) / (4 + 1e-6) * 2 * math.pi
    x = torch.arange(1, 7, dtype=torch.float32) / (6 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[:, 0, 0], y.sin())  # first y channel: sin(y)
    torch.testing.assert_close(pos[:, 0, 1], y.cos())  # its pair: cos(y), same frequency
    torch.testing.assert_close(pos[:, 0, 2], (y / 1e4 ** (2 / 8)).sin())
    torch.testing.assert_close(pos[0, :, 8], x.sin())  # x half starts at channel C/2
    torch.testing.assert_close(pos[1, :, 8:], pos[3, :, 8:])  # x half constant along y


def test_drop_path():
    """p = 0.2 tells p from 1 - p: a fifth of the samples zeroed, the rest scaled by 1 / 0.8; the
    mean stays 1 (5 sigma of the fraction is 0.02 at 10,000 samples)."""
    x = torch.ones(10_000, 3)
    assert drop_path(x, 0.2, training=False) is x and drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    out = drop_path(x, 0.2, training=True)
    assert (out == out[:, :1]).all()  # one draw per sample
    values = out[:, 0]
    assert set(values.unique().tolist()) == {0.0, 1.25}
    assert (values == 0).float().mean().item() == pytest.approx(0.2, abs=0.02)
    assert values.mean().item() == pytest.approx(1.0, abs=0.025)


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    maps = torch.rand(2, 3, 40, 23, dtype=torch.float64)
    expected = torch.stack([torch.from_numpy(ndimage.gaussian_filter(m.numpy(), sigma=4))
                            for m in maps.reshape(-1, 40, 23)]).reshape(2, 3, 40, 23)
    torch.testing.assert_close(gaussian_blur(maps, sigma=4.0), expected)
    small = torch.rand(1, 9, 12, dtype=torch.float64)  # radius 16 > the map: repeated reflection
    torch.testing.assert_close(gaussian_blur(small, 4.0)[0],
                               torch.from_numpy(ndimage.gaussian_filter(small[0].numpy(), sigma=4)))


def test_cosine_distance_map():
    t = torch.randn(2, 8, 4, 4)
    assert cosine_distance_map(t, t, (16, 16)).abs().max() < 1e-6
    torch.testing.assert_close(cosine_distance_map(t, -t, (16, 16)), torch.full((2, 16, 16), 2.0))
    s = torch.randn(2, 8, 4, 4)
    d = cosine_distance_map(t, s, (13, 13))
    assert d.shape == (2, 13, 13)
    # align_corners=True keeps the corner values exactly
    source = 1 - F.cosine_similarity(t, s, dim=1)  # (2, 4, 4)
    torch.testing.assert_close(d[:, ::12, ::12], source[:, ::3, ::3])


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("V", [2, 3, 5])
def test_shapes_at_every_stage(V):
    torch.manual_seed(0)
    model = MVAD(tiny_config()).eval()
    images = torch.randn(2, V, 3, 64, 64)
    teacher = model.encoder(images.flatten(0, 1))
    assert [tuple(t.shape) for t in teacher] == [(2 * V, 64, 16, 16), (2 * V, 128, 8, 8), (2 * V, 256, 4, 4)]
    fused = [fuse(t.unflatten(0, (2, V))) for fuse, t in zip(model.fusion, teacher)]
    assert [tuple(f.shape) for f in fused] == [(2, V, 64, 16, 16), (2, V, 128, 8, 8), (2, V, 256, 4, 4)]
    bottleneck = model.bottleneck(*[f.flatten(0, 1) for f in fused])
    assert bottleneck.shape == (2 * V, 512, 2, 2)
    student = model.decoder(bottleneck)
    assert [s.shape for s in student] == [t.shape for t in teacher]
    loss = model(images)
    assert loss.dim() == 0 and loss > 0
    torch.testing.assert_close(loss, 5.0 * sum(F.mse_loss(s, t) for s, t in zip(student, teacher)))  # eval: no dropout
    maps = model.anomaly_map(images)
    assert maps.shape == (2, V, 64, 64) and maps.dtype == torch.float32 and (maps >= 0).all()


def test_official_size_and_cost():
    model = MVAD(MVADConfig(weights="none"))
    frozen = sum(p.numel() for p in model.encoder.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert frozen == 8_170_304 and trainable == 9_633_088  # the official log: 8.2 M + 9.6 M
    mvas = sum(5 * depth * mvas_flops(s, s, c, 4, a, 4)
               for c, s, a, depth in zip((64, 128, 256), (64, 32, 16), (14, 9, 6), (1, 2, 4)))
    assert mvas / 2 / 1e9 == pytest.approx(0.76, abs=0.01)  # the official log: all MVAS about 0.76 GMACs


def test_rd_without_mvas_has_no_mvas_parameters_and_scores_each_view_alone():
    torch.manual_seed(0)
    full = MVAD(tiny_config())
    torch.manual_seed(0)
    rd = MVAD(tiny_config(mvas=False)).eval()
    assert rd.fusion is None and not any(name.startswith("fusion") for name in rd.state_dict())
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    mvas_blocks = sum(p.numel() for p in full.fusion.parameters())
    assert mvas_blocks > 0 and count(full) - count(rd) == mvas_blocks
    images = torch.randn(2, 3, 3, 64, 64)
    teacher, student = rd.features(images)
    expected = rd.decoder(rd.bottleneck(*rd.encoder(images.flatten(0, 1))))  # encoder -> OCBE -> decoder
    for s, e, t in zip(student, expected, teacher):
        torch.testing.assert_close(s, e)
        assert s.shape == t.shape
    maps = rd.anomaly_map(images)
    assert maps.shape == (2, 3, 64, 64) and torch.isfinite(maps).all() and (maps >= 0).all()
    changed = images.clone()
    changed[0, 1] = torch.randn(3, 64, 64)
    new = rd.anomaly_map(changed)  # no MVAS: the other views of the sample do not see view 1
    torch.testing.assert_close(new[0, [0, 2]], maps[0, [0, 2]])
    assert (new[0, 1] - maps[0, 1]).abs().max() > 1e-4
    rd.train()(images).backward()
    assert all(p.grad is not None for p in rd.parameters() if p.requires_grad)


def test_changing_one_view_changes_its_sample_only():
    torch.manual_seed(0)
    model = MVAD(tiny_config()).eval()
    images = torch.randn(2, 3, 3, 64, 64)
    maps = model.anomaly_map(images)
    changed = images.clone()
    changed[0, 1] = torch.randn(3, 64, 64)
    new = model.anomaly_map(changed)
    for v in (0, 2):  # the other views of the same sample see view 1 through MVAS
        assert (new[0, v] - maps[0, v]).abs().max() > 1e-4
    torch.testing.assert_close(new[1], maps[1])


def test_masked_out_view_has_no_influence():
    torch.manual_seed(0)
    model = MVAD(tiny_config()).eval()
    images = torch.randn(2, 3, 3, 64, 64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    maps = model.anomaly_map(images, view_mask=mask)
    changed = images.clone()
    changed[0, 2] = 5 * torch.randn(3, 64, 64)
    new = model.anomaly_map(changed, view_mask=mask)
    torch.testing.assert_close(new, maps)
    assert maps[0, 2].abs().max() == 0
    # and it equals running the sample without that view at all
    torch.testing.assert_close(maps[0, :2], model.anomaly_map(images[:1, :2])[0])
    with pytest.raises(ValueError, match="view_mask must be a"):
        model.anomaly_map(images, view_mask=mask[:, :2])


def official_fusion(fusion, feats, view_mask=None, overlap=None):
    """MultiViewFusion.forward as the official code runs it: one query view at a time against its
    other views concatenated in order, padded and cut again in every block (the plain MVAS).
    `overlap` (our oracle routing's input) must be None: the official code has no such routing."""
    assert overlap is None
    B, V, C, H, W = feats.shape
    x = feats.permute(0, 1, 3, 4, 2)  # (B, V, H, W, C)
    pos = detr_sine_embedding(H, W, C)
    outs = []
    for i in range(V):
        other = [j for j in range(V) if j != i]
        mask = None if view_mask is None else view_mask[:, other]
        y = x[:, i]
        for block in fusion.blocks:
            fused = mvas_attention_reference(y + pos, x[:, other], block.n_win, block.topk, block.num_heads, mask)
            y = block.norm1(y + drop_path(fused, block.drop_prob, block.training))
            y = block.norm2(y + block.mlp(y))
        outs.append(y)
    return torch.stack(outs, dim=1).permute(0, 1, 4, 2, 3)  # (B, V, C, H, W)


def test_model_equals_the_official_per_view_fusion(monkeypatch):
    # windows with padding at every scale (16 -> 18, 8 -> 9, 4 -> 6: padding-only windows at scale 2)
    torch.manual_seed(0)
    model = MVAD(tiny_config(n_win=(3, 3, 3), topk=4, blocks=(1, 2, 2), dropout=0.0, drop_path=0.0))
    images = torch.randn(2, 3, 3, 64, 64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    state = {k: v.clone() for k, v in model.state_dict().items()}  # a training forward moves BatchNorm statistics
    teacher = [t.unflatten(0, (2, 3)) for t in model.encoder(images.flatten(0, 1))]
    upstream = [torch.randn_like(t) for t in teacher]

    def run():
        model.load_state_dict(state)
        maps = [model.eval().anomaly_map(images), model.anomaly_map(images, view_mask=mask)]
        loss = model.train()(images)
        # gradients of the fusion's parameters for a fixed upstream gradient (the whole model's are
        # too ill-conditioned to compare: train-mode BatchNorm over 2 x 2 maps of 6 images)
        fused = [fuse(t) for fuse, t in zip(model.fusion, teacher)]
        grads = torch.autograd.grad(fused, list(model.fusion.parameters()), upstream)
        return maps + [loss], grads

    outputs, grads = run()
    monkeypatch.setattr(MultiViewFusion, "forward", official_fusion)
    official_outputs, official_grads = run()
    for a, b in zip(outputs, official_outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, official_grads, strict=True):  # sums over 1,500 tokens of values up to ~100
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bad_inputs_and_configs():
    model = MVAD(tiny_config())
    with pytest.raises(ValueError, match=r"expects images \(B, V>=2, 3, 64, 64\).*--image-size"):
        model(torch.randn(1, 3, 3, 128, 128))
    with pytest.raises(ValueError, match="V>=2"):
        model(torch.randn(1, 1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"got \(2, 3, 64, 64\)"):
        model.anomaly_map(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"image_size 100 must be a multiple of 32 for MVAD \(--image-size\)"):
        MVAD(tiny_config(image_size=100))
    with pytest.raises(ValueError, match=r"n_win \(4, 3\) must be 3 window counts \(one per scale\)"):
        MVAD(tiny_config(n_win=(4, 3)))
    with pytest.raises(ValueError, match="backbone 'resnet50' must be one of resnet18, resnet34"):
        MVAD(tiny_config(backbone="resnet50"))
    with pytest.raises(ValueError, match="--backbone 'resnet50' is unknown; choose one of: resnet18, resnet34"):
        FrozenEncoder("resnet50")


def test_encoder_stays_frozen_and_every_trainable_parameter_gets_a_gradient():
    model = MVAD(tiny_config())
    model.train()
    assert not model.encoder.training and all(not m.training for m in model.encoder.modules())
    assert model.fusion.training and model.decoder.training
    before = [b.clone() for b in model.encoder.buffers()]
    model(torch.randn(2, 3, 3, 64, 64)).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.encoder.buffers()))


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    model = MVAD(tiny_config(dropout=0.0, drop_path=0.0)).train()
    images = torch.randn(1, 2, 3, 64, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses


def test_wide_resnet50_2_backbone_shapes():
    torch.manual_seed(0)
    model = MVAD(tiny_config(backbone="wide_resnet50_2", blocks=(1, 1, 1))).eval()
    assert model.encoder.channels == (256, 512, 1024)
    maps = model.anomaly_map(torch.randn(1, 2, 3, 64, 64))
    assert maps.shape == (1, 2, 64, 64)


# ----------------------------------------------------------------------------- frozen encoder weights


def test_imagenet_weights_missing_raises_naming_file_and_folder(offline_hub):
    with pytest.raises(ValueError) as err:
        FrozenEncoder("resnet34", "imagenet")
    message = str(err.value)
    assert "resnet34-b627a593.pth" in message and str(offline_hub) in message
    assert message.startswith("--weights imagenet") and "\n" not in message
    with pytest.raises(ValueError, match="wide_resnet50_2-95faca4d.pth"):
        FrozenEncoder("wide_resnet50_2", "imagenet")


def test_auto_weights_missing_warns_and_needs_calibration(offline_hub, capsys):
    encoder = FrozenEncoder("resnet34", "auto")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:")
    assert "resnet34-b627a593.pth" in err[0] and str(offline_hub) in err[0]
    assert "random-init" in err[0] and "calibrated on the training images" in err[0]
    assert encoder.needs_calibration
    none = FrozenEncoder("resnet18", "none")
    assert none.needs_calibration and capsys.readouterr().err == ""


def test_weights_from_a_file(tmp_path, offline_hub):
    torch.manual_seed(3)
    reference = torchvision.models.resnet34()
    torch.save(reference.state_dict(), tmp_path / "r34.pth")
    encoder = FrozenEncoder("resnet34", str(tmp_path / "r34.pth"))
    assert not encoder.needs_calibration
    torch.testing.assert_close(encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(encoder.bn1.running_var, reference.bn1.running_var)
    # the ImageNet file found in the hub cache is used as is
    offline_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), offline_hub / "resnet34-b627a593.pth")
    cached = FrozenEncoder("resnet34", "imagenet")
    torch.testing.assert_close(cached.layer1[0].conv2.weight, reference.layer1[0].conv2.weight)


def test_bad_weights_paths(tmp_path, offline_hub):
    with pytest.raises(ValueError, match=r"--weights '.*nope.pth': no such file; use auto, imagenet, none or a"):
        FrozenEncoder("resnet34", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable state dict"):
        FrozenEncoder("resnet34", str(tmp_path / "junk.pth"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")  # fewer blocks
    with pytest.raises(ValueError, match=r"not a resnet34 state dict \(missing \['layer1.2.conv1.weight'"):
        FrozenEncoder("resnet34", str(tmp_path / "r18.pth"))
    state = torchvision.models.resnet34().state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="the tensors do not fit a resnet34"):
        FrozenEncoder("resnet34", str(tmp_path / "narrow.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        FrozenEncoder("resnet34", str(tmp_path / "list.pth"))
    offline_hub.mkdir(parents=True)
    (offline_hub / "resnet34-b627a593.pth").write_text("truncated")
    with pytest.raises(ValueError, match=r"resnet34-b627a593.pth: cannot be read \(.*\); delete or replace it"):
        FrozenEncoder("resnet34", "auto")
    with pytest.raises(ValueError, match="--backbone 'vgg16' is unknown"):
        FrozenEncoder("vgg16", "none")


def test_calibration_changes_bn_statistics_and_is_deterministic():
    batches = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    encoders = []
    for _ in range(2):
        torch.manual_seed(0)
        encoders.append(FrozenEncoder("resnet18", "none"))
    a, b = encoders
    before = a.layer2[0].bn1.running_mean.clone()
    a.calibrate(iter(batches))
    b.calibrate(iter(batches))
    assert not a.needs_calibration and not a.training and all(not m.training for m in a.modules())
    assert (a.layer2[0].bn1.running_mean - before).abs().max() > 1e-3
    assert (a.bn1.running_var - 1).abs().max() > 1e-3
    for x, y in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # the cumulative average over the 3 batches: the first BN sees the stem conv's per-batch stats
    stem = [a.conv1(x) for x in batches]
    torch.testing.assert_close(a.bn1.running_mean, torch.stack([s.mean(dim=(0, 2, 3)) for s in stem]).mean(0),
                               rtol=1e-4, atol=1e-5)
    assert a.bn1.momentum == 0.1
    # the flag and the statistics travel in the state dict (a checkpoint holds them)
    c = FrozenEncoder("resnet18", "none")
    c.load_state_dict(a.state_dict())
    assert not c.needs_calibration
    with pytest.raises(ValueError, match="needs at least one training batch"):
        FrozenEncoder("resnet18", "none").calibrate([])


# ----------------------------------------------------------------------------- map and loss from fixed features


def fixed_features(N: int, channels=(8, 16, 32), sizes=(16, 8, 4), seed: int = 0):
    """Teacher and student features of 3 scales, (N, C_s, h_s, h_s), drawn once."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(N, c, s, s, generator=g) for c, s in zip(channels, sizes)],
            [torch.randn(N, c, s, s, generator=g) for c, s in zip(channels, sizes)])


def test_anomaly_map_and_loss_composed_from_the_features(monkeypatch):
    """With features() fixed, the map is scipy's Gaussian (sigma 4) of the sum over the 3 scales of
    the bilinearly upsampled (align_corners) 1 - cos, / 9, and the loss is 5 x the sum of the
    per-scale MSEs: written here without mvad.py's helpers, so that a dropped scale, blur or
    weight fails."""
    from scipy import ndimage

    model = MVAD(tiny_config()).eval()
    B, V = 2, 3
    teacher, student = fixed_features(B * V)
    monkeypatch.setattr(model, "features", lambda images, view_mask=None, overlaps=None: (teacher, student))
    images = torch.zeros(B, V, 3, 64, 64)
    total = torch.zeros(B * V, 64, 64, dtype=torch.float64)
    for t, s in zip(teacher, student):
        cos = (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))  # (N, h, w)
        total += F.interpolate((1 - cos)[:, None].double(), size=(64, 64), mode="bilinear", align_corners=True)[:, 0]
    expected = torch.stack([torch.from_numpy(ndimage.gaussian_filter(m.numpy(), sigma=4)) for m in total / 9])
    torch.testing.assert_close(model.anomaly_map(images), expected.reshape(B, V, 64, 64).float(), rtol=0, atol=1e-5)
    mse = sum(((t - s) ** 2).mean() for t, s in zip(teacher, student))
    torch.testing.assert_close(model(images), 5 * mse)
